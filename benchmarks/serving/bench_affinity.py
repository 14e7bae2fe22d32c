"""Shard-affinity routing under data parallelism: pool hit rate and throughput with and without it.

One `vllm serve --data-parallel-size 2` with WRAG, run twice on the same store and the same request
list: once with `dp_affinity` on (the front end sends each request to the engine its sorted shard
set hashes to, serving/affinity.py) and once off (vLLM's own balancing: the least-loaded engine).
The workload has more distinct shard sets than one engine's pool holds: SETS sets of K shards each
(explicit `wrag_shards`, svd-centered), every request drawn uniformly from them, `--clients`
closed-loop clients. Each set is one composite, one pool slot; a request whose set is not in its
engine's pool loads it (wrag_pool_loads_total, summed over the engines' workers), so

    pool hit rate = 1 − Δ pool loads / requests          (measured after a warm-up pass over every set)

With affinity an engine sees about SETS / 2 sets, which fit in its SLOTS; without, each engine sees
all SETS and its pool keeps only SLOTS of them.

    python -m benchmarks.serving.bench_affinity                    # tiny model: 12 sets, 8 slots per engine
    python -m benchmarks.serving.bench_affinity --model smollm2    # SmolLM2-135M, rank-8 shards

Writes benchmarks/results/affinity.{json,md,png}.
"""
from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from benchmarks.serving import serving_common as sc


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    p.add_argument("--sets", type=int, default=12, help="distinct shard sets in the workload")
    p.add_argument("--k", type=int, default=3, help="shards per set")
    p.add_argument("--slots", type=int, default=8, help="pool slots per engine")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--dtype", default=None, help="default: float32 (tiny), bfloat16 (smollm2)")
    p.add_argument("--eager", action="store_true")
    p.add_argument("--out", default="affinity")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from wrag_vllm.fingerprint import fingerprint_dir
    from wrag_vllm.serving.affinity import preferred_rank, set_key
    from wrag_vllm.store import ShardStore

    dtype = args.dtype or ("float32" if args.model == "tiny" else "bfloat16")
    work = Path(tempfile.mkdtemp(prefix="wrag-bench-affinity-"))
    runs, t_all = {}, time.time()
    try:
        model_dir, model_desc = sc.base_model(args.model, work)
        fp = fingerprint_dir(model_dir)
        shards = sc.make_shards(fp, args.sets * args.k, args.rank)
        with ShardStore(work / "store") as store:
            store.add_many(shards)
        sets = [[s.id for s in shards[i * args.k:(i + 1) * args.k]] for i in range(args.sets)]
        split = [sum(preferred_rank(set_key([SimpleNamespace(ids=s)]), 2) == r for s in sets) for r in (0, 1)]
        rng = random.Random(7)
        prompts = [t for _, t in sc.topics(32)]

        def body(s, i):
            return sc.completion_body("model", f"Tell me about {prompts[i % len(prompts)]}.", args.max_tokens,
                                      {"wrag_shards": ",".join(s), "wrag_method": "svd-centered"})

        warm = [body(s, i) for i, s in enumerate(sets)]
        reqs = [body(rng.choice(sets), i) for i in range(args.requests)]
        wrag = {"slots": args.slots, "k_max": args.k, "max_rank": args.k * args.rank, "top_k": args.k,
                "threshold": 0.0, "method": "svd-centered"}
        for name, on in (("affinity", True), ("default", False)):
            srv = sc.Server(model_dir, work, name=name, dtype=dtype, max_model_len=256,
                            max_num_seqs=args.clients, kv_bytes=64 << 20, eager=args.eager,
                            wrag={**wrag, "dp_affinity": on}, store_dir=work / "store",
                            extra_args=["--data-parallel-size", "2"])
            srv.log_stem = args.out
            with sc.running(srv):
                sc.run_load(srv.base_url, warm, args.clients)  # every set composed and loaded once
                m0 = sc.scrape_metrics(srv.base_url)
                r = sc.run_load(srv.base_url, reqs, args.clients)
                d = sc.metrics_delta(m0, sc.scrape_metrics(srv.base_url))
            if "wrag_pool_loads_total" not in d:
                raise RuntimeError(f"the server's /metrics has no wrag_pool_loads_total: {sorted(d)}")
            loads = d["wrag_pool_loads_total"]
            runs[name] = {"pool_loads": loads, "pool_evictions": d["wrag_pool_evictions_total"],
                          "hit_rate": 1.0 - loads / args.requests, "output_tok_s": r["output_tok_s"],
                          "req_s": r["req_s"], "ttft_p50_ms": r["ttft_p50_ms"], "itl_p50_ms": r["itl_p50_ms"],
                          "e2e_p50_ms": r["e2e_p50_ms"], "loadavg": [r["loadavg_1m_before"], r["loadavg_1m_after"]],
                          "startup_s": srv.startup_s}
            print(f"[bench] {name}: hit rate {100 * runs[name]['hit_rate']:.1f} %, "
                  f"{r['output_tok_s']:.1f} tok/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a, b = runs["affinity"], runs["default"]
    data = {"machine": sc.machine(), "settings": dict(vars(args), model=model_desc, dtype=dtype, sets_per_rank=split),
            "runs": runs, "throughput_ratio": a["output_tok_s"] / b["output_tok_s"],
            "target": {"hit_rate >= 0.90": a["hit_rate"] >= 0.90,
                       "throughput >= 1.3x": a["output_tok_s"] / b["output_tok_s"] >= 1.3},
            "total_s": time.time() - t_all}
    md = sc.md_table(["routing", "pool hit rate", "pool loads", "out tok/s", "req/s", "TTFT p50 ms", "ITL p50 ms"],
                     [[n, f"{100 * x['hit_rate']:.1f} %", x["pool_loads"], x["output_tok_s"], x["req_s"],
                       x["ttft_p50_ms"], x["itl_p50_ms"]] for n, x in runs.items()])
    md += (f"\n\n{args.sets} shard sets of {args.k} ({args.model}, rank {args.rank}, svd-centered composites), "
           f"{args.slots} pool slots per engine, 2 data-parallel engines, {args.clients} clients, "
           f"{args.requests} requests drawn uniformly from the sets after a warm-up pass. The rendezvous hash "
           f"puts {split[0]} sets on engine 0 and {split[1]} on engine 1. Throughput with affinity / "
           f"without: {data['throughput_ratio']:.2f}× (targets: hit rate ≥ 90 %, ≥ 1.3×).\n")
    paths = sc.write_results(args.out, data, md)
    plot(runs, Path(paths["png"]), data)
    print(md)
    return 0


def plot(runs: dict, path: Path, data: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.8))
    ax[0].bar(names, [100 * runs[n]["hit_rate"] for n in names], color=["tab:green", "tab:gray"])
    ax[0].axhline(90, color="red", lw=1, label="target 90 %")
    ax[0].set_ylabel("pool hit rate %"); ax[0].set_ylim(0, 105); ax[0].legend()
    ax[1].bar(names, [runs[n]["output_tok_s"] for n in names], color=["tab:green", "tab:gray"])
    ax[1].set_ylabel("output tokens/s")
    s = data["settings"]
    fig.suptitle(f"DP=2, {s['sets']} sets × {s['k']} shards, {s['slots']} slots/engine | {s['model'][:40]} | "
                 f"{data['machine']['cpu'][:40]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
