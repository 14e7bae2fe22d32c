"""Shard store at scale: search latency and recall, index memory, open/refresh time, add throughput and disk use up to 100k shards.

Shards are real safetensors files of a tiny random Llama base (2 layers, h=64, ffn=128; rank-2 factors
on gate/up/down). To reach 10,000 shards in minutes the bulk path (`add_many` with precomputed
random unit embeddings) fills the store; the normal path (`add` one shard at a time, with MiniLM
embedding its description) is timed separately on a few hundred shards, and again at full size.

Search latency is `search_vector` (FAISS search, exact rescoring of a compressed index's candidates
and the catalog's id lookup; no query embedding), measured per call with perf_counter; the
text→vector embedding cost is reported separately. Recall@k compares the store's hits with an exact
numpy search over every head, for queries near a stored shard (its vector plus noise, cosine ≈ 0.7:
a question about that shard) and for random unit queries (near-ties everywhere: the hard case).

    python -m benchmarks.micro.bench_store           # 100k shards, writes benchmarks/results/store_scale.*
    python -m benchmarks.micro.bench_store --backend postgresql   # the same on a throwaway PostgreSQL
                                                     # server: store_scale_postgresql.*
    python -m benchmarks.micro.bench_store --n 1000 --checkpoints 10,100,1000 --normal-adds 50
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import RESULTS
from benchmarks.machine import describe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOPICS = ["cardiology", "tax law", "compilers", "french pastry", "astrophysics", "contract law", "genomics",
          "kubernetes", "medieval history", "organic chemistry", "options trading", "oncology", "robotics",
          "linguistics", "marine biology", "cryptography", "architecture", "nutrition", "seismology", "opera"]


def machine() -> dict:
    """describe() plus what the store's speed also depends on: numpy, SQLite, FAISS threads."""
    import sqlite3

    from wrag_vllm.store import FAISS_THREADS

    out = {**describe(), "numpy": np.__version__, "sqlite": sqlite3.sqlite_version,
           "faiss_threads_small_batches": FAISS_THREADS}
    try:
        from benchmarks.pg_cluster import pg_bin
        import subprocess

        out["postgresql"] = subprocess.run([pg_bin("postgres"), "--version"], capture_output=True,
                                           text=True).stdout.strip()
    except (RuntimeError, OSError):
        out["postgresql"] = None
    return out


def tiny_base():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from wrag_vllm.fingerprint import fingerprint_model

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    return fingerprint_model(LlamaForCausalLM(cfg))


