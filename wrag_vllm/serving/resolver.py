"""Retrieval and the score → weight rule: request text + controls → a Plan.

Retrieved shards (relevance probabilities p_1 ≥ … ≥ p_k from ShardStore.search, the probability
that the text belongs to shard i's domain; kept if p_i ≥ threshold):

    w_i = softmax(z / T)_i = exp(z_i / T) / Σ_j exp(z_j / T),   z_i = logit(p_i) = ln(p_i / (1 − p_i))

(T = temperature; at T = 1 the weights are proportional to the odds p_i / (1 − p_i)).

Explicit shards (wrag_shards) take wrag_weights as given, else equal weights 1/k.

A composite (any k for svd-centered; k > k_max for linear) gets the server's rank budget
`composite_rank` as compose's `max_rank`, unless the request sets max_rank or energy itself, and
never below its largest shard's rank (one shard is served exactly): it is truncated in factor space
to its best approximation of that rank, so a step reads budget·(d_in + d_out) factor elements per
projection for it instead of Σ r_i·(d_in + d_out).

The Plan (plan.py) travels with the request to the engine core, which turns it into slot
payloads (admission.py + preparer.py).

Retrieval cost is bounded per request: only the last `query_max_tokens` (≈ 4 characters each) of
the query text are embedded, whatever the prompt's length.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import Future

from ..lru import ByteLRU
from ..store import ShardStore
from ..store.relevance import logit
from .config import WragConfig
from .controls import RequestControls, RequestError, check_method_params
from .plan import Plan

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


def retrieval_weights(probs: list[float], temperature: float) -> list[float]:
    """The weights of kept shards of relevance probabilities `probs` (module doc)."""
    return softmax_weights([logit(p) for p in probs], temperature)


class EmbedBatcher:
    """Concurrent requests share one embedder call; repeated queries are not embedded again.

    A caller that finds no batch in flight becomes the leader: it embeds every query queued so far,
    hands each caller its vector, and repeats until the queue is empty. A burst of 8 queries costs
    about one batched MiniLM call instead of 8 calls in a row. Vectors are kept by query text in an
    LRU of `cache_bytes` (a query vector is 1.5 KB: 8 MiB hold ~5,000), keyed by the embedder too.
    """

    def __init__(self, cache_bytes: int = 8 << 20):
        self._lock = threading.Lock()
        self._queue: list[tuple[str, Future]] = []
        self._busy = False
        self.cache = ByteLRU(cache_bytes)

    def embed(self, store, text: str):
        return self.embed_many(store, [text])[0]

    def embed_many(self, store, texts: list[str]) -> list:
        """The vectors of `texts`, in order: cached ones at once, the others in the batch of the
        current leader (one embedder call for all of a multi-prompt request's new queries)."""
        out, futs = [None] * len(texts), []
        with self._lock:
            for j, t in enumerate(texts):
                if (vec := self.cache.get((store.embedder_name, t))) is not None:
                    out[j] = vec
                else:
                    futs.append((j, Future()))
                    self._queue.append((t, futs[-1][1]))
            lead = bool(futs) and not self._busy
            self._busy = self._busy or bool(futs)
        while lead:
            with self._lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._busy = False
                    break
            try:
                uniq = list(dict.fromkeys(t for t, _ in batch))   # a text twice is embedded once
                vecs = dict(zip(uniq, store.embedder.embed(uniq)))
                with self._lock:
                    for t, v in vecs.items():  # a copy: a row view would pin its batch
                        self.cache.put((store.embedder_name, t), v.copy(), v.nbytes + len(t))
                for t, f in batch:
                    f.set_result(vecs[t])
            except BaseException as e:  # every waiter hears of the failure, none hangs
                for _, f in batch:
                    f.set_exception(e)
        for j, f in futs:
            out[j] = f.result()
        return out


class Resolver:
    """Thread-safe: every store call runs under one lock (the store is not assumed thread-safe)."""

    def __init__(self, cfg: WragConfig, store: ShardStore | None = None, watch: bool = False):
        """watch: keep the store's index current in the background (ShardStore.watch), so a
        request after another replica's add does not pay the catch-up (the API server)."""
        self.cfg = cfg
        self._store = store
        self._watch = watch
        self._lock = threading.RLock()
        self._batcher = EmbedBatcher()

    @property
    def store(self):
        with self._lock:
            if self._store is None:
                store = ShardStore(self.cfg.store)
                if self._watch:  # the process that retrieves: its index loaded before the first request
                    try:
                        store.load_index()
                        store.watch()
                    except BaseException:
                        store.close()
                        raise
                self._store = store  # only once ready: a failure here is retried by the next call
            return self._store

    def with_store(self, fn, wait: bool = True):
        """fn(store) under the resolver's lock, after picking up other processes' changes. With
        wait=False, None at once when another thread holds the store (callers on the engine loop
        must not wait for a retrieval or a composition)."""
        if not self._lock.acquire(blocking=wait):
            return None
        try:
            store = self.store
            store.refresh()
            return fn(store)
        finally:
            self._lock.release()

    def resolve_many(self, texts: list[str | None], c: RequestControls) -> list[Plan]:
        """One Plan per text (the prompts of a completions request, in order), under the same
        controls; the texts that retrieve are embedded in one batched call."""
        tails = [query_tail(t, self.cfg.query_max_tokens) if t else None for t in texts]
        todo = list(dict.fromkeys(t for t in tails if t)) if not (c.off or c.explicit) else []
        store = self.with_store(lambda st: st) if todo else None   # refreshed: its current embedder
        vecs = dict(zip(todo, self._batcher.embed_many(store, todo))) if todo else {}
        return [self.resolve(t, c, vecs.get(q)) for t, q in zip(texts, tails)]

    def composite_needed(self, method: str, k: int) -> bool:
        return not (method == "linear" and k <= self.cfg.k_max)

    def resolve(self, text: str | None, c: RequestControls, vec=None) -> Plan:
        """Raises RequestError for unknown ids or a set that cannot be served. vec: the query's
        embedding (dim,) when the caller embedded it already (batches)."""
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
            gen = store.generation
            if c.explicit:
                ids = list(c.shards)
                metas = []
                for i in ids:
                    try:
                        metas.append(store.get_meta(i))
                    except Exception:
                        raise RequestError(f"wrag_shards: unknown shard id {i!r}", "wrag_shards") from None
                weights = list(c.weights) if c.weights is not None else [1.0 / len(ids)] * len(ids) if ids else []
                params = self._budget(params, [self._rank(m) for m, w in zip(metas, weights) if w > 0], method)
                self._check_ranks(ids, metas, method, params)
                return Plan(ids, weights, method, params, [], "explicit" if ids else "off", gen)
            if not text:
                return Plan(method=method, params=params, source="none", generation=gen)
            k = c.top_k or cfg.top_k
            thr = cfg.threshold if c.threshold is None else c.threshold
        if vec is None:  # outside the lock: concurrent requests share one call
            vec = self._batcher.embed(store, query_tail(text, cfg.query_max_tokens))
        with self._lock:
            hits = [(i, float(s)) for i, s in store.search_vector(vec, k=k) if float(s) >= thr]
            if not hits:
                return Plan(method=method, params=params, source="none", generation=gen)
            metas = [store.get_meta(i) for i, _ in hits]
            rank_of = {i: self._rank(m) for (i, _), m in zip(hits, metas)}
            hits = self._fit_ranks(hits, metas, method, params)
            params = self._budget(params, [rank_of[i] for i, _ in hits], method)
            ids = [i for i, _ in hits]
            scores = [s for _, s in hits]
            return Plan(ids, retrieval_weights(scores, cfg.temperature), method, params, scores, "retrieved", gen)

    # ranks: a slot holds rank ≤ max_rank; a composite of k shards has rank ≤ min(Σ r_i, its max_rank)
    def _rank(self, meta: dict) -> int:
        return int(meta.get("rank", 0) or 0)

    def _budget(self, params: dict, ranks: list[int], method: str) -> dict:
        """params with the server's rank budget as max_rank, for a composite whose request set neither
        max_rank nor energy. At most the slot rank (max_rank), never below the set's largest shard rank
        (one shard is served exactly)."""
        if not (self.cfg.composite_rank and ranks and self.composite_needed(method, len(ranks))) \
                or params.get("max_rank") is not None or params.get("energy") is not None:
            return params
        cap = max(min(self.cfg.composite_rank, self.cfg.max_rank), max(ranks))
        return params if sum(ranks) <= cap else {**params, "max_rank": cap}

    def served_rank(self, ranks: list[int], params: dict, method: str) -> int:
        """The rank a set of shards of `ranks` occupies in one slot when composed (budget applied)."""
        cap = self._budget(params, ranks, method).get("max_rank")
        return sum(ranks) if cap is None else min(sum(ranks), int(cap))

    def _check_ranks(self, ids, metas, method, params) -> None:
        R = self.cfg.max_rank
        ranks = [self._rank(m) for m in metas]
        if self.composite_needed(method, len(ids)):
            if self.served_rank(ranks, params, method) > R:
                raise RequestError(f"wrag_shards: rank {self.served_rank(ranks, params, method)} of the "
                                   f"composition (Σ r_i = {sum(ranks)}) exceeds the "
                                   f"server's max_rank {R} (use fewer shards, a max_rank ≤ {R} in wrag_params, "
                                   f"or method 'linear' with at most {self.cfg.k_max} shards)", "wrag_shards")
        else:
            for i, r in zip(ids, ranks):
                if r > R:
                    raise RequestError(f"shard {i!r} has rank {r} > the server's max_rank {R}", "wrag_shards")

    def _fit_ranks(self, hits, metas, method, params):
        """Retrieval: drop the lowest-scored shards until the set fits the pool's rank."""
        R = self.cfg.max_rank
        keep = [(h, self._rank(m)) for h, m in zip(hits, metas) if self._rank(m) <= R]
        while keep and self.composite_needed(method, len(keep)) and \
                self.served_rank([r for _, r in keep], params, method) > R:
            keep.pop()
        return [h for h, _ in keep]
