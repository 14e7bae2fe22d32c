"""Server memory vs registered shards: does registering 10 → 10,000 shards grow the server?

One `vllm serve` with WRAG on the store; shards are bulk-registered (ShardStore.add_many, MiniLM
embeddings of the descriptions) by this process while the server runs, and the server picks them up
through the store's generation check (Resolver.refresh on every request; GET /wrag/shards confirms
the count it sees). At each size n ∈ {10, 100, 1,000, 10,000}:
    1. register shards up to n, make the server see them;
    2. a short throughput run (N streaming clients, k = 3 svd-centered, queries spread over the
       registered topics);
    3. memory of the server's process tree: Σ RSS and Σ PSS (psutil, API server + engine core +
       workers), and the GPU memory of those processes (nvidia-smi) when there is a GPU.
Growth = (mem(n_max) − mem(n_min)) / mem(n_min). The device pool is fixed-size (slots × max_rank
per FFN layer), so growth can only come from the catalogue/index (API server + engine core each
open the store) and from caches of the shards actually used.

    .venv/bin/python -m benchmarks.serving.bench_memory          # tiny model (fast start), CPU default
    .venv/bin/python -m benchmarks.serving.bench_memory --model llama-1b --clients 32 ...   (GPU)
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.serving import serving_common as sc


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2", "llama-1b", "llama-3b"])
    p.add_argument("--sizes", default="10,100,1000,10000")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=64, help="requests per throughput run")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--kv-mib", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--eager", action="store_true")
    p.add_argument("--batch", type=int, default=1000, help="shards per add_many call")
    p.add_argument("--extra-server-args", default="")
    p.add_argument("--out", default="memory")
    return p.parse_args(argv)


def wrag_cfg(args, store_dir):
    return {"store": str(store_dir), "slots": args.slots, "max_rank": 3 * args.rank, "k_max": 4, "top_k": 3,
            "threshold": 0.0, "method": "svd-centered"}


def retrieve(srv, text: str):
    req = urllib.request.Request(srv.base_url + "/wrag/retrieve", data=json.dumps({"text": text, "top_k": 1}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["shards"][0]["id"]


def server_count(srv) -> int:
    with urllib.request.urlopen(srv.base_url + "/wrag/shards", timeout=120) as r:
        return len(json.loads(r.read())["shards"])


def pool_bytes(fp, args) -> int:
    """Bytes of the fixed device pool: per layer gate_up (2 slices) + down (1 slice)."""
    S, R, h, f = args.slots, 3 * args.rank, fp.hidden_size, fp.intermediate_size
    el = 4 if args.dtype == "float32" else 2
    per_layer = 2 * S * R * h + 2 * S * f * R + S * R * f + S * h * R
    return per_layer * fp.num_layers * el


def main(argv=None):
    args = parse(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="wrag-bench-memory-"))
    rows, t_all = [], time.time()
    try:
        from wrag_vllm.fingerprint import fingerprint_dir
        from wrag_vllm.store import ShardStore

        model_dir, model_desc = sc.base_model(args.model, work)
        fp = fingerprint_dir(model_dir)
        t0 = time.time()
        shards = sc.make_shards(fp, max(sizes), args.rank)
        t_make = time.time() - t0
        store = ShardStore(work / "store")
        srv = None
        have = 0
        rng = random.Random(3)
        for n in sizes:
            t0 = time.time()
            for i in range(have, n, args.batch):
                store.add_many(shards[i:min(n, i + args.batch)])
            have = n
            t_reg = time.time() - t0
            if srv is None:
                sc.Server.log_stem = args.out
                srv = sc.Server(model_dir, work, name="mem", eager=args.eager, dtype=args.dtype,
                                max_model_len=args.max_model_len, max_num_seqs=args.clients,
                                kv_bytes=args.kv_mib << 20, wrag=wrag_cfg(args, work / "store"),
                                store_dir=work / "store", extra_args=args.extra_server_args.split(),
                                served_name="model")
                startup = srv.wait_ready(900)
                print(f"[bench] server ready in {startup:.0f} s", flush=True)
            # make both server processes see the new catalogue: one retrieval (API server) and one
            # request (engine core) for the newest topic; the full listing is fetched only at the end
            newest = sc.topics(n)[-1][1]
            hit = retrieve(srv, sc.QUESTIONS[0].format(t=newest))
            sc.run_load(srv.base_url, [sc.completion_body("model", sc.QUESTIONS[0].format(t=newest), 2,
                                                          {"wrag_top_k": 3})], 1)
            mem_before = sc.tree_memory(srv.proc.pid)
            # the same request list at every size (queries about the first topics): the caches of
            # shards/compositions in use are then driven by retrieval results, not by the list
            texts = [sc.QUESTIONS[j % 4].format(t=t) for j, (_, t) in enumerate(sc.topics(min(sizes)) * 8)]
            reqs = [sc.completion_body("model", texts[i % len(texts)], args.max_tokens,
                                       {"wrag_top_k": 3, "wrag_method": "svd-centered"})
                    for i in range(args.requests)]
            sc.run_load(srv.base_url, reqs[: args.clients], args.clients)          # warm-up (compositions)
            r = sc.run_load(srv.base_url, reqs, args.clients)
            mem = sc.tree_memory(srv.proc.pid)
            met = sc.scrape_metrics(srv.base_url)
            row = {"shards": n, "newest_retrieved": hit, "per_process_before_run": mem_before["per_process"],
                   "per_process": mem["per_process"], "register_s": t_reg, "rss_mib": mem["rss_mib"],
                   "pss_mib": mem["pss_mib"], "gpu_mib": mem["gpu_mib"], "rss_before_run_mib": mem_before["rss_mib"],
                   "pss_before_run_mib": mem_before["pss_mib"], "processes": mem["processes"],
                   "store_disk_mib": sum(p.stat().st_size for p in (work / "store").rglob("*") if p.is_file()) / 2**20,
                   "output_tok_s": r["output_tok_s"], "ttft_p50_ms": r["ttft_p50_ms"], "itl_p50_ms": r["itl_p50_ms"],
                   "loadavg": [r["loadavg_1m_before"], r["loadavg_1m_after"]],
                   "pool_loads": met.get("wrag_pool_loads_total"), "pool_evictions": met.get("wrag_pool_evictions_total")}
            rows.append(row)
            print(f"[bench] n={n:6d} RSS {row['rss_mib']:8.1f} MiB PSS {row['pss_mib']:8.1f} MiB "
                  f"{row['output_tok_s']:7.1f} tok/s (register {t_reg:.0f} s)", flush=True)
        for row in rows[-1:]:
            row["server_sees"] = server_count(srv)       # after the last measurement (list() allocates)
        srv_info = {"startup_s": startup, "cmd": srv.cmd, "env": srv.env_used, "log_tail": srv.tail(5)}
    finally:
        if 'srv' in locals() and srv is not None:
            srv.stop()
        shutil.rmtree(work, ignore_errors=True)
    first, last = rows[0], rows[-1]
    growth = {k: (last[k] - first[k]) / first[k] for k in ("rss_mib", "pss_mib", "rss_before_run_mib",
                                                           "pss_before_run_mib")}
    if first.get("gpu_mib"):
        growth["gpu_mib"] = (last["gpu_mib"] - first["gpu_mib"]) / first["gpu_mib"]
    settings = dict(vars(args), model=model_desc, wrag=wrag_cfg(args, "<tmp>"),
                    pool_bytes_fixed=pool_bytes(fp, args), make_shards_s=t_make)
    data = {"machine": sc.machine(), "settings": settings, "server": srv_info, "rows": rows,
            "growth_first_to_last": growth, "target": {"memory growth <= 1%": growth}, "total_s": time.time() - t_all}
    md = sc.md_table(["registered", "newest retrieved", "Σ RSS MiB", "Σ PSS MiB", "GPU MiB", "RSS before run", "out tok/s",
                      "TTFT p50 ms", "register s", "store disk MiB"],
                     [[r["shards"], r["newest_retrieved"], r["rss_mib"], r["pss_mib"], r["gpu_mib"] if r["gpu_mib"] is not None else "-",
                       r["rss_before_run_mib"], r["output_tok_s"], r["ttft_p50_ms"], r["register_s"], r["store_disk_mib"]]
                      for r in rows])
    md += (f"\n\nGrowth {sizes[0]} → {sizes[-1]} shards (after the throughput run): RSS {100 * growth['rss_mib']:+.2f} %, "
           f"PSS {100 * growth['pss_mib']:+.2f} %; before the run (after registration + refresh): RSS "
           f"{100 * growth['rss_before_run_mib']:+.2f} %, PSS {100 * growth['pss_before_run_mib']:+.2f} %"
           + (f", GPU {100 * growth['gpu_mib']:+.2f} %" if "gpu_mib" in growth else "")
           + f". Server sees {rows[-1].get('server_sees')} shards at the end. Fixed device pool: {pool_bytes(fp, args) / 2**20:.1f} MiB. Server startup {startup:.0f} s.\n")
    paths = sc.write_results(args.out, data, md)
    plot(rows, paths["png"], data)
    print(md)
    print(json.dumps(paths))


def plot(rows, path, data):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["shards"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    ax[0].plot(n, [r["rss_mib"] for r in rows], "o-", label="Σ RSS (server tree)")
    ax[0].plot(n, [r["pss_mib"] for r in rows], "s-", label="Σ PSS (server tree)")
    if any(r["gpu_mib"] for r in rows):
        ax[0].plot(n, [r["gpu_mib"] or 0 for r in rows], "^-", label="GPU")
    ax[0].set_xscale("log"); ax[0].set_xlabel("registered shards"); ax[0].set_ylabel("MiB")
    ax[0].set_ylim(0, max(r["rss_mib"] for r in rows) * 1.15); ax[0].legend(); ax[0].set_title("server memory")
    ax[1].plot(n, [r["output_tok_s"] for r in rows], "o-")
    ax[1].set_xscale("log"); ax[1].set_xlabel("registered shards"); ax[1].set_ylabel("output tokens/s")
    ax[1].set_ylim(0, max(r["output_tok_s"] for r in rows) * 1.2); ax[1].set_title("throughput (k=3 svd-centered)")
    s = data["settings"]
    fig.suptitle(f"{s['model']} | r={s['rank']} | N={s['clients']} | {data['machine']['cpu'][:40]} "
                 f"GPU={data['machine']['gpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