def make_shard(base, i: int, rank: int, g):
    import torch

    from wrag_vllm.shard import Factors, Shard

    dims = {"gate_proj": (base.hidden_size, base.intermediate_size),
            "up_proj": (base.hidden_size, base.intermediate_size),
            "down_proj": (base.intermediate_size, base.hidden_size)}
    factors = {(l, m): Factors(torch.randn(rank, d_in, generator=g) * 0.1, torch.randn(d_out, rank, generator=g) * 0.1, 1.0)
               for l in range(base.num_layers) for m, (d_in, d_out) in dims.items()}
    t = TOPICS[i % len(TOPICS)]
    return Shard(id=f"shard-{i:05d}", base=base, factors=factors,
                 description=f"Expert knowledge #{i} on {t}: terminology, procedures and common questions.")


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs), q))


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def unit_rows(rng, n, dim):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100000, help="shards in the store at the end")
    ap.add_argument("--checkpoints", default="10,100,1000,10000,100000", help="store sizes to measure at")
    ap.add_argument("--normal-adds", type=int, default=200, help="one-by-one add() calls with MiniLM embedding")
    ap.add_argument("--queries", type=int, default=1000, help="search_vector calls per checkpoint")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=500, help="shards per add_many call in the bulk fill")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (MiniLM)")
    ap.add_argument("--root", help="store folder (default: a temporary folder, deleted at the end)")
    ap.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite",
                    help="postgresql: stores in a throwaway PostgreSQL server (benchmarks/pg_cluster.py); "
                         "open/refresh/search include its round trips, the FAISS index stays local")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    import torch
    from tqdm import tqdm

    from wrag_vllm.embed import get_embedder
    from wrag_vllm.store import INDEX, ShardStore
    from wrag_vllm.store.relevance import query_rows

    # One torch thread for MiniLM: on a shared, oversubscribed host more intra-op threads made
    # one-query embedding 5-40x slower (OpenMP barriers waiting on descheduled workers).
    torch.set_num_threads(args.torch_threads)
    checkpoints = sorted(int(c) for c in args.checkpoints.split(",") if int(c) <= args.n)
    tmp = Path(tempfile.mkdtemp(prefix="wrag-bench-"))
    pg = None
    if args.backend == "postgresql":
        from benchmarks.pg_cluster import PgCluster

        os.environ["WRAG_CACHE_DIR"] = str(tmp / "cache")
        pg = PgCluster().start()
        root, normal_root = pg.url("bench"), pg.url("normal")
    else:
        root, normal_root = (Path(args.root) if args.root else tmp / "store"), tmp / "normal"
        if root.exists():
            raise SystemExit(f"{root} exists; give a new folder")
    base = tiny_base()
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    emb = get_embedder()
    t = time.perf_counter()
    emb.embed(["load"])
    minilm_load_s = time.perf_counter() - t
    res: dict = {"machine": machine(), "args": vars(args), "minilm_load_s": minilm_load_s,
                 "shard": {"layers": base.num_layers, "hidden": base.hidden_size, "ffn": base.intermediate_size,
                           "rank": args.rank, "modules": 3}}

    # ---- normal path, small store: add() one at a time (MiniLM embeds the description each call)
    st = ShardStore(normal_root)
    shards = [make_shard(base, 900000 + i, args.rank, g) for i in range(args.normal_adds)]
    t_text = [t for s in shards for t in timed(lambda s=s: st.add(s), 1)]
    given = [make_shard(base, 800000 + i, args.rank, g) for i in range(args.normal_adds)]
    gv = unit_rows(rng, len(given), st.dim)
    t_given = [t for s, v in zip(given, gv) for t in timed(lambda s=s, v=v: st.add(s, embedding=v), 1)]
    q_texts = [f"question about {TOPICS[i % len(TOPICS)]} number {i}" for i in range(100)]
    t_embed = [t for q in q_texts for t in timed(lambda q=q: emb.embed([q]), 1)]
    t_search_text = [t for q in q_texts for t in timed(lambda q=q: st.search(q, args.k), 1)]
    st.close()
    res["normal_add"] = {
        "store_size_end": 2 * args.normal_adds,
        "add_text_ms_p50": 1e3 * pct(t_text, 50), "add_text_ms_p99": 1e3 * pct(t_text, 99),
        "add_text_per_s": len(t_text) / sum(t_text),
        "add_given_ms_p50": 1e3 * pct(t_given, 50), "add_given_ms_p99": 1e3 * pct(t_given, 99),
        "add_given_per_s": len(t_given) / sum(t_given),
        "query_embed_ms_p50": 1e3 * pct(t_embed, 50),
        "search_text_ms_p50": 1e3 * pct(t_search_text, 50),
    }
    print(json.dumps(res["normal_add"], indent=1))

    # ---- bulk fill with measurements at each checkpoint
    store = ShardStore(root)
    rows = []
    bulk_s, n = 0.0, 0
    all_vecs = []  # every stored vector: the exact search recall is measured against
    bar = tqdm(total=args.n, desc="bulk add", unit="shard")
    for cp in checkpoints:
        while n < cp:
            m = min(args.chunk, cp - n)
            batch = [make_shard(base, n + i, args.rank, g) for i in range(m)]
            vecs = unit_rows(rng, m, store.dim)
            all_vecs.append(vecs)
            t = time.perf_counter()
            store.add_many(batch, embeddings=vecs)
            bulk_s += time.perf_counter() - t
            n += m
            bar.update(m)
        # search_vector latency (no query embedding); queries: random unit vectors
        qs = unit_rows(rng, args.queries, store.dim)
        for q in qs[:20]:
            store.search_vector(q, args.k)  # warm-up
        lat = [t for q in qs for t in timed(lambda q=q: store.search_vector(q, args.k), 1)]
        # the FAISS call alone (rescoring, id mapping and normalisation excluded), for reference
        heads_q = query_rows(qs[:200])  # [q, 1]: the head index's query rows
        from wrag_vllm.store.index import RESCORE  # a compressed index's FAISS call returns R candidates
        r = max(RESCORE, 16 * args.k) if store._index.compressed else args.k
        faiss_lat = [t for q in heads_q for t in timed(lambda q=q: store._index.index.search(q[None], r), 1)]
        recall = measure_recall(store, np.concatenate(all_vecs), rng, args.k)
        _, image = store._index.image()
        index_form = {"form": "compressed (PQ 4-bit + exact rescoring)" if store._index.compressed else "flat",
                      "bytes_per_shard": len(image) / n}
        # refresh, no change: what a server pays per batch
        t = time.perf_counter()
        for _ in range(10000):
            store.refresh()
        refresh_nochange_us = 1e6 * (time.perf_counter() - t) / 10000
        # refresh after another process/connection added one shard (diff sync), then removed it
        other = ShardStore(root)
        extra = make_shard(base, 700000 + n, args.rank, g)
        other.add(extra, embedding=unit_rows(rng, 1, store.dim)[0])
        t = time.perf_counter()
        changed = store.refresh()
        refresh_change_ms = 1e3 * (time.perf_counter() - t)
        assert changed
        other.remove(extra.id)
        store.refresh()
        other.close()
        # open: index cache fresh on disk (the common case) and cold (cache deleted: rebuild)
        store.close()
        open_s = timed(lambda: open_searchable(root).close(), 3)
        (store.root / INDEX).unlink()
        t = time.perf_counter()
        s2 = open_searchable(root)
        open_cold_s = time.perf_counter() - t
        s2.close()
        store = ShardStore(root)
        assert len(store) == n and store.verify() == []
        du = store.disk_usage()
        row = {"shards": n, "search_ms_p50": 1e3 * pct(lat, 50), "search_ms_p99": 1e3 * pct(lat, 99),
               "search_ms_mean": 1e3 * float(np.mean(lat)), "faiss_ms_p50": 1e3 * pct(faiss_lat, 50),
               "refresh_nochange_us": refresh_nochange_us, "refresh_change_ms": refresh_change_ms,
               "open_ms": 1e3 * statistics.median(open_s), "open_cold_ms": 1e3 * open_cold_s,
               "disk_bytes": du["total"], "disk": du, "bulk_add_per_s": n / bulk_s, "index": index_form,
               **recall}
        rows.append(row)
        bar.write(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                              if k != "disk"}))
    bar.close()

    # ---- normal path again at full size
    big = [make_shard(base, 600000 + i, args.rank, g) for i in range(50)]
    t_big_text = [t for s in big[:25] for t in timed(lambda s=s: store.add(s), 1)]
    bv = unit_rows(rng, 25, store.dim)
    t_big_given = [t for s, v in zip(big[25:], bv) for t in timed(lambda s=s, v=v: store.add(s, embedding=v), 1)]
    res["normal_add_at_full_size"] = {"store_size": n, "add_text_ms_p50": 1e3 * pct(t_big_text, 50),
                                      "add_given_ms_p50": 1e3 * pct(t_big_given, 50)}
    store.close()
    res["checkpoints"] = rows
    from wrag_vllm.store.index import COMPRESS_AT
    res["compress_at"] = COMPRESS_AT
    res["target"] = {"search_p50_ms_at_10k": 2.0,
                     "met": next((r["search_ms_p50"] <= 2.0 for r in rows if r["shards"] == 10000), None)}
    res["machine"]["load_avg_end"] = os.getloadavg()
    write(res, Path(args.out))
    if pg is not None:
        pg.stop()
    if not args.root:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def open_searchable(root):
    """Open the store and load its index: what a replica does before its first request."""
    from wrag_vllm.store import ShardStore

    store = ShardStore(root)
    store.load_index()
    return store


