"""CPU-side logic of benchmarks/gpu/gpu_kernels.py and a tiny run of benchmarks/micro/bench_kernels.py."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks.gpu import gpu_kernels as g
from benchmarks.micro import bench_kernels


def test_gpu_byte_model_and_peaks():
    by = g.step_bytes(3072, 8192, [16] * 64, elem=2)
    assert by["base_bytes"] == 3 * 3072 * 8192 * 2
    assert by["shard_bytes"] == 64 * 16 * (2 * (3072 + 8192) + 8192 + 3072) * 2
    assert g.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert g.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert g.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert g.peak_bandwidth("cpu") is None


def test_gpu_script_logic_on_cpu():
    """The same correctness cases and decode problem the GPU run uses, on CPU (torch backend)."""
    rows = g.correctness_cases(torch.device("cpu"), [torch.float32, torch.bfloat16])
    assert len(rows) == 8 and all(r["ok"] for r in rows), rows
    p = g.make_decode_problem(64, 128, 8, 8, 3, 8, torch.float32, "cpu")
    assert p["meta"].max_seq_len == 1 and p["meta"].num_tokens == 8
    # every request gets K distinct slots, and all 8 distinct shards are used
    assert all(len(set(r)) == 3 for r in p["slots"].tolist()) and len(set(p["slots"].flatten().tolist())) == 8
    out = g.ffn_with_delta(p)
    base = g.ffn_with_delta(p, with_delta=False)
    assert out.shape == (8, 64) and not torch.allclose(out, base)
    rows = g.timing(torch.device("cpu"), 64, 128, 8, 8, [3], 8, torch.float32, reps=2)
    assert rows[0]["ms_delta"] > 0 and rows[0]["total_bytes"] > rows[0]["shard_bytes"]


@pytest.mark.slow
def test_cpu_bench_tiny_run(tmp_path):
    assert bench_kernels.main(["--shapes", "tiny", "--ks", "3", "--reps", "3", "--budget-s", "0.2",
                               "--dtype", "float32", "--out", str(tmp_path), "--name", "t"]) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["cpu_simd"]
    assert all(r["rel_err"] < 1e-5 for r in data["rows"])
    decode = [r for r in data["rows"] if r["seq_len"] == 1]
    assert decode and all(r["rel_err_other"]["inductor"] < 1e-5 and "inductor" in r["ms"] for r in decode)
    assert all(r["limit_delta_vs_base"] > 0 and r["delta_vs_base"] > 0 for r in data["rows"])
    assert {"ours", "concat", "naive"} <= set(data["rows"][0]["ms"])
    assert (tmp_path / "t.png").stat().st_size > 0 and "ours/concat" in (tmp_path / "t.md").read_text()
