"""ByteLRU: a least-recently-used map with a byte budget, the one cache rule of the package.

Used for composites (compose/cache.py), shards read from the store (serving/preparer.py) and
payloads a worker has loaded (serving/pool.py). An entry larger than the whole budget is not
kept (the caller still has it). Not thread-safe: callers hold their own lock.
"""
from __future__ import annotations

from collections import OrderedDict


class ByteLRU:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("max_bytes must be ≥ 0")
        self.max_bytes = int(max_bytes)
        self._d: OrderedDict = OrderedDict()   # key -> (value, nbytes), least recent first
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key):
        """The value (now the most recent), or None."""
        hit = self._d.get(key)
        if hit is None:
            self.misses += 1
            return None
        self._d.move_to_end(key)
        self.hits += 1
        return hit[0]

    def put(self, key, value, nbytes: int) -> None:
        if key in self._d:
            self.bytes -= self._d.pop(key)[1]
        if nbytes > self.max_bytes:
            return
        self._d[key] = (value, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            _, (_, nb) = self._d.popitem(last=False)
            self.bytes -= nb
            self.evictions += 1

    def clear(self) -> None:
        self._d.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key) -> bool:
        return key in self._d
