"""One prepared GPU check of the wrag_kernels Triton path (target: < 5 min on one H100).

1. Correctness on real CUDA tensors: SGMV (prefill) and BGMV (decode) layouts, fp32/bf16/fp16,
   mixed requests (0/1/3/8 shards, heterogeneous ranks, NaN beyond each rank, full pool), vs the
   dense reference (materialised ΔW, fp64); and a CUDA graph captured with empty metadata then
   replayed with real batches (graph_replay_cases).
2. Timing, decode step of 64 tokens (64 requests, 64 distinct shards, K shards per request),
   Llama-3.2-3B-like FFN (H=3072, F=8192), bf16: base FFN GEMMs alone, base + delta, delta alone.
   Memory-bound limit per step = bytes that must be read at least once / peak HBM bandwidth:
       base FFN weights 3·H·F·2 B  +  distinct shard factors Σ_s r_s·(2·(H+F) + (F+H))·2 B
   (activations are negligible at 64 tokens). Achieved bandwidth = those bytes / measured time.

The CPU-side logic (problem construction, byte model, reference check) is importable and runs on
the CPU with the torch backend: `python -m benchmarks.gpu.gpu_kernels --device cpu --tiny`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks import RESULTS
from benchmarks.machine import describe
from wrag_kernels import DeltaMeta, apply_delta
from wrag_kernels.reference import dense_delta_reference

# Peak HBM bandwidth (bytes/s) by device-name substring; first match wins.
PEAK_BW = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12), ("L40", 0.864e12)]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}   # tf32-free fp32 (ieee dots)


def peak_bandwidth(name: str) -> float | None:
    for key, bw in PEAK_BW:
        if key in name:
            return bw
    return None


def step_bytes(H: int, F: int, ranks: list[int], elem: int = 2) -> dict:
    """Minimum bytes one decode step must read for one FFN layer (base weights + shard factors)."""
    base = 3 * H * F * elem
    shards = sum(r * (2 * (H + F) + (F + H)) for r in ranks) * elem   # gate_up A,B (2 slices) + down A,B
    return {"base_bytes": base, "shard_bytes": shards, "total_bytes": base + shards}


def make_decode_problem(H: int, F: int, n_tokens: int, n_distinct: int, K: int, rank: int, dtype, device,
                        seed: int = 0):
    """n_tokens decode requests; request q uses slots (q + j·⌈n/K⌉) mod n_distinct, j < K."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(dtype).to(device)  # noqa: E731
    p = {
        "x": rnd(n_tokens, H),
        "w_gu": rnd(2 * F, H), "w_d": rnd(H, F),
        "gu": (rnd(2, n_distinct, rank, H), rnd(2, n_distinct, F, rank)),
        "dn": (rnd(1, n_distinct, rank, F), rnd(1, n_distinct, H, rank)),
        "ranks": torch.full((n_distinct,), rank, dtype=torch.int32, device=device),
    }
    stride = max(1, -(-n_distinct // K))
    slots = torch.tensor([[(q + j * stride) % n_distinct for j in range(K)] for q in range(n_tokens)])
    weights = torch.rand(n_tokens, K, generator=g) + 0.5
    meta = DeltaMeta(n_tokens, n_tokens, K, device)
    meta.fill(torch.arange(n_tokens + 1), slots, weights)
    p.update(meta=meta, slots=slots, weights=weights, qsl=torch.arange(n_tokens + 1))
    return p


def ffn_base(p):
    gu = p["x"] @ p["w_gu"].t()
    F = gu.shape[1] // 2
    return gu, F


def ffn_with_delta(p, with_delta: bool = True):
    gu, F = ffn_base(p)
    if with_delta:
        apply_delta(gu, p["x"], *p["gu"], p["ranks"], p["meta"])
    act = torch.nn.functional.silu(gu[:, :F]) * gu[:, F:]
    out = act @ p["w_d"].t()
    if with_delta:
        apply_delta(out, act, *p["dn"], p["ranks"], p["meta"])
    return out


def delta_only(p, y_gu, y_d, act):
    apply_delta(y_gu, p["x"], *p["gu"], p["ranks"], p["meta"])
    apply_delta(y_d, act, *p["dn"], p["ranks"], p["meta"])


def correctness_cases(device, dtypes, d_in=96, d_out=80, R=32) -> list[dict]:
    """Mixed batches (prefill and decode layouts) vs the dense reference; returns result rows."""
    reqs = [(5, [0, 1, 2], [0.5, 1.0, -0.75]), (1, [], []), (33, list(range(8)), [0.3] * 8),
            (3, [4], [1.0]), (2, [], []), (4, [5, 5, 8], [0.5, 0.25, 1.5]), (6, [-1, 9, -1], [1.0] * 3)]
    ranks = [32, 4, 8, 0, 1, 16, 12, 7, 3, 32]
    rows = []
    for dtype in dtypes:
        for layout in ("prefill", "decode"):
            for n_slices in (1, 2):
                g = torch.Generator().manual_seed(1)
                S = len(ranks)
                a = torch.randn(n_slices, S, R, d_in, generator=g) / d_in ** 0.5
                b = torch.randn(n_slices, S, d_out, R, generator=g) / R ** 0.5
                for s, r in enumerate(ranks):
                    a[:, s, r:] = float("nan")
                    b[:, s, :, r:] = float("nan")
                lens = [ln if layout == "prefill" else 1 for ln, _, _ in reqs]
                qsl = torch.tensor([0] + lens).cumsum(0)
                slots = torch.full((len(reqs), 8), -1)
                wts = torch.zeros(len(reqs), 8)
                none_rows = []
                for q, (_, sl, ws) in enumerate(reqs):
                    slots[q, :len(sl)] = torch.tensor(sl, dtype=torch.long)
                    wts[q, :len(ws)] = torch.tensor(ws)
                    none_rows += [not any(s >= 0 for s in sl)] * lens[q]
                T = int(qsl[-1])
                x = torch.randn(T, d_in, generator=g).to(dtype)
                y0 = torch.randn(T, n_slices * d_out, generator=g).to(dtype)
                a, b = a.to(dtype), b.to(dtype)
                meta = DeltaMeta(T, len(reqs), 8, device)
                meta.fill(qsl, slots, wts)
                y = y0.to(device, copy=True)          # .to(cpu) alone would alias y0
                apply_delta(y, x.to(device), a.to(device), b.to(device),
                            torch.tensor(ranks, dtype=torch.int32, device=device), meta)
                y = y.cpu()
                ref = dense_delta_reference(y0, x, a, b, ranks, qsl, slots, wts)
                none = torch.tensor(none_rows)
                err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                ok = (bool(torch.isfinite(y).all()) and torch.equal(y[none], y0[none]) and err <= TOL[dtype])
                rows.append(dict(dtype=str(dtype), layout=layout, n_slices=n_slices, rel_err=err, ok=ok))
    return rows


def graph_replay_cases(device, dtypes, d_in=96, d_out=80, R=16) -> list[dict]:
    """A CUDA graph captured while no token has a slot (as vLLM's start-up dummy batches), replayed
    after the metadata buffers were refilled in place with real batches: the replay must equal the
    dense reference for each batch (decode layout, 8 tokens; slots, weights and ranks vary), and
    rows without a slot stay bit-exact. This is what graph-safe mode (no host decision from a step's
    contents) exists for."""
    rows = []
    for dtype in dtypes:
        g = torch.Generator().manual_seed(2)
        S, T, K = 6, 8, 3
        ranks = [16, 4, 8, 1, 0, 12]
        a = (torch.randn(2, S, R, d_in, generator=g) / d_in ** 0.5).to(dtype)
        b = (torch.randn(2, S, d_out, R, generator=g) / R ** 0.5).to(dtype)
        ranks_t = torch.tensor(ranks, dtype=torch.int32, device=device)
        a_d, b_d = a.to(device), b.to(device)
        meta = DeltaMeta(T, T, K, device)          # graph_safe: the default on CUDA
        qsl = torch.arange(T + 1)
        meta.fill(qsl, torch.full((T, K), -1), torch.zeros(T, K))
        x_s = torch.zeros(T, d_in, dtype=dtype, device=device)
        y_s = torch.zeros(T, 2 * d_out, dtype=dtype, device=device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):              # warm-up outside capture (Triton compiles here)
            apply_delta(y_s, x_s, a_d, b_d, ranks_t, meta)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            apply_delta(y_s, x_s, a_d, b_d, ranks_t, meta)
        for case in range(3):
            slots = torch.randint(-1, S, (T, K), generator=g)
            slots[0] = -1                          # one row without any slot
            wts = torch.rand(T, K, generator=g) + 0.25
            x = torch.randn(T, d_in, generator=g).to(dtype)
            y0 = torch.randn(T, 2 * d_out, generator=g).to(dtype)
            meta.fill(qsl, slots, wts)
            x_s.copy_(x)
            y_s.copy_(y0)
            graph.replay()
            torch.cuda.synchronize()
            y = y_s.cpu()
            ref = dense_delta_reference(y0, x, a, b, ranks, qsl, slots, wts)
            none = (slots < 0).all(1) | torch.tensor([all(ranks[int(s)] == 0 for s in r if s >= 0) for r in slots])
            err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
            ok = bool(torch.isfinite(y).all()) and torch.equal(y[none], y0[none]) and err <= TOL[dtype]
            rows.append(dict(dtype=str(dtype), layout="graph-replay", n_slices=2, case=case, rel_err=err, ok=ok))
    return rows


def time_fn(fn, device, reps: int) -> float:
    """Median milliseconds per call (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e))
        return sorted(ts)[len(ts) // 2]
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[len(ts) // 2]


def timing(device, H, F, n_tokens, n_distinct, ks, rank, dtype, reps) -> list[dict]:
    rows = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_bandwidth(name)
    for K in ks:
        p = make_decode_problem(H, F, n_tokens, n_distinct, K, rank, dtype, device)
        gu, Fh = ffn_base(p)
        act = (torch.nn.functional.silu(gu[:, :Fh]) * gu[:, Fh:]).contiguous()
        y_gu, y_d = gu.clone(), (act @ p["w_d"].t())
        t_base = time_fn(lambda: ffn_with_delta(p, False), device, reps)
        t_full = time_fn(lambda: ffn_with_delta(p, True), device, reps)
        t_delta = time_fn(lambda: delta_only(p, y_gu, y_d, act), device, reps)
        by = step_bytes(H, F, [rank] * n_distinct, torch.finfo(dtype).bits // 8)
        row = dict(K=K, tokens=n_tokens, distinct_shards=n_distinct, rank=rank, device=name,
                   ms_base=t_base, ms_base_plus_delta=t_full, ms_delta=t_delta, **by,
                   achieved_GBps_full=by["total_bytes"] / (t_full * 1e-3) / 1e9,
                   achieved_GBps_delta=by["shard_bytes"] / (t_delta * 1e-3) / 1e9)
        if peak:
            row.update(peak_GBps=peak / 1e9, limit_ms_full=by["total_bytes"] / peak * 1e3,
                       limit_ms_delta=by["shard_bytes"] / peak * 1e3,
                       frac_of_limit_full=(by["total_bytes"] / peak * 1e3) / t_full)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke run of the logic)")
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 3, 8])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=str(RESULTS / "kernels_gpu.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    t0 = time.time()
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    checks = correctness_cases(device, dtypes)
    if device.type == "cuda":
        checks += graph_replay_cases(device, dtypes)
    for c in checks:
        print(("OK  " if c["ok"] else "FAIL") + f" {c['dtype']:15s} {c['layout']:7s} slices={c['n_slices']} "
              f"rel_err={c['rel_err']:.2e}", flush=True)
    H, F, rank, n_tok, n_dist = (64, 128, 8, 8, 8) if args.tiny else (3072, 8192, 16, 64, 64)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    rows = timing(device, H, F, n_tok, n_dist, args.ks, rank, dtype, 5 if args.tiny else args.reps)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "machine": describe(args.device), "checks": checks, "timing": rows, "seconds": time.time() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