def measure_recall(store, vecs: np.ndarray, rng, k: int) -> dict:
    """Recall@k of store.search_vectors against an exact search of every head, on 200 queries near
    a stored shard and 200 random ones. A given vector's head is the cosine through a fixed
    logistic (relevance.cosine_head): the exact order is the cosine order."""
    near = vecs[rng.integers(0, len(vecs), 200)]
    near = near + rng.standard_normal(near.shape).astype(np.float32) / np.sqrt(vecs.shape[1])
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    out = {}
    for name, q in (("near", near), ("random", unit_rows(rng, 200, vecs.shape[1]))):
        want = np.argsort(-(q @ vecs.T), axis=1)[:, :k]
        got = store.search_vectors(q, k)
        out[f"recall_{name}"] = float(np.mean([len({i for i, _ in g} & {f"shard-{j:05d}" for j in w}) / k
                                               for g, w in zip(got, want)]))
    return out


def write(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    name = "store_scale" if res["args"]["backend"] == "sqlite" else f"store_scale_{res['args']['backend']}"
    (out / f"{name}.json").write_text(json.dumps(res, indent=2))
    rows = res["checkpoints"]
    n = [r["shards"] for r in rows]
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    a = ax[0, 0]
    a.plot(n, [r["search_ms_p50"] for r in rows], "o-", label="search_vector p50")
    a.plot(n, [r["search_ms_p99"] for r in rows], "s--", label="search_vector p99")
    a.plot(n, [r["faiss_ms_p50"] for r in rows], "^:", label="FAISS call alone p50")
    a.axhline(2.0, color="red", lw=1, label="target p50 ≤ 2 ms @10k")
    a.set(xscale="log", yscale="log", xlabel="shards in store", ylabel="ms", title="Search latency (k=%d, no query embedding)" % res["args"]["k"])
    a.legend(fontsize=8)
    a = ax[0, 1]
    a.plot(n, [r["open_ms"] for r in rows], "o-", label="open, index cache fresh")
    a.plot(n, [r["open_cold_ms"] for r in rows], "s--", label="open, cache deleted (rebuild)")
    a.plot(n, [r["refresh_change_ms"] for r in rows], "^:", label="refresh after 1 add elsewhere")
    a.set(xscale="log", yscale="log", xlabel="shards in store", ylabel="ms", title="Open / refresh time")
    a.legend(fontsize=8)
    a = ax[1, 0]
    a.plot(n, [r["refresh_nochange_us"] for r in rows], "o-")
    a.set(xscale="log", xlabel="shards in store", ylabel="µs per call", title="refresh(), nothing changed")
    a.set_ylim(bottom=0)
    a = ax[1, 1]
    for key, lab in (("shards", "shard files"), ("catalog", "catalog"), ("index", "index cache")):
        a.plot(n, [r["disk"][key] / 1e6 for r in rows], "o-", label=lab)
    a.set(xscale="log", yscale="log", xlabel="shards in store", ylabel="MB", title="Disk use")
    a.legend(fontsize=8)
    m = res["machine"]
    na = res["normal_add"]
    fig.suptitle(f"wrag ShardStore scale ({res['args']['backend']}) — {m['cpu']} ({m['cores']} cores), faiss {m['faiss']}\n"
                 f"add(): {na['add_text_per_s']:.0f}/s with MiniLM, {na['add_given_per_s']:.0f}/s with given "
                 f"embedding; bulk add_many: {rows[-1]['bulk_add_per_s']:.0f}/s", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)

    lines = [f"# Shard store scale benchmark: {res['args']['backend']} backend", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, load avg {m['load_avg'][0]:.1f}→{m['load_avg_end'][0]:.1f} "
             f"(shared host), Python {m['python']}, torch {m['torch']}, faiss {m['faiss']}, "
             f"SQLite {m['sqlite']}, {m['postgresql']}, vLLM {m['vllm']}."
             + (" Store: a PostgreSQL server on this machine (127.0.0.1, fsync off: a throwaway cluster); the "
                "FAISS index and shard file cache are local." if res["args"]["backend"] == "postgresql" else ""),
             f"Shards: tiny Llama base ({res['shard']['layers']} layers, h={res['shard']['hidden']}, "
             f"ffn={res['shard']['ffn']}), rank {res['shard']['rank']} on gate/up/down, random unit embeddings. "
             f"Index (store/index.py): float32 relevance heads (IndexFlatIP) below {res['compress_at']} shards, "
             "4-bit PQ codes (IndexPQFastScan) with the candidates rescored exactly from the catalog's heads "
             "above. Recall@k against an exact search of every head: queries near a stored shard (cosine ≈ 0.7 "
             "to it) and random unit queries (every shard a near-tie: the worst case).", "",
             "| shards | index | index B/shard | recall near | recall random | search p50 (ms) | search p99 (ms) "
             "| FAISS p50 (ms) | refresh no-change (µs) | refresh after add (ms) | open (ms) | open, cold (ms) "
             "| disk (MB) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shards']} | {r['index']['form'].split(' ')[0]} | {r['index']['bytes_per_shard']:.0f} "
                     f"| {r['recall_near']:.3f} | {r['recall_random']:.3f} "
                     f"| {r['search_ms_p50']:.3f} | {r['search_ms_p99']:.3f} | {r['faiss_ms_p50']:.3f} "
                     f"| {r['refresh_nochange_us']:.1f} | {r['refresh_change_ms']:.2f} | {r['open_ms']:.1f} "
                     f"| {r['open_cold_ms']:.1f} | {r['disk_bytes'] / 1e6:.1f} |")
    big = res["normal_add_at_full_size"]
    lines += ["", "Adds:", "",
              f"- `add()` one at a time, MiniLM embeds the description: p50 {na['add_text_ms_p50']:.1f} ms "
              f"(p99 {na['add_text_ms_p99']:.1f}), {na['add_text_per_s']:.0f}/s (store ≤ {na['store_size_end']} shards); "
              f"at {big['store_size']} shards p50 {big['add_text_ms_p50']:.1f} ms.",
              f"- `add(embedding=...)`: p50 {na['add_given_ms_p50']:.1f} ms, {na['add_given_per_s']:.0f}/s; at "
              f"{big['store_size']} shards p50 {big['add_given_ms_p50']:.1f} ms.",
              f"- bulk `add_many` ({res['args']['chunk']} per call, given embeddings): {rows[-1]['bulk_add_per_s']:.0f} shards/s.",
              f"- query embedding (MiniLM, one text): p50 {na['query_embed_ms_p50']:.1f} ms; `search(text)` p50 "
              f"{na['search_text_ms_p50']:.1f} ms. MiniLM load: {res['minilm_load_s']:.1f} s.", "",
              f"Target search p50 ≤ 2 ms at 10,000 shards: **{'met' if res['target']['met'] else 'NOT met' if res['target']['met'] is False else 'not measured'}**."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
