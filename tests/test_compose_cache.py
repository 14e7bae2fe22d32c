"""CompositionCache: keys, LRU byte budget, counters, thread safety."""
from __future__ import annotations

import threading

import pytest
import torch

from helpers_shards import random_shard
from wrag_vllm.compose import CompositionCache, compose
from wrag_vllm.errors import ComposeError
from wrag_vllm.fingerprint import BaseFingerprint

BASE = BaseFingerprint("LlamaForCausalLM", 16, 24, 2, "a" * 32)
SH = [random_shard(BASE, f"s{i}", rank=2 + i, seed=i) for i in range(4)]


def test_key_is_canonical():
    c = CompositionCache()
    k = c.key(SH[:3], [0.5, 0.3, 0.2])
    assert c.key([SH[2], SH[0], SH[1]], [0.2, 0.5, 0.3]) == k                 # order
    assert c.key(SH[:3], [0.5002, 0.2999, 0.2]) == k                           # rounding to 1e-3
    assert c.key(SH[:3], [0.5, 0.3, 0.2], "svd-centered", lam=1.0) == k       # explicit default
    assert c.key(SH[:4], [0.5, 0.3, 0.2, 0.0]) == k                            # zero weight dropped
    assert c.key(SH[:3], [0.5, 0.31, 0.2]) != k
    assert c.key(SH[:3], [0.5, 0.3, 0.2], "linear") != k
    assert c.key(SH[:3], [0.5, 0.3, 0.2], max_rank=4) != k
    with pytest.raises(ComposeError):
        c.key(SH[:3], [0.5, float("nan"), 0.2])


def test_hits_misses_and_rounded_composition():
    c = CompositionCache()
    a = c.get_or_compose(SH[:3], [0.5004, 0.3, 0.2])
    b = c.get_or_compose([SH[1], SH[0], SH[2]], [0.3, 0.4996, 0.2])
    assert a is b and (c.hits, c.misses) == (1, 1)
    # the cached composite is exactly the composition of the rounded weights
    ref = compose(SH[:3], [0.5, 0.3, 0.2])
    assert ref.id == a.id
    for k, f in ref.factors.items():
        assert torch.equal(f.A, a.factors[k].A)
    c.get_or_compose(SH[:3], [0.5, 0.3, 0.2], "linear")
    st = c.stats()
    assert st["misses"] == 2 and st["hits"] == 1 and st["entries"] == 2 and st["bytes"] == c.bytes > 0
    assert abs(st["hit_rate"] - 1 / 3) < 1e-9


def test_lru_byte_budget():
    one = compose(SH[:2], [1, 1]).nbytes()
    c = CompositionCache(max_bytes=int(2.5 * one))
    keys = []
    for w in (0.1, 0.2, 0.3):
        s = c.get_or_compose(SH[:2], [1, w])
        keys.append(c.key(SH[:2], [1, w]))
        assert s.nbytes() <= one
    assert len(c) <= 2 and c.evictions >= 1 and c.bytes <= c.max_bytes
    assert keys[0] not in c and keys[2] in c
    c.get_or_compose(SH[:2], [1, 0.2])          # touch → most recent
    c.get_or_compose(SH[:2], [1, 0.4])          # evicts the least recent (0.3), not 0.2
    assert keys[1] in c and keys[2] not in c
    tiny = CompositionCache(max_bytes=10)       # too big to store: returned, not kept
    assert tiny.get_or_compose(SH[:2], [1, 1]).factors and len(tiny) == 0 and tiny.bytes == 0
    c.clear()
    assert len(c) == 0 and c.bytes == 0


def test_thread_safe_single_flight():
    c = CompositionCache()
    out, errs = [], []

    def work():
        try:
            out.append(c.get_or_compose(SH, [0.4, 0.3, 0.2, 0.1]))
        except Exception as e:  # pragma: no cover - reported below
            errs.append(e)

    ts = [threading.Thread(target=work) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errs
    assert len({id(s) for s in out}) == 1
    assert c.misses == 1 and c.hits == 7
