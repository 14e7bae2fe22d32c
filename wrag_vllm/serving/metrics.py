"""Prometheus metrics on vLLM's own /metrics (prometheus_client, API-server process).

    wrag_retrieval_seconds        histogram   front end: store refresh + embed + search per request
    wrag_shards_per_request       histogram   shards applied per request
    wrag_requests_total{source}   counter     explicit | retrieved | off | none
                                              (each prompt of a completions batch counts as a request)
    wrag_composition_seconds      gauge/sum   engine core: composition time (sum, count)
    wrag_composition_cache_hits / _misses     engine core
    wrag_pool_evictions_total / wrag_pool_loads_total   workers (device slot pool)

The engine core and workers are other processes: they write their counters to small JSON files
in the server's run directory, and a collector in the API server reads them at scrape time (so no
prometheus multiprocess mode is needed).
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

_FRONT = None
_LOCK = threading.Lock()


class EngineStats:
    """Counters of one engine-core/worker process, flushed to <run_dir>/stats/<role>-<pid>.json."""

    def __init__(self, run_dir: str, role: str):
        self.path = Path(run_dir) / "stats" / f"{role}-{os.getpid()}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.c = {"composition_seconds_sum": 0.0, "composition_count": 0, "composition_cache_hits": 0,
                  "composition_cache_misses": 0, "prepare_seconds_sum": 0.0, "prepared": 0,
                  "pool_evictions": 0, "pool_loads": 0}
        self._last = 0.0
        self._lock = threading.Lock()

    def composition(self, seconds: float, hit: bool) -> None:
        with self._lock:
            self.c["composition_seconds_sum"] += seconds
            self.c["composition_count"] += 1
            self.c["composition_cache_hits" if hit else "composition_cache_misses"] += 1
        self.flush()

    def prepared(self, seconds: float, n_slots: int) -> None:
        with self._lock:
            self.c["prepare_seconds_sum"] += seconds
            self.c["prepared"] += 1
        self.flush()

    def set(self, **kv) -> None:
        with self._lock:
            self.c.update(kv)
        self.flush()

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.5:
            return
        self._last = now
        with self._lock:
            data = json.dumps(self.c)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(data)
        os.replace(tmp, self.path)


def read_engine_stats(run_dir: str | None) -> dict:
    tot: dict = {}
    if not run_dir:
        return tot
    for f in (Path(run_dir) / "stats").glob("*.json"):
        try:
            for k, v in json.loads(f.read_text()).items():
                tot[k] = tot.get(k, 0) + v
        except (OSError, ValueError):
            continue
    return tot


class FrontMetrics:
    def __init__(self, registry=None):
        from prometheus_client import REGISTRY, Counter, Histogram

        reg = registry or REGISTRY
        self.retrieval = Histogram("wrag_retrieval_seconds", "WRAG retrieval latency (refresh + embed + search)",
                                   buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=reg)
        self.shards = Histogram("wrag_shards_per_request", "WRAG shards applied per request",
                                buckets=(0, 1, 2, 3, 4, 6, 8, 16), registry=reg)
        self.requests = Counter("wrag_requests", "WRAG requests by plan source", ["source"], registry=reg)
        self.rejected = Counter("wrag_rejected_requests", "WRAG requests refused with HTTP 400", registry=reg)
        reg.register(_EngineCollector())


class _EngineCollector:
    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = read_engine_stats(os.environ.get("WRAG_RUN_DIR"))
        g = lambda k: float(s.get(k, 0))  # noqa: E731
        yield CounterMetricFamily("wrag_composition_seconds", "WRAG composition time (engine core)",
                                  value=g("composition_seconds_sum"))
        yield CounterMetricFamily("wrag_compositions", "WRAG compositions looked up", value=g("composition_count"))
        yield CounterMetricFamily("wrag_composition_cache_hits", "WRAG composition cache hits",
                                  value=g("composition_cache_hits"))
        yield CounterMetricFamily("wrag_composition_cache_misses", "WRAG composition cache misses",
                                  value=g("composition_cache_misses"))
        n = g("composition_count")
        yield GaugeMetricFamily("wrag_composition_cache_hit_rate", "WRAG composition cache hit rate",
                                value=(g("composition_cache_hits") / n) if n else 0.0)
        yield CounterMetricFamily("wrag_prepare_seconds", "WRAG request preparation time in the engine core "
                                  "(store load + composition + payload)", value=g("prepare_seconds_sum"))
        yield CounterMetricFamily("wrag_prepared_requests", "WRAG requests prepared", value=g("prepared"))
        yield CounterMetricFamily("wrag_pool_evictions", "WRAG device pool evictions", value=g("pool_evictions"))
        yield CounterMetricFamily("wrag_pool_loads", "WRAG device pool slot loads", value=g("pool_loads"))


def front_metrics() -> FrontMetrics:
    global _FRONT
    with _LOCK:
        if _FRONT is None:
            _FRONT = FrontMetrics()
        return _FRONT
