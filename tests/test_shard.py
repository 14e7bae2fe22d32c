import math

import pytest
import torch

from helpers_shards import random_shard, tiny_base
from wrag_vllm.errors import ShardError
from wrag_vllm.shard import Factors, load_shard, read_meta


def test_roundtrip_keeps_factors_and_metadata(tmp_path, tiny_fp):
    s = random_shard(tiny_fp, "med", rank=3, description="medicine", samples=["a", "b"])
    s.provenance = {"source": "test"}
    p = s.save(tmp_path / "med.safetensors")
    meta = read_meta(p)
    assert meta["id"] == "med" and meta["rank"] == 3 and meta["format_version"] == 1
    assert meta["target_modules"] == ["down_proj", "gate_proj", "up_proj"]
    assert meta["base"]["weights_hash"] == tiny_fp.weights_hash
    t = load_shard(p)
    assert t.samples == ["a", "b"] and t.provenance == {"source": "test"}
    for k, f in s.factors.items():
        assert torch.equal(t.factors[k].A, f.A) and torch.equal(t.factors[k].B, f.B)
        assert t.factors[k].scale == pytest.approx(f.scale)


def test_fingerprint_tells_same_shape_bases_apart(tiny_fp):
    other = tiny_base(seed=1)
    assert other.hidden_size == tiny_fp.hidden_size
    assert tiny_fp.mismatch(other) and "weights_hash" in tiny_fp.mismatch(other)
    assert tiny_fp.mismatch(tiny_fp) is None


def test_attention_targets_refused_with_reason(tiny_fp):
    s = random_shard(tiny_fp, "att", modules=("gate_proj", "q_proj"))
    with pytest.raises(ShardError, match="instruction following"):
        s.validate()
    s.validate(allow_attention=True)  # the documented research override


@pytest.mark.parametrize("module", ["embed_tokens", "lm_head", "input_layernorm"])
def test_embeddings_norms_never_allowed(tiny_fp, module):
    from wrag_vllm.shard import check_modules

    with pytest.raises(ShardError, match="embeddings, norms"):
        check_modules([module], allow_attention=True)


def test_bad_values_and_shapes(tiny_fp):
    s = random_shard(tiny_fp, "x")
    k = next(iter(s.factors))
    s.factors[k].A[0, 0] = math.nan
    with pytest.raises(ShardError, match="NaN or Inf"):
        s.validate()
    s = random_shard(tiny_fp, "x")
    s.factors[(0, "gate_proj")] = Factors(torch.zeros(2, 7), torch.zeros(128, 2))
    with pytest.raises(ShardError, match="do not fit the base"):
        s.validate()
    s = random_shard(tiny_fp, "x")
    s.factors[(0, "gate_proj")] = Factors(torch.zeros(2, 64), torch.zeros(128, 3))
    with pytest.raises(ShardError, match="rank mismatch"):
        s.validate()
    s = random_shard(tiny_fp, "x")
    s.factors[(9, "gate_proj")] = s.factors[(0, "gate_proj")]
    with pytest.raises(ShardError, match="out of range"):
        s.validate()
    with pytest.raises(ShardError, match="invalid shard id"):
        random_shard(tiny_fp, "../etc").validate()


def test_truncated_and_foreign_files_refused(tmp_path, tiny_fp):
    p = random_shard(tiny_fp, "t").save(tmp_path / "t.safetensors")
    data = p.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="corrupt|truncated|readable"):
        load_shard(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ShardError):
        load_shard(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ShardError, match="no 'wrag' metadata"):
        load_shard(tmp_path / "plain.safetensors")


def test_loading_never_unpickles(tmp_path, tiny_fp):
    """A pickle renamed to .safetensors is refused, not executed."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    (tmp_path / "evil.safetensors").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ShardError):
        load_shard(tmp_path / "evil.safetensors")
