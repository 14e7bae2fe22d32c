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

from ..lru import ByteLRU
from ..shard import Shard
from .composite import canonical_inputs, compose, split_params
from .registry import DEFAULT_METHOD

DEFAULT_DECIMALS = 3


class CompositionCache:
    def __init__(self, max_bytes: int = 256 << 20, decimals: int = DEFAULT_DECIMALS):
        self.decimals = int(decimals)
        self._lru = ByteLRU(max_bytes)             # key -> composite Shard
        self._inflight: dict[tuple, threading.Event] = {}
        self._lock = threading.Lock()

    max_bytes = property(lambda self: self._lru.max_bytes)
    bytes = property(lambda self: self._lru.bytes)
    hits = property(lambda self: self._lru.hits)
    misses = property(lambda self: self._lru.misses)
    evictions = property(lambda self: self._lru.evictions)

    # ------------------------------------------------------------------ keys
    def round_weights(self, weights) -> list[float]:
        return [round(float(w), self.decimals) for w in weights]

    def key(self, shards: list[Shard], weights: list[float], method: str = DEFAULT_METHOD, **params) -> tuple:
        """The cache key (validates inputs exactly as compose() does; ComposeError if bad)."""
        m, general = split_params(method, dict(params))
        kept, _ = canonical_inputs(shards, self.round_weights(weights))
        general.pop("progress", None)
        return (kept[0][0].base.weights_hash,
                tuple((s.id, w) for s, w in kept),
                m.name,
                tuple(sorted({**m.params, **general}.items(), key=lambda kv: kv[0])))

    # ------------------------------------------------------------------ entries
    def get(self, key: tuple) -> Shard | None:
        with self._lock:
            return self._lru.get(key)

    def put(self, key: tuple, shard: Shard) -> None:
        with self._lock:
            self._lru.put(key, shard, shard.nbytes())

    def get_or_compose(self, shards: list[Shard], weights: list[float], method: str = DEFAULT_METHOD,
                       **params) -> Shard:
        """The composite for (shards, rounded weights, method, params), from cache or freshly composed."""
        weights = self.round_weights(weights)
        key = self.key(shards, weights, method, **params)
        while True:
            with self._lock:
                if key in self._lru:
                    return self._lru.get(key)
                ev = self._inflight.get(key)
                if ev is None:  # we compose it
                    ev = self._inflight[key] = threading.Event()
                    self._lru.misses += 1
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
