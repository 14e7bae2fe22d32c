"""Prometheus metrics on vLLM's own /metrics (prometheus_client, API-server process).

    wrag_retrieval_seconds        histogram   front end: store refresh + embed + search per request
    wrag_shards_per_request       histogram   shards applied per request
    wrag_requests_total{source}   counter     explicit | retrieved | off | none
                                              (each prompt of a completions batch counts as a request)
    wrag_composition_seconds      gauge/sum   engine core: composition time (sum, count), and
    wrag_composition_hit_seconds / _miss_seconds   the same split by cache hit (a payload already
                                              written) and miss (a composition computed)
    wrag_composition_cache_hits / _misses     engine core
    wrag_pool_evictions_total / wrag_pool_loads_total   workers (device slot pool)

The engine core and workers are other processes: they write their counters to small JSON files
in the server's run directory, and the API server reads them at scrape time: a collector on the
registry, or — when vLLM runs several API server processes (data parallelism) and serves /metrics
from prometheus_client's multiprocess files, where a collector is never asked — gauges of the same
names (multiprocess_mode "mostrecent") that the middleware sets on each GET /metrics
(FrontMetrics.refresh_engine).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("vllm.wrag")
_FRONT = None
_LOCK = threading.Lock()


class EngineStats:
    """Counters of one engine-core/worker process, flushed to <run_dir>/stats/<role>-<pid>.json."""

    def __init__(self, run_dir: str, role: str):
        self.path = Path(run_dir) / "stats" / f"{role}-{os.getpid()}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.c = {"composition_seconds_sum": 0.0, "composition_count": 0, "composition_cache_hits": 0,
                  "composition_cache_misses": 0, "composition_hit_seconds_sum": 0.0,
                  "composition_miss_seconds_sum": 0.0, "prepare_seconds_sum": 0.0, "prepared": 0,
                  "pool_evictions": 0, "pool_loads": 0}
        self._last = 0.0
        self._lock = threading.Lock()        # the counters and the pending write
        self._write_lock = threading.Lock()  # one write of the file at a time
        self._later: threading.Timer | None = None
        self._warned = False

    def _flush_later(self) -> None:
        with self._lock:
            self._later = None
        self.flush(force=True)

    def composition(self, seconds: float, hit: bool) -> None:
        with self._lock:
            self.c["composition_seconds_sum"] += seconds
            self.c["composition_count"] += 1
            self.c["composition_cache_hits" if hit else "composition_cache_misses"] += 1
            self.c["composition_hit_seconds_sum" if hit else "composition_miss_seconds_sum"] += seconds
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
        """Write the counters, at most every 0.5 s unless forced; a skipped write happens 0.5 s later
        (so the last counts of a burst reach the file even if nothing follows). Writes are serialised
        (threads of one process share the temp file) and never raise: a metrics file that cannot be
        written (the run directory removed at shutdown, a full disk) costs the metrics, never the
        engine."""
        with self._write_lock:
            now = time.monotonic()
            if not force and now - self._last < 0.5:
                with self._lock:
                    if self._later is None:
                        self._later = threading.Timer(0.5, self._flush_later)
                        self._later.daemon = True
                        try:
                            self._later.start()
                        except RuntimeError:  # no new thread (interpreter shutdown): the next flush writes
                            self._later = None
                return
            self._last = now
            with self._lock:
                data = json.dumps(self.c)
            tmp = self.path.with_suffix(".tmp")
            try:
                tmp.write_text(data)
                os.replace(tmp, self.path)
            except OSError as e:
                if not self._warned:
                    self._warned = True
                    log.warning("WRAG: cannot write metrics file %s (%s); the engine goes on without it",
                                self.path, e)


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


# engine counters: (key in the stats files, metric name without _total, help)
ENGINE_COUNTERS = [
    ("composition_seconds_sum", "wrag_composition_seconds", "WRAG composition time (engine core)"),
    ("composition_count", "wrag_compositions", "WRAG compositions looked up"),
    ("composition_cache_hits", "wrag_composition_cache_hits", "WRAG composition cache hits"),
    ("composition_cache_misses", "wrag_composition_cache_misses", "WRAG composition cache misses"),
    ("composition_hit_seconds_sum", "wrag_composition_hit_seconds", "WRAG composition time of cache hits"),
    ("composition_miss_seconds_sum", "wrag_composition_miss_seconds",
     "WRAG composition time of cache misses (compositions computed)"),
    ("prepare_seconds_sum", "wrag_prepare_seconds",
     "WRAG request preparation time in the engine core (store load + composition + payload)"),
    ("prepared", "wrag_prepared_requests", "WRAG requests prepared"),
    ("pool_evictions", "wrag_pool_evictions", "WRAG device pool evictions"),
    ("pool_loads", "wrag_pool_loads", "WRAG device pool slot loads"),
]
HIT_RATE = ("wrag_composition_cache_hit_rate", "WRAG composition cache hit rate")


def engine_values(run_dir: str | None) -> tuple[dict[str, float], float]:
    """(metric name -> counter value, composition cache hit rate) summed over the stats files."""
    s = read_engine_stats(run_dir)
    values = {name: float(s.get(key, 0)) for key, name, _ in ENGINE_COUNTERS}
    n = values["wrag_compositions"]
    return values, (values["wrag_composition_cache_hits"] / n) if n else 0.0


class FrontMetrics:
    def __init__(self, registry=None):
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        reg = registry or REGISTRY
        self.retrieval = Histogram("wrag_retrieval_seconds", "WRAG retrieval latency (refresh + embed + search)",
                                   buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=reg)
        self.shards = Histogram("wrag_shards_per_request", "WRAG shards applied per request",
                                buckets=(0, 1, 2, 3, 4, 6, 8, 16), registry=reg)
        self.requests = Counter("wrag_requests", "WRAG requests by plan source", ["source"], registry=reg)
        self.rejected = Counter("wrag_rejected_requests", "WRAG requests refused with HTTP 400", registry=reg)
        self._gauges = None
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self._gauges = {name: Gauge(f"{name}_total", doc, multiprocess_mode="mostrecent", registry=reg)
                            for _, name, doc in ENGINE_COUNTERS}
            self._gauges[HIT_RATE[0]] = Gauge(*HIT_RATE, multiprocess_mode="mostrecent", registry=reg)
        else:
            reg.register(_EngineCollector())

    def refresh_engine(self) -> None:
        """Multiprocess mode: set the engine gauges from the stats files (before a scrape)."""
        if self._gauges is None:
            return
        values, hit_rate = engine_values(os.environ.get("WRAG_RUN_DIR"))
        for name, v in values.items():
            self._gauges[name].set(v)
        self._gauges[HIT_RATE[0]].set(hit_rate)


class _EngineCollector:
    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        values, hit_rate = engine_values(os.environ.get("WRAG_RUN_DIR"))
        for _, name, doc in ENGINE_COUNTERS:
            yield CounterMetricFamily(name, doc, value=values[name])
        yield GaugeMetricFamily(*HIT_RATE, value=hit_rate)


def front_metrics() -> FrontMetrics:
    global _FRONT
    with _LOCK:
        if _FRONT is None:
            _FRONT = FrontMetrics()
        return _FRONT
