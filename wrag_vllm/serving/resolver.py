"""Retrieval and the score → weight rule: request text + controls → a Plan.

Retrieved shards (cosine scores c_1 ≥ … ≥ c_k from ShardStore.search, kept if c_i ≥ threshold):

    w_i = softmax(c / T)_i = exp(c_i / T) / Σ_j exp(c_j / T)        (T = temperature)

Explicit shards (wrag_shards) take wrag_weights as given, else equal weights 1/k.

A Plan is what travels with the request (sealed JSON in SamplingParams.extra_args["wrag_plan"],
see seal.py): the engine core turns it into slot payloads (scheduler + preparer), the workers
apply them.

Retrieval cost is bounded per request: only the last `query_max_tokens` (≈ 4 characters each) of
the query text are embedded, whatever the prompt's length.
"""
from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field

from .config import WragConfig
from .seal import seal, unseal
from .xargs import RequestControls, RequestError, check_method_params

PLAN_VERSION = 1


@dataclass
class Plan:
    ids: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    method: str = "svd-centered"
    params: dict = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)   # retrieval scores (empty for explicit)
    source: str = "none"                                 # explicit | retrieved | off | none
    generation: int = -1                                 # store generation the plan was made at

    @property
    def empty(self) -> bool:
        return not self.ids

    def to_json(self) -> str:
        d = asdict(self)
        d["v"] = PLAN_VERSION
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str) -> "Plan":
        d = json.loads(s)
        if not isinstance(d, dict) or d.pop("v", None) != PLAN_VERSION:
            raise ValueError("not a WRAG plan of this version")
        p = cls(**d)
        if len(p.ids) != len(p.weights):
            raise ValueError("plan ids and weights differ in length")
        return p

    def sealed(self) -> str:
        """The form that travels in extra_args: only this server can make it (seal.py)."""
        return seal(self.to_json())

    @classmethod
    def from_sealed(cls, s) -> "Plan":
        """ValueError unless `s` is a plan sealed by this server."""
        return cls.from_json(unseal(s))

    def header(self) -> str:
        """Compact form for the x-wrag-shards response header: id=weight,... or '-'."""
        if self.empty:
            return "-"
        return ",".join(f"{i}={w:.4g}" for i, w in zip(self.ids, self.weights))

    def scores_header(self) -> str:
        """x-wrag-scores: id=cosine,... for retrieved shards, '-' when none were retrieved."""
        if self.empty or not self.scores:
            return "-"
        return ",".join(f"{i}={s:.4f}" for i, s in zip(self.ids, self.scores))

    def summary(self) -> dict:
        return {"shards": [{"id": i, "weight": w, **({"score": s} if self.scores else {})}
                           for i, w, s in zip(self.ids, self.weights, self.scores or [None] * len(self.ids))],
                "method": self.method, "source": self.source}


def query_tail(text: str, max_tokens: int) -> str:
    """The end of `text`, about `max_tokens` tokens long (4 characters per token), cut at a space."""
    n = 4 * max_tokens
    if len(text) <= n:
        return text
    tail = text[-n:]
    cut = tail.find(" ")
    return tail[cut + 1:] if 0 <= cut < 64 else tail


def softmax_weights(scores: list[float], temperature: float) -> list[float]:
    if not scores:
        return []
    m = max(scores)
    e = [math.exp((s - m) / temperature) for s in scores]
    z = sum(e)
    return [x / z for x in e]


