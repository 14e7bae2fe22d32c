"""Server memory vs registered shards: does registering 10 → 100,000 shards grow the server?

One `vllm serve` with WRAG on the store; shards are bulk-registered by this process while the server
runs (ShardStore.add_many with their vectors given, so each gets the fixed cosine head: fitting 10⁵
heads would take hours here, and a head is d + 1 floats whichever way it was made), and the server
picks them up through the store's watcher and generation check (GET /wrag/shards confirms the count
it sees at the end). The vectors are the MiniLM embeddings of the descriptions for the shards that
retrieval is checked on (the first size's, and each size's newest) and random unit vectors for the
rest: an index row costs the same whatever its values, and embedding 10⁵ descriptions would take
most of the run.

    1. Baseline, at the first size: the work, `--warm-rounds` + 1 times (80 retrievals of the same
       texts, then a short throughput run: N streaming clients, requests naming the same k = 3
       svd-centered sets of the first shards). Memory after each round: the last two rounds show how
       much one more round of the same work moves it with no shard registered (the noise floor).
    2. For each further size n ∈ {100, 1,000, 10,000, 100,000}: register shards up to n, make both
       server processes see them (one retrieval for the newest shard through the API server's
       index, one request naming a set through the engine core's catalog), the same 80
       retrievals, then memory. No throughput run in between: what can grow is what registration
       adds.
    3. After the last size, the throughput run once more, then memory ("after work"): whether
       serving over the full store grows what the baseline's work did not.
Memory is that of the server's process tree: Σ RSS and Σ PSS (psutil, API server + engine core +
workers), and the GPU memory of those processes (nvidia-smi) when there is a GPU.
Growth = (mem(n_max) − mem(baseline)) / mem(baseline). The device pool is fixed-size (slots ×
max_rank per FFN layer), so growth can only come from the catalogue/index (the API server searches
the index; the engine core reads the catalogue by id) and from caches of the shards actually used.

    .venv/bin/python -m benchmarks.serving.bench_memory          # tiny model (fast start), CPU default
    .venv/bin/python -m benchmarks.serving.bench_memory --model llama-1b --clients 32 ...   (GPU)
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.serving import serving_common as sc


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2", "llama-1b", "llama-3b"])
    p.add_argument("--sizes", default="10,100,1000,10000,100000")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=64, help="requests per throughput run")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--kv-mib", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--eager", action="store_true")
    p.add_argument("--warm-rounds", type=int, default=3, help="extra rounds of the work before the first size's baseline")
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
        from tests.helpers_shards import random_shard
        from wrag_vllm.embed import get_embedder

        emb, descs = get_embedder(), [f"{d}: {t}" for d, t in sc.topics(max(sizes))]
        embedded = set(range(sizes[0])) | {n - 1 for n in sizes}  # MiniLM vectors; random unit vectors elsewhere
        vrng = np.random.default_rng(5)

        def batch_of(a: int, b: int):
            """Shards a..b-1 (those sc.make_shards makes) and their vectors."""
            shards = [random_shard(fp, f"sh{i:05d}", rank=args.rank, seed=1000 + i, description=descs[i])
                      for i in range(a, b)]
            vecs = vrng.standard_normal((b - a, emb.dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            real = [i for i in range(a, b) if i in embedded]
            if real:
                vecs[[i - a for i in real]] = emb.embed([descs[i] for i in real])
            return shards, vecs

        t_make = 0.0
        store = ShardStore(work / "store")
        srv = None
        have = 0
        # The same texts and sets at every size: the caches of the shards in use (bounded, but filled
        # by whichever shards a retrieval or a request names) hold the same shards at every size.
        texts = [sc.QUESTIONS[j % 4].format(t=t) for j, (_, t) in enumerate(sc.topics(sizes[0]) * 8)]
        sets = [f"sh{j:05d},sh{j + 1:05d},sh{j + 2:05d}" for j in range(sizes[0] - 2)]
        reqs = [sc.completion_body("model", texts[i % len(texts)], args.max_tokens,
                                   {"wrag_shards": sets[i % len(sets)], "wrag_method": "svd-centered"})
                for i in range(args.requests)]
        warm = []  # Σ RSS after each round of the work at the first size
        for n in sizes:
            t_reg = 0.0  # add_many alone, not making the shards
            for i in range(have, n, args.batch):
                t1 = time.time()
                shards, vecs = batch_of(i, min(n, i + args.batch))
                t2 = time.time()
                store.add_many(shards, embeddings=vecs)
                t_make, t_reg = t_make + t2 - t1, t_reg + time.time() - t2
            have = n
            if srv is None:
                sc.Server.log_stem = args.out
                srv = sc.Server(model_dir, work, name="mem", eager=args.eager, dtype=args.dtype,
                                max_model_len=args.max_model_len, max_num_seqs=args.clients,
                                kv_bytes=args.kv_mib << 20, wrag=wrag_cfg(args, work / "store"),
                                store_dir=work / "store", extra_args=args.extra_server_args.split(),
                                served_name="model")
                startup = srv.wait_ready(900)
                print(f"[bench] server ready in {startup:.0f} s", flush=True)
            # both server processes see the new catalogue: a retrieval of the newest shard (API
            # server) and a request naming it (engine core); the full listing only at the end
            hit = retrieve(srv, sc.QUESTIONS[0].format(t=sc.topics(n)[-1][1]))
            sc.run_load(srv.base_url, [sc.completion_body("model", texts[0], 2,
                                                          {"wrag_shards": f"sh{n - 1:05d}"})], 1)
            r = None
            for _ in range(1 + args.warm_rounds if n == sizes[0] else 0):
                retrieved = [retrieve(srv, t) for t in texts]
                r = sc.run_load(srv.base_url, reqs, args.clients)
                warm.append(sc.tree_memory(srv.proc.pid)["rss_mib"])
            retrieved = [retrieve(srv, t) for t in texts]
            mem = sc.tree_memory(srv.proc.pid)
            met = sc.scrape_metrics(srv.base_url)
            row = {"shards": n, "newest_retrieved": hit, "retrieved_first_topics": sum(
                       x == f"sh{j % sizes[0]:05d}" for j, x in enumerate(retrieved)) / len(retrieved),
                   "per_process": mem["per_process"], "register_s": t_reg, "rss_mib": mem["rss_mib"],
                   "pss_mib": mem["pss_mib"], "gpu_mib": mem["gpu_mib"], "processes": mem["processes"],
                   "store_disk_mib": sum(p.stat().st_size for p in (work / "store").rglob("*") if p.is_file()) / 2**20,
                   "pool_loads": met.get("wrag_pool_loads_total"), "pool_evictions": met.get("wrag_pool_evictions_total")}
            if r is not None:
                row.update(output_tok_s=r["output_tok_s"], ttft_p50_ms=r["ttft_p50_ms"], itl_p50_ms=r["itl_p50_ms"])
            rows.append(row)
            print(f"[bench] n={n:6d} RSS {row['rss_mib']:8.1f} MiB PSS {row['pss_mib']:8.1f} MiB "
                  f"(register {t_reg:.0f} s)", flush=True)
        r = sc.run_load(srv.base_url, reqs, args.clients)  # the work once more, over the full store
        after = sc.tree_memory(srv.proc.pid)
        after_work = {"rss_mib": after["rss_mib"], "pss_mib": after["pss_mib"], "per_process": after["per_process"],
                      "output_tok_s": r["output_tok_s"], "ttft_p50_ms": r["ttft_p50_ms"]}
        server_sees = server_count(srv)       # after the last measurement (list() allocates)
        srv_info = {"startup_s": startup, "cmd": srv.cmd, "env": srv.env_used, "log_tail": srv.tail(5)}
    finally:
        if 'srv' in locals() and srv is not None:
            srv.stop()
        shutil.rmtree(work, ignore_errors=True)
    first, last = rows[0], rows[-1]
    growth = {k: (last[k] - first[k]) / first[k] for k in ("rss_mib", "pss_mib")}
    growth["rss_after_work"] = (after_work["rss_mib"] - first["rss_mib"]) / first["rss_mib"]
    growth["rss_noise_one_round"] = (warm[-1] - warm[-2]) / warm[-2] if len(warm) > 1 else None
    if first.get("gpu_mib"):
        growth["gpu_mib"] = (last["gpu_mib"] - first["gpu_mib"]) / first["gpu_mib"]
    settings = dict(vars(args), model=model_desc, wrag=wrag_cfg(args, "<tmp>"),
                    pool_bytes_fixed=pool_bytes(fp, args), make_shards_s=t_make)
    data = {"machine": sc.machine(), "settings": settings, "server": srv_info, "rows": rows, "warm_rss_mib": warm,
            "after_work": after_work, "server_sees": server_sees, "growth_first_to_last": growth,
            "target": {"rss growth <= 1%": growth["rss_mib"] <= 0.01}, "total_s": time.time() - t_all}
    md = sc.md_table(["registered", "newest retrieved", "first topics retrieved", "Σ RSS MiB", "Σ PSS MiB",
                      "GPU MiB", "register s", "store disk MiB"],
                     [[r["shards"], r["newest_retrieved"], f"{100 * r['retrieved_first_topics']:.0f} %", r["rss_mib"],
                       r["pss_mib"], r["gpu_mib"] if r["gpu_mib"] is not None else "-", r["register_s"],
                       r["store_disk_mib"]] for r in rows])
    md += (f"\n\nGrowth {sizes[0]} → {sizes[-1]} registered shards: RSS **{100 * growth['rss_mib']:+.2f} %**, "
           f"PSS {100 * growth['pss_mib']:+.2f} %" + (f", GPU {100 * growth['gpu_mib']:+.2f} %" if "gpu_mib" in growth else "")
           + f" (target: RSS +1 % at most). Σ RSS after each round of the work at {sizes[0]} shards: "
           + " → ".join(f"{x:.0f}" for x in warm) + " MiB"
           + (f" (one more round of the same work: {100 * growth['rss_noise_one_round']:+.2f} %)"
              if growth["rss_noise_one_round"] is not None else "")
           + f". After the throughput run once more at {sizes[-1]} shards: Σ RSS {after_work['rss_mib']:.0f} MiB "
           f"({100 * growth['rss_after_work']:+.2f} % from the baseline), {after_work['output_tok_s']:.0f} tok/s. "
           f"Server sees {server_sees} shards at the end. Fixed device pool: {pool_bytes(fp, args) / 2**20:.1f} MiB. "
           f"Server startup {startup:.0f} s.\n")
    before = {p["pid"]: p for p in first["per_process"]}

    def per_process(procs):
        return "; ".join(f"{p['name']} {before[p['pid']]['rss_mib']:.0f} → {p['rss_mib']:.0f} "
                         f"({100 * (p['rss_mib'] - before[p['pid']]['rss_mib']) / before[p['pid']]['rss_mib']:+.2f} %)"
                         for p in procs if p["pid"] in before)
    md += (f"\nPer process, RSS from the baseline to {sizes[-1]} shards (MiB): {per_process(last['per_process'])}; "
           f"after the throughput run once more: {per_process(after_work['per_process'])}.\n")
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
    names = {}
    for r in rows:  # per process: the API server, the engine core, the workers
        for q in r["per_process"]:
            names.setdefault((q["pid"], q["name"]), {})[r["shards"]] = q["rss_mib"]
    for (pid, name), by in names.items():
        if min(by.values()) > 50:
            base = by.get(n[0]) or next(iter(by.values()))
            ax[1].plot(list(by), [v - base for v in by.values()], "o-", label=f"{name} ({base:.0f} MiB)")
    ax[1].set_xscale("log"); ax[1].set_xlabel("registered shards"); ax[1].set_ylabel("RSS − baseline (MiB)")
    ax[1].legend(fontsize=8); ax[1].set_title("growth per process")
    s = data["settings"]
    fig.suptitle(f"{s['model']} | r={s['rank']} | N={s['clients']} | {data['machine']['cpu'][:40]} "
                 f"GPU={data['machine']['gpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
