"""CompositionCache: reuse composites across requests that retrieve the same shard set.

Key = (base hash, sorted (shard id, weight rounded to `decimals` places) for weights > 0,
method, all method + general params with defaults filled in). Rounding: weights are rounded to
`decimals` decimal places (default 3, i.e. steps of 0.001) BEFORE composing, so a cached composite
is exactly the composition for its key, and requests whose weights differ by < 0.0005 share it.
Order of shards and explicit-vs-default parameters do not change the key.

LRU with a byte budget (Shard.nbytes() of each composite); a composite larger than the whole
budget is returned but not stored. Thread-safe; concurrent misses on the same key compose once
(the others wait for it and count as hits). Counters: hits, misses, evictions (serving metrics).

A shard replaced under the same id (store `add(..., overwrite=True)`) changes what a key means:
call clear() when the store's `generation` changes.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from ..shard import Shard
from .api import canonical_inputs, compose, split_params

DEFAULT_DECIMALS = 3


class CompositionCache:
    def __init__(self, max_bytes: int = 256 << 20, decimals: int = DEFAULT_DECIMALS):
        if max_bytes < 0:
            raise ValueError("max_bytes must be ≥ 0")
        self.max_bytes = int(max_bytes)
        self.decimals = int(decimals)
        self._lru: OrderedDict[tuple, Shard] = OrderedDict()
        self._sizes: dict[tuple, int] = {}
        self._inflight: dict[tuple, threading.Event] = {}
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # ------------------------------------------------------------------ keys
    def round_weights(self, weights) -> list[float]:
        return [round(float(w), self.decimals) for w in weights]

    def key(self, shards: list[Shard], weights: list[float], method: str = "svd-centered", **params) -> tuple:
        """The cache key (validates inputs exactly as compose() does; ComposeError if bad)."""
        m, general = split_params(method, dict(params))
        kept, _ = canonical_inputs(shards, self.round_weights(weights))
        general.pop("progress", None)
        return (kept[0][0].base.weights_hash,
                tuple((s.id, w) for s, w in kept),
                m.name,
                tuple(sorted({**m.params, **general}.items(), key=lambda kv: kv[0])))

    # ------------------------------------------------------------------ LRU
    def get(self, key: tuple) -> Shard | None:
        with self._lock:
            shard = self._lru.get(key)
            if shard is None:
                self.misses += 1
                return None
            self._lru.move_to_end(key)
            self.hits += 1
            return shard

    def put(self, key: tuple, shard: Shard) -> None:
        size = shard.nbytes()
        with self._lock:
            if key in self._lru:
                self.bytes -= self._sizes.pop(key)
                del self._lru[key]
            if size > self.max_bytes:
                return
            self._lru[key] = shard
            self._sizes[key] = size
            self.bytes += size
            while self.bytes > self.max_bytes:
                old, _ = self._lru.popitem(last=False)
                self.bytes -= self._sizes.pop(old)
                self.evictions += 1

    def get_or_compose(self, shards: list[Shard], weights: list[float], method: str = "svd-centered",
                       **params) -> Shard:
        """The composite for (shards, rounded weights, method, params), from cache or freshly composed."""
        weights = self.round_weights(weights)
        key = self.key(shards, weights, method, **params)
        while True:
            with self._lock:
                shard = self._lru.get(key)
                if shard is not None:
                    self._lru.move_to_end(key)
                    self.hits += 1
                    return shard
                ev = self._inflight.get(key)
                if ev is None:  # we compose it
                    ev = self._inflight[key] = threading.Event()
                    self.misses += 1
                    break
            ev.wait()  # another thread composes this key; then look again (counts as a hit)
        try:
            shard = compose(shards, weights, method, **params)
            self.put(key, shard)
            return shard
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            ev.set()

    # ------------------------------------------------------------------ admin
    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
            self._sizes.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key) -> bool:
        return key in self._lru

    def stats(self) -> dict:
        with self._lock:
            total = self.hits + self.misses
            return {"entries": len(self._lru), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "hit_rate": self.hits / total if total else 0.0}
