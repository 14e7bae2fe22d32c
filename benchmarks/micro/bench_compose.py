"""Composition latency: factor space (what the server runs) vs the dense reference.

Shape set: a Llama-3.2-3B-like base (hidden 3072, FFN 8192, 28 layers), every layer's gate_proj,
up_proj and down_proj, shards of rank 16, k = 1…8 shards per composite.

    factor space   wrag_vllm.compose.compose() on all 28×3 projections, median of --repeats runs
    dense          materialise each ΔW_i = s_i·B_i·A_i (d_out×d_in) and do the method's math densely
                   (wrag_vllm.compose.dense_reference). Too slow to run on all 84 projections on a
                   CPU, so it is TIMED ON A SUBSET AND SCALED (the output says which subset):
                     linear:        all 3 projections of --dense-layers layers, × 28/dense_layers
                     svd-centered:  layer 0 gate_proj only (k full SVDs of 8192×3072), × 84
                                    (up_proj has the same shape; down_proj is its transpose, and a
                                    thin SVD costs the same either way), only for k in --dense-svd-ks

Writes benchmarks/results/compose_<device>.{json,png,md} with a machine description.
GPU:  python -m benchmarks.micro.bench_compose --device cuda       (target ≤ 10 ms per composite on an H100)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import RESULTS
from benchmarks.machine import describe
from wrag_vllm.compose import compose, dense_reference
from wrag_vllm.fingerprint import BaseFingerprint
from wrag_vllm.shard import FFN_MODULES, Factors, Shard


def make_shards(k: int, base: BaseFingerprint, rank: int, device: str) -> list[Shard]:
    out = []
    for i in range(k):
        g = torch.Generator().manual_seed(1000 + i)
        fs = {}
        for layer in range(base.num_layers):
            for m in FFN_MODULES:
                d_in, d_out = ((base.hidden_size, base.intermediate_size) if m != "down_proj"
                               else (base.intermediate_size, base.hidden_size))
                A = (torch.randn(rank, d_in, generator=g) / d_in ** 0.5).to(device)
                B = (torch.randn(d_out, rank, generator=g) / rank ** 0.5 * 0.01).to(device)
                fs[(layer, m)] = Factors(A, B, 2.0)
        out.append(Shard(f"shard-{i}", base, fs))
    return out


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, device, repeats=1):
    ts, res = [], None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        res = fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts, res


def rel_err(comp: Shard, ref: dict) -> float:
    num = sum(float((comp.factors[k].delta().double() - r.double()).norm() ** 2) for k, r in ref.items())
    den = sum(float(r.double().norm() ** 2) for r in ref.values())
    return (num / den) ** 0.5


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--ks", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--methods", default="linear,svd-centered")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-layers", type=int, default=1, help="layers the dense linear reference is timed on")
    ap.add_argument("--dense-svd-ks", default="3", help="k values for the (slow) dense svd-centered reference")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for both sides (default: torch's). On an oversubscribed "
                         "CPU host, 1 avoids OpenMP spin-wait stalls that make timings meaningless")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dev = args.device
    ks = [int(x) for x in args.ks.split(",")]
    methods = args.methods.split(",")
    svd_ks = {int(x) for x in args.dense_svd_ks.split(",") if x}
    base = BaseFingerprint("LlamaForCausalLM", args.hidden, args.ffn, args.layers, "0" * 32)
    n_proj = args.layers * len(FFN_MODULES)
    info = describe(dev)
    print(json.dumps(info))
    shards_all = make_shards(max(ks), base, args.rank, dev)
    compose(shards_all[:2], [0.5, 0.5], "svd-centered")   # warm-up (allocator, LAPACK/cuSOLVER init)

    rows = []
    for k in ks:
        sh, w = shards_all[:k], [1.0 / (i + 1) for i in range(k)]
        row = {"k": k}
        for m in methods:
            t, ts, comp = timed(lambda: compose(sh, w, m), dev, args.repeats)
            row[f"factor_{m}_s"] = t
            row[f"factor_{m}_runs_s"] = ts
            row[f"factor_{m}_rank"] = comp.rank
        # dense linear on a subset of layers, scaled to the whole model
        lkeys = [(l, p) for l in range(args.dense_layers) for p in FFN_MODULES]
        t, _, ref = timed(lambda: dense_reference(sh, w, "linear", dtype=torch.float32, keys=lkeys), dev)
        row["dense_linear_subset_s"] = t
        row["dense_linear_s"] = t * args.layers / args.dense_layers
        if "linear" in methods:
            row["linear_rel_err"] = rel_err(compose(sh, w, "linear"), ref)
            row["speedup_linear"] = row["dense_linear_s"] / row["factor_linear_s"]
        del ref
        if k in svd_ks:
            skeys = [(0, "gate_proj")]
            t, _, ref = timed(lambda: dense_reference(sh, w, "svd-centered", dtype=torch.float32, keys=skeys), dev)
            row["dense_svd-centered_subset_s"] = t
            row["dense_svd-centered_s"] = t * n_proj
            if "svd-centered" in methods:
                row["svd-centered_rel_err"] = rel_err(compose(sh, w, "svd-centered"), ref)
                row["speedup_svd-centered"] = row["dense_svd-centered_s"] / row["factor_svd-centered_s"]
            del ref
        rows.append(row)
        print(json.dumps({k_: v for k_, v in row.items() if not k_.endswith("runs_s")}), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if dev == "cpu" else dev.split(":")[0]
    result = {
        "benchmark": "compose", "machine": info,
        "shape": {"hidden": args.hidden, "ffn": args.ffn, "layers": args.layers, "projections": n_proj,
                  "rank": args.rank, "dtype": "float32"},
        "weights": "w_i = 1/i (i = 1..k)",
        "dense_scaling": {
            "linear": f"timed on all 3 projections of {args.dense_layers} layer(s), × {args.layers / args.dense_layers:g}",
            "svd-centered": f"timed on layer 0 gate_proj only, × {n_proj} (up/down have the same SVD cost), "
                            f"k in {sorted(svd_ks)} only",
        },
        "factor_space": f"all {n_proj} projections, median of {args.repeats} runs",
        "rows": rows,
    }
    (out / f"compose_{tag}.json").write_text(json.dumps(result, indent=2))
    write_md(out / f"compose_{tag}.md", result, methods)
    plot(out / f"compose_{tag}.png", result, methods)
    print(f"wrote {out}/compose_{tag}.{{json,md,png}}")
    return 0


def write_md(path: Path, r: dict, methods) -> None:
    m = r["machine"]
    lines = [f"# Composition latency ({m['device']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
             f"vllm {m['vllm']}" + (f", GPU {m['gpu']}" if m.get("gpu") else "")
             + f"; load average at start {m['load_avg']}.", "",
             f"Shape: hidden {r['shape']['hidden']}, FFN {r['shape']['ffn']}, {r['shape']['layers']} layers × 3 "
             f"projections, rank {r['shape']['rank']} shards, fp32; weights {r['weights']}.", "",
             f"Factor space: {r['factor_space']}. Dense reference (materialise every ΔW_i): "
             f"linear {r['dense_scaling']['linear']}; svd-centered {r['dense_scaling']['svd-centered']}.", "",
             "| k | " + " | ".join(f"factor {x} (ms)" for x in methods)
             + " | dense linear (ms, scaled) | speed-up linear | dense svd-centered (ms, scaled) | speed-up svd-centered"
               " | composite rank (svd-centered) |",
             "|---" * (len(methods) + 6) + "|"]

    def f(v, fmt="{:.1f}"):
        return fmt.format(v) if v is not None else "—"

    for row in r["rows"]:
        lines.append("| " + " | ".join([str(row["k"])] + [f(row.get(f"factor_{x}_s", 0) * 1e3) for x in methods]
                                       + [f(row["dense_linear_s"] * 1e3, "{:.0f}"),
                                          f(row.get("speedup_linear"), "{:.1f}×"),
                                          f(row.get("dense_svd-centered_s") and row["dense_svd-centered_s"] * 1e3,
                                            "{:.0f}"),
                                          f(row.get("speedup_svd-centered"), "{:.0f}×"),
                                          str(row.get("factor_svd-centered_rank", "—"))]) + " |")
    errs = [(row["k"], row.get("linear_rel_err"), row.get("svd-centered_rel_err")) for row in r["rows"]]
    lines += ["", "Relative error factor space vs dense (on the timed subset): "
              + "; ".join(f"k={k}: linear {a:.1e}" + (f", svd-centered {b:.1e}" if b is not None else "")
                          for k, a, b in errs if a is not None)]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, r: dict, methods) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["rows"]
    ks = [row["k"] for row in rows]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m, mk in zip(methods, ("o", "s", "^", "v")):
        ax.plot(ks, [row[f"factor_{m}_s"] * 1e3 for row in rows], marker=mk, label=f"factor space: {m}")
    ax.plot(ks, [row["dense_linear_s"] * 1e3 for row in rows], "k--", marker="x", label="dense: linear (scaled)")
    sv = [(row["k"], row["dense_svd-centered_s"] * 1e3) for row in rows if "dense_svd-centered_s" in row]
    if sv:
        ax.plot(*zip(*sv), "r*", markersize=12, linestyle="none", label="dense: svd-centered (scaled)")
    ax.set_yscale("log")
    ax.set_xlabel("k (shards per composite)")
    ax.set_ylabel("latency per composite (ms, log)")
    ax.set_title(f"compose, {r['shape']['layers']}×3 projections {r['shape']['hidden']}↔{r['shape']['ffn']}, "
                 f"r={r['shape']['rank']} ({r['machine']['device']})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    for key, lab, mk in (("speedup_linear", "linear", "o"), ("speedup_svd-centered", "svd-centered", "*")):
        pts = [(row["k"], row[key]) for row in rows if key in row]
        if pts:
            ax2.plot(*zip(*pts), marker=mk, markersize=10 if mk == "*" else 6, label=f"dense / factor: {lab}")
    ax2.axhline(20, color="gray", linestyle=":", label="target 20× at k=3")
    ax2.set_yscale("log")
    ax2.set_xlabel("k")
    ax2.set_ylabel("speed-up (×, log)")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"{r['machine']['cpu']} · torch {r['machine']['torch']} · {r['machine']['torch_threads']} threads"
                 + (f" · {r['machine']['gpu']}" if r["machine"].get("gpu") else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
