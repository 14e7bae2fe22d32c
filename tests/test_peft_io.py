import json

import pytest
import torch

from helpers_shards import random_shard, tiny_llama
from wrag_vllm.errors import ShardError
from wrag_vllm.peft_io import export_peft, import_peft


def _peft_adapter(tmp_path, targets=("gate_proj", "up_proj", "down_proj"), r=4, alpha=8, rslora=False,
                  rank_pattern=None, seed=0):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(0)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
                     rank_pattern=rank_pattern or {}, lora_dropout=0.0)
    pm = get_peft_model(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # PEFT initialises B to zero: make the delta non-trivial
    out = tmp_path / f"adapter-{seed}"
    pm.save_pretrained(out)
    return pm, out


def _ffn_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp." in n}


def _dense_deltas_from(pm):
    merged = pm.merge_and_unload()
    base = tiny_llama(0)
    mw, bw = _ffn_weights(merged), _ffn_weights(base)
    return {n: mw[n] - bw[n] for n in bw}


@pytest.mark.parametrize("rslora", [False, True])
def test_import_matches_peft_merge(tmp_path, tiny_fp, rslora):
    pm, path = _peft_adapter(tmp_path, rslora=rslora, rank_pattern={"down_proj": 2})
    shard = import_peft(path, tiny_fp, shard_id="p", description="d")
    expect = _dense_deltas_from(pm)
    assert shard.factors[(0, "down_proj")].rank == 2 and shard.factors[(0, "gate_proj")].rank == 4
    for (layer, mod), f in shard.factors.items():
        want = expect[f"model.layers.{layer}.mlp.{mod}.weight"]
        torch.testing.assert_close(f.delta(), want, atol=1e-6, rtol=1e-4)


def test_attention_adapter_refused_unless_overridden(tmp_path, tiny_fp):
    _, path = _peft_adapter(tmp_path, targets=("q_proj", "gate_proj"))
    with pytest.raises(ShardError, match="instruction following"):
        import_peft(path, tiny_fp)
    s = import_peft(path, tiny_fp, allow_attention=True)
    assert "q_proj" in s.target_modules


def test_not_an_adapter_and_corrupt(tmp_path, tiny_fp):
    with pytest.raises(ShardError, match="adapter_config.json"):
        import_peft(tmp_path, tiny_fp)
    _, path = _peft_adapter(tmp_path)
    w = path / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    with pytest.raises(ShardError, match="corrupt"):
        import_peft(path, tiny_fp)


def test_shape_mismatch_with_base_refused(tmp_path):
    from helpers_shards import tiny_base
    from wrag_vllm.fingerprint import BaseFingerprint

    _, path = _peft_adapter(tmp_path)
    fp = tiny_base(0)
    other = BaseFingerprint(fp.architecture, fp.hidden_size, 256, fp.num_layers, fp.weights_hash)
    with pytest.raises(ShardError, match="do not fit the base"):
        import_peft(path, other)


def test_export_loads_in_peft_and_reproduces_the_delta(tmp_path, tiny_fp):
    from peft import PeftModel

    shard = random_shard(tiny_fp, "e", rank=3, scale=0.7)
    shard.factors.pop((1, "up_proj"))  # a missing module exports as zeros
    out = export_peft(shard, tmp_path / "exported")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
    pm = PeftModel.from_pretrained(tiny_llama(0), out)
    got = _dense_deltas_from(pm)
    for layer in range(2):
        for mod in ("gate_proj", "up_proj", "down_proj"):
            f = shard.factors.get((layer, mod))
            want = f.delta() if f else torch.zeros_like(got[f"model.layers.{layer}.mlp.{mod}.weight"])
            torch.testing.assert_close(got[f"model.layers.{layer}.mlp.{mod}.weight"], want, atol=1e-6, rtol=1e-4)
    back = import_peft(out, tiny_fp, shard_id="back")
    torch.testing.assert_close(back.factors[(0, "gate_proj")].delta(), shard.factors[(0, "gate_proj")].delta())
    with pytest.raises(ShardError, match="not empty"):
        export_peft(shard, out)
