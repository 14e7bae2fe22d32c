import pytest
import torch

from helpers_shards import tiny_llama
from wrag_vllm.errors import ShardError
from wrag_vllm.extract import extract, truncate


def test_truncate_rank_and_energy():
    torch.manual_seed(0)
    low = torch.randn(40, 3) @ torch.randn(3, 30)
    f, kept = truncate(low, rank=3, energy=None)
    torch.testing.assert_close(f.delta(), low, atol=1e-4, rtol=1e-4)
    assert kept == pytest.approx(1.0, abs=1e-5)
    noisy = low + 0.01 * torch.randn(40, 30)
    f, kept = truncate(noisy, rank=None, energy=0.99)
    assert f.rank == 3 and kept >= 0.99


def test_extract_from_finetune(tmp_path, tiny_model_dir):
    ft = tiny_llama(0)
    torch.manual_seed(1)
    truth = {}
    with torch.no_grad():
        for layer in range(2):
            for mod in ("gate_proj", "up_proj", "down_proj"):
                lin = getattr(ft.model.layers[layer].mlp, mod)
                d = 0.05 * torch.randn(lin.weight.shape[0], 2) @ torch.randn(2, lin.weight.shape[1])
                lin.weight += d
                truth[(layer, mod)] = d
        ft.model.layers[0].self_attn.q_proj.weight += 0.01  # attention changes are dropped, and counted
    ft.save_pretrained(tmp_path / "ft", safe_serialization=True)
    shard, report = extract(tiny_model_dir, tmp_path / "ft", "ext", rank=None, energy=0.999, progress=False)
    assert len(report) == 6 and all(r.energy_kept >= 0.999 and r.rank <= 3 for r in report)
    assert shard.provenance["dropped_attention_tensors"] == 1
    for k, d in truth.items():
        torch.testing.assert_close(shard.factors[k].delta(), d, atol=1e-4, rtol=1e-3)


def test_extract_refuses_other_shapes(tmp_path, tiny_model_dir):
    tiny_llama(0, intermediate_size=96).save_pretrained(tmp_path / "other", safe_serialization=True)
    with pytest.raises(ShardError, match="intermediate_size"):
        extract(tiny_model_dir, tmp_path / "other", "x", rank=2, progress=False)
