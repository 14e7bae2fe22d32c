"""Shard-affinity routing (serving/affinity.py): the rule, without a server."""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

import pytest

from wrag_vllm.serving.affinity import Affinity, preferred_rank, set_key


@dataclass
class P:
    ids: list


def test_key_is_the_sorted_set_of_each_plan():
    assert set_key([P(["b", "a"])]) == set_key([P(["a", "b"])]) == "a,b"
    assert set_key([P([])]) == "" and set_key([P(["x"]), P([]), P(["z", "y"])]) == "x;y,z"


def test_preferred_rank_is_stable_even_and_moves_little_when_ranks_change():
    keys = [f"shard{i}" for i in range(4000)]
    four = [preferred_rank(k, 4) for k in keys]
    assert four == [preferred_rank(k, 4) for k in keys]  # deterministic across calls (and processes)
    counts = Counter(four)
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 0.2 * len(keys)  # spread evenly
    five = [preferred_rank(k, 5) for k in keys]
    moved = sum(a != b for a, b in zip(four, five))
    assert all(b == 4 for a, b in zip(four, five) if a != b)  # only moves to the new rank
    assert moved < 0.3 * len(keys)  # about 1/5 of the sets move, not all
    assert {preferred_rank(k, 1) for k in keys} == {0}


def test_saturated_preferred_rank_falls_back_to_least_loaded():
    a = Affinity(ranks=3, capacity=2)
    r = preferred_rank("hot", 3)
    assert [a.acquire("hot") for _ in range(2)] == [r, r]  # up to capacity: the preferred engine
    third = a.acquire("hot")
    assert third != r and a.in_flight[third] == 1  # saturated: the least loaded
    a.release(r)
    assert a.acquire("hot") == r  # room again: back to the preferred engine
    assert a.in_flight[r] == 2 and sum(a.in_flight) == 3


def test_counts_are_thread_safe_and_bad_settings_refused():
    a = Affinity(ranks=2, capacity=1000)

    def work():
        for i in range(500):
            a.release(a.acquire(f"k{i}"))

    ts = [threading.Thread(target=work) for _ in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert a.in_flight == [0, 0]
    for bad in ((0, 1), (2, 0)):
        with pytest.raises(ValueError):
            Affinity(*bad)
