"""Store test helpers: store snapshots, and a writer process that tests can SIGKILL.

Run as a script, it is the writer:  python helpers_store.py STORE BASE_JSON OP [args]  (a folder or a URL)
    add ID [ID ...]      add each shard (precomputed embedding: no MiniLM load), print "added ID"
    remove ID            remove one shard
    overwrite ID         re-add ID with a new description (overwrite=True)
    loop PREFIX N        add PREFIX-0 … PREFIX-{N-1}, printing each id once its add returned
The writer loads the store's index first (as `wrag add` does to fit heads), keeps it in step, then
close()s the store (persists the index cache). Prints "ready" once imports are done.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

DIM = 384  # MiniLM's dim: the default store records it; precomputed vectors must match


def unit(seed: int | str, dim: int = DIM) -> np.ndarray:
    """A deterministic random unit vector (dim,) per seed (strings hash to a seed)."""
    if isinstance(seed, str):
        seed = int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16)
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def snapshot(store, queries=("heart disease", "tax law", "compilers")) -> dict:
    """Everything a caller can observe: rows, generation, search results, files and their bytes."""
    files = {}
    for p in sorted(store.root.rglob("*")):  # the store's folder, or a database store's local cache
        if p.is_file() and p.name not in (".lock",) and not p.name.startswith("catalog.sqlite"):
            files[str(p.relative_to(store.root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    rows = store.list()
    return {
        "rows": rows,
        "generation": store.generation,
        "base": store.base,
        "search": [store.search(q, k=3) for q in queries] if rows else [],
        "vector": [store.search_vector(unit(r["id"]), k=2) for r in rows],
        "files": files,
    }


def check_consistent(root) -> "object":
    """Reopen `root` and assert the crash-consistency invariants; returns the reopened store."""
    from wrag_vllm.store import ShardStore

    store = ShardStore(root, create=False)
    assert store.verify() == [], store.verify()
    rows = store.list()
    assert not list(store.root.glob("index.faiss.tmp-*"))
    assert len(store) == len(rows)
    for r in rows:  # every row is in the index and retrievable by its (given) vector
        if r["embed_source"] == "given":
            assert store.search_vector(unit(r["id"]), k=1)[0][0] == r["id"]
        store.load(r["id"])  # a database store's cache fetches what it lacks
    names = {p.name for p in (store.root / "shards").iterdir()}  # the folder, or the local cache
    assert names == {Path(r["path"]).name for r in rows}, (names, rows)  # no orphans, no missing files
    return store


def _writer(argv: list[str]) -> int:
    from helpers_shards import random_shard

    from wrag_vllm.fingerprint import BaseFingerprint
    from wrag_vllm.store import ShardStore

    root, base, op, *args = argv
    base = BaseFingerprint.from_dict(json.loads(base))
    store = ShardStore(root)
    store.load_index()
    print("ready", flush=True)

    def shard(i, desc=None):
        seed = int(hashlib.sha256(i.encode()).hexdigest()[:6], 16)
        return random_shard(base, i, rank=2, seed=seed, description=desc or f"domain {i}")

    if op == "add":
        for i in args:
            store.add(shard(i), embedding=unit(i))
            print("added", i, flush=True)
    elif op == "remove":
        store.remove(args[0])
    elif op == "overwrite":
        store.add(shard(args[0], "rewritten"), overwrite=True, embedding=unit(args[0]))
    elif op == "loop":
        prefix, n = args[0], int(args[1])
        for j in range(n):
            i = f"{prefix}-{j}"
            store.add(shard(i), embedding=unit(i))
            print("added", i, flush=True)
    else:
        raise SystemExit(f"unknown op {op}")
    store.close()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_writer(sys.argv[1:]))
