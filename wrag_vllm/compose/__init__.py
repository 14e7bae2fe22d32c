"""Composition of retrieved shards: k low-rank deltas + weights → one composite Shard.

    compose(shards, weights, method="svd-centered", **params) -> Shard
    METHODS: name -> Method class          get_method(name) -> Method class
    CompositionCache(max_bytes, decimals)  LRU of composites with hit/miss counters
    dense_reference(...)                   the same math on dense matrices (tests, benchmarks)

Methods: linear, svd-centered (default) — exact in factor space; ties, dare — dense references.
"""
from . import dare, linear, svd_centered, ties  # noqa: F401  (register the methods)
from .composite import GENERAL_PARAMS, check_weights, compose, dense_reference
from .cache import CompositionCache
from .registry import DEFAULT_METHOD, METHODS, Method, get_method, register

__all__ = ["compose", "dense_reference", "METHODS", "Method", "get_method", "register",
           "CompositionCache", "DEFAULT_METHOD", "GENERAL_PARAMS", "check_weights"]