class EmbedBatcher:
    """Concurrent requests share one embedder call.

    A caller that finds no batch in flight becomes the leader: it embeds every query queued so far,
    hands each caller its vector, and repeats until the queue is empty. A burst of 8 queries costs
    about one batched MiniLM call instead of 8 calls in a row.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._queue: list[tuple[str, Future]] = []
        self._busy = False

    def embed(self, store, text: str):
        fut: Future = Future()
        with self._lock:
            self._queue.append((text, fut))
            lead = not self._busy
            self._busy = True
        while lead:
            with self._lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._busy = False
                    break
            try:
                vecs = store.embedder.embed([t for t, _ in batch])
                for (_, f), v in zip(batch, vecs):
                    f.set_result(v)
            except BaseException as e:  # every waiter hears of the failure, none hangs
                for _, f in batch:
                    f.set_exception(e)
        return fut.result()


class Resolver:
    """Thread-safe: every store call runs under one lock (the store is not assumed thread-safe)."""

    def __init__(self, cfg: WragConfig, store=None):
        self.cfg = cfg
        self._store = store
        self._lock = threading.RLock()
        self._batcher = EmbedBatcher()

    @property
    def store(self):
        with self._lock:
            if self._store is None:
                from ..store import ShardStore
                self._store = ShardStore(self.cfg.store)
            return self._store

    def refresh(self) -> None:
        with self._lock:
            self.store.refresh()

    def with_store(self, fn):
        """fn(store) under the resolver's lock, after picking up other processes' changes."""
        with self._lock:
            store = self.store
            store.refresh()
            return fn(store)

    def composite_needed(self, method: str, k: int) -> bool:
        return not (method == "linear" and k <= self.cfg.k_max)

    def resolve(self, text: str | None, c: RequestControls) -> Plan:
        """Raises RequestError for unknown ids or a set that cannot be served."""
        cfg = self.cfg
        method = c.method or cfg.method
        params = {**cfg.method_params, **(c.params or {})} if (c.method is None or c.method == cfg.method) \
            else dict(c.params or {})
        if c.off:
            return Plan(method=method, params=params, source="off")
        check_method_params(method, params, cfg)  # bad parameters -> 400, not a silent base answer
        with self._lock:
            store = self.store
            store.refresh()  # hot updates: see shards added/removed by other processes
            gen = getattr(store, "generation", -1)
            if c.explicit:
                ids = list(c.shards)
                metas = []
                for i in ids:
                    try:
                        metas.append(store.get_meta(i))
                    except Exception:
                        raise RequestError(f"wrag_shards: unknown shard id {i!r}", "wrag_shards") from None
                weights = list(c.weights) if c.weights is not None else [1.0 / len(ids)] * len(ids) if ids else []
                self._check_ranks(ids, metas, method, explicit=True)
                return Plan(ids, weights, method, params, [], "explicit" if ids else "off", gen)
            if not text:
                return Plan(method=method, params=params, source="none", generation=gen)
            k = c.top_k or cfg.top_k
            thr = cfg.threshold if c.threshold is None else c.threshold
            t0 = time.perf_counter()
        vec = self._batcher.embed(store, query_tail(text, cfg.query_max_tokens))  # outside the lock: concurrent requests share one call
        with self._lock:
            hits = [(i, float(s)) for i, s in store.search_vector(vec, k=k) if float(s) >= thr]
            self.last_search_s = time.perf_counter() - t0
            if not hits:
                return Plan(method=method, params=params, source="none", generation=gen)
            metas = [store.get_meta(i) for i, _ in hits]
            hits = self._fit_ranks(hits, metas, method)
            ids = [i for i, _ in hits]
            scores = [s for _, s in hits]
            return Plan(ids, softmax_weights(scores, cfg.temperature), method, params, scores, "retrieved", gen)

    # ranks: a slot holds rank ≤ max_rank; a composite of k shards has rank ≤ Σ r_i
    def _rank(self, meta: dict) -> int:
        return int(meta.get("rank", 0) or 0)

    def _check_ranks(self, ids, metas, method, explicit: bool) -> None:
        R = self.cfg.max_rank
        ranks = [self._rank(m) for m in metas]
        if self.composite_needed(method, len(ids)):
            if sum(ranks) > R:
                raise RequestError(f"wrag_shards: total rank {sum(ranks)} of the composition exceeds the "
                                   f"server's max_rank {R} (use fewer shards, or method 'linear' with at "
                                   f"most {self.cfg.k_max} shards)", "wrag_shards")
        else:
            for i, r in zip(ids, ranks):
                if r > R:
                    raise RequestError(f"shard {i!r} has rank {r} > the server's max_rank {R}", "wrag_shards")

    def _fit_ranks(self, hits, metas, method):
        """Retrieval: drop the lowest-scored shards until the set fits the pool's rank."""
        R = self.cfg.max_rank
        keep = [(h, self._rank(m)) for h, m in zip(hits, metas) if self._rank(m) <= R]
        while keep and self.composite_needed(method, len(keep)) and sum(r for _, r in keep) > R:
            keep.pop()
        return [h for h, _ in keep]
