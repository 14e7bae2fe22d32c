"""Engine-core side: turn a Plan into slot payloads the workers can load.

A slot payload is one shard file (the shard format of shard.py) in the server's run directory,
named by a content key. Two kinds:

    method "linear" with k ≤ k_max:  k payloads, one per shard, weights w_i applied per token by the
        kernel:  Δy = Σ_i w_i · s_i·B_i·(A_i·x)   (shards, not sets, occupy slots: reused widely)
    any other case:                   1 payload, the composite compose(shards, w, method) (scale 1),
        applied with weight 1; computed once per distinct (shards, weights, method, params) and
        kept in the CompositionCache.

Payload files are written once (atomic rename) and only read afterwards, so workers of any
tensor-parallel rank can load them concurrently. Every payload is checked here, before its
request is admitted (well-formed, finite, within the shard magnitude bounds of shard.py, rank ≤
max_rank): a worker is never handed a payload it cannot load. Shards are read from the store at preparation
time: a shard removed from the store before a request is prepared is never applied to it.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

from ..compose import CompositionCache
from ..lru import ByteLRU
from .config import WragConfig
from .plan import Plan, SlotRef
from .resolver import Resolver


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


class Preparer:
    """Thread-safe. prepare(plan) -> list[SlotRef] (empty for a base-model request)."""

    def __init__(self, cfg: WragConfig, run_dir: str | os.PathLike, resolver: Resolver | None = None, stats=None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.slot_dir = self.run_dir / "slots"
        self.slot_dir.mkdir(parents=True, exist_ok=True)
        self.resolver = resolver or Resolver(cfg)
        self.stats = stats
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._shards = ByteLRU(cfg.host_cache_mb << 20)  # content key -> Shard (under the resolver's lock)
        self._compositions = CompositionCache(max_bytes=cfg.composition_cache_mb << 20)

    # ------------------------------------------------------------------ helpers
    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _shard_key(self, shard_id: str, meta: dict) -> str:
        # content identity: a shard removed and re-added under the same id gets a new key
        return "s-" + _digest(shard_id, meta)

    def _load(self, shard_id: str):
        """(content key, Shard) from the store, freshly refreshed (removals are seen here)."""
        def load(store):
            key = self._shard_key(shard_id, store.get_meta(shard_id))
            shard = self._shards.get(key)
            if shard is None:
                shard = store.load(shard_id)
                self._shards.put(key, shard, shard.nbytes())
            return key, shard
        return self.resolver.with_store(load)

    def _path(self, key: str) -> str:
        return str(self.slot_dir / f"{key}.safetensors")

    def _write(self, key: str, shard) -> str:
        path = self._path(key)
        with self._key_lock(key):
            if not os.path.exists(path):
                self._check(shard)
                shard.save(path)
        return path

    def _check(self, payload) -> None:
        """ShardError/ValueError unless the workers can load `payload` into a slot."""
        payload.validate()
        if payload.rank > self.cfg.max_rank:
            raise ValueError(f"payload rank {payload.rank} exceeds max_rank {self.cfg.max_rank}")

    def _composite_key(self, keys: list[str], weights: list[float], plan: Plan) -> str:
        """Content key of a composite: the CompositionCache composes with weights rounded to its
        decimals, so sets whose weights round alike are one payload (one file, one device slot)."""
        return "c-" + _digest(keys, self._compositions.round_weights(weights), plan.method, plan.params)

    def _layout(self, keys: list[str], plan: Plan) -> tuple[list[int], str | None]:
        """(indices of the shards with weight > 0, the composite's content key — or None when each
        kept shard is its own payload, linear with k ≤ k_max)."""
        kept = [i for i, w in enumerate(plan.weights) if w > 0]
        if not kept or not self.resolver.composite_needed(plan.method, len(kept)):
            return kept, None
        return kept, self._composite_key([keys[i] for i in kept], [plan.weights[i] for i in kept], plan)

    # ------------------------------------------------------------------ main entry
    def prepare_cached(self, plan: Plan) -> list[SlotRef] | None:
        """prepare(plan) when every payload of it is already written — no shard read, composition
        or file write, only a store refresh and one catalog read per shard — else None (also when
        another thread holds the store, or a shard is gone: prepare() then gives the verdict). Cheap
        enough for the engine loop, so a request whose set is warm is admitted in its first step."""
        if plan.empty:
            return []
        try:
            keys = self.resolver.with_store(
                lambda store: [self._shard_key(i, store.get_meta(i)) for i in plan.ids], wait=False)
        except Exception:  # noqa: BLE001 - e.g. a removed shard: prepare() refuses it properly
            return None
        if keys is None:
            return None
        kept, ckey = self._layout(keys, plan)
        refs = ([SlotRef(keys[i], float(plan.weights[i]), self._path(keys[i])) for i in kept] if ckey is None
                else [SlotRef(ckey, 1.0, self._path(ckey))])
        if not all(os.path.exists(r.path) for r in refs):
            return None
        if ckey is not None and self.stats is not None:
            self.stats.composition(0.0, True)
        return refs

    def prepare(self, plan: Plan) -> list[SlotRef]:
        if plan.empty:
            return []
        loaded = [self._load(i) for i in plan.ids]
        kept, ckey = self._layout([k for k, _ in loaded], plan)
        if ckey is None:
            return [SlotRef(loaded[i][0], float(plan.weights[i]), self._write(*loaded[i])) for i in kept]
        path = self._path(ckey)
        with self._key_lock(ckey):
            t0 = time.perf_counter()
            hit = os.path.exists(path)
            if not hit:
                comp = self._compositions.get_or_compose([loaded[i][1] for i in kept],
                                                         [plan.weights[i] for i in kept],
                                                         method=plan.method, **plan.params)
                self._check(comp)
                comp.save(path)
            if self.stats is not None:
                self.stats.composition(time.perf_counter() - t0, hit)
        return [SlotRef(ckey, 1.0, path)]

