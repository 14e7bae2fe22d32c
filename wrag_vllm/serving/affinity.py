"""Shard-affinity routing: which data-parallel engine a request goes to.

With `--data-parallel-size N` vLLM runs N engine cores, each with its own WRAG device pool, and its
API server sends a request to the engine named by the request's `X-data-parallel-rank` header, or
balances by load when there is none. Balancing spreads the requests of one shard set over every
engine, so every pool loads every set; with more sets than one pool holds, pools thrash. The front
end therefore names the engine from the request's resolved shard set:

    preferred(set) = argmax_r  blake2b(key(set) ‖ r)        (rendezvous hashing, r ∈ [0, N))

so requests sharing a set meet the slots that already hold it, the sets spread evenly over the
engines, and changing N moves only the sets whose winner changes. When the preferred engine already
has `capacity` of this process's requests in flight (saturated), the request goes to the rank
with the fewest in flight instead: affinity never queues work behind a busy engine while another
idles. Requests without shards, and requests whose client set the header itself (a router in front
of the replicas), are left to vLLM.

Counts are this API server process's own requests (vLLM may run several API server processes, each
with its own counts): a local view, enough to steer away from an engine this process keeps busy.
"""
from __future__ import annotations

import hashlib
import threading
from typing import Sequence

HEADER = b"x-data-parallel-rank"  # vLLM reads X-data-parallel-rank (header names are case-insensitive)


def set_key(plans: Sequence) -> str:
    """The affinity key of a request: the sorted shard ids of each of its plans ("" when none)."""
    return ";".join(",".join(sorted(p.ids)) for p in plans if p.ids)


def preferred_rank(key: str, ranks: int) -> int:
    """The rendezvous-hash winner for `key` among ranks 0..ranks-1."""
    return max(range(ranks), key=lambda r: hashlib.blake2b(f"{key}\0{r}".encode(), digest_size=8).digest())


class Affinity:
    """In-flight counts per rank and the routing rule (module docstring). Thread-safe."""

    def __init__(self, ranks: int, capacity: int):
        if ranks < 1 or capacity < 1:
            raise ValueError(f"ranks and capacity must be at least 1 (got {ranks}, {capacity})")
        self.ranks, self.capacity = ranks, capacity
        self.in_flight = [0] * ranks
        self._mu = threading.Lock()

    def acquire(self, key: str) -> int:
        """The rank for a request of affinity key `key`, counted in flight until `release`."""
        with self._mu:
            r = preferred_rank(key, self.ranks)
            if self.in_flight[r] >= self.capacity:
                r = min(range(self.ranks), key=lambda i: (self.in_flight[i], i))
            self.in_flight[r] += 1
            return r

    def release(self, rank: int) -> None:
        with self._mu:
            self.in_flight[rank] -= 1
