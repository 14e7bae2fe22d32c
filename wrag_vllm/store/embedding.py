"""Which texts of a shard are embedded, and the vectors the store keeps of them.

With d = description.strip(), S = the first MAX_SAMPLES non-blank samples, Q = the first
MAX_QUERIES non-blank queries and e(·) the embedder (unit rows), a shard's TEXT VECTORS are

    T = [e(d)] + e(S) + e(Q)          (m, dim), the rows of the texts it has

They are what its relevance head is fitted on (relevance.py); the catalog keeps STORED_ROWS of
them, evenly spaced (`stored_rows`), as the hard negatives of the heads of later shards near it
(12 KB per shard in float16); `reindex` recomputes all of them from the texts. Its CENTROID, the point that stands for the
shard when the store looks for its neighbours, is

    c = normalize(½·e(d) + ½·mean(e(S ∪ Q)))   if d and S ∪ Q;  e(d) or normalize(mean(...)) otherwise

so many samples cannot drown the author's description. A shard with no text at all is refused.
A caller may give precomputed vectors instead (bulk imports); `given_embeddings` checks them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..embed import Embedder, normalize_rows
from ..errors import StoreError

MAX_SAMPLES = 32  # samples embedded per shard (bounded cost per add)
MAX_QUERIES = 128  # queries embedded per shard
STORED_ROWS = 16   # text vectors the catalog keeps per shard


def _clean(texts: Sequence[str] | None, n: int) -> list[str]:
    return [t.strip() for t in (texts or []) if isinstance(t, str) and t.strip()][:n]


def shard_texts(description: str, samples: Sequence[str], queries: Sequence[str] = ()) -> tuple[str, list[str]]:
    """(description, samples + queries) as the rule embeds them."""
    return (description or "").strip(), _clean(samples, MAX_SAMPLES) + _clean(queries, MAX_QUERIES)


def embed_source(description: str, samples: Sequence[str], queries: Sequence[str] = ()) -> str:
    """Which texts the rule embeds: "description", "samples", "queries" joined by "+", or "" (none)."""
    parts = (("description", (description or "").strip()), ("samples", _clean(samples, 1)),
             ("queries", _clean(queries, 1)))
    return "+".join(p for p, ok in parts if ok)


def text_vectors(embedder: Embedder, items: Sequence[tuple[str, Sequence[str], Sequence[str]]]) -> list[np.ndarray]:
    """(description, samples, queries) triples -> each shard's text vectors (m_i, dim) float32,
    description first; one embedder call for all texts."""
    texts: list[str] = []
    spans = []
    for desc, samples, queries in items:
        d, rest = shard_texts(desc, samples, queries)
        if not d and not rest:
            raise StoreError("empty description and no samples or queries: nothing to embed")
        spans.append((len(texts), int(bool(d)) + len(rest), bool(d)))
        texts.extend(([d] if d else []) + rest)
    e = np.asarray(embedder.embed(texts), dtype=np.float32)  # (len(texts), dim)
    if e.shape != (len(texts), embedder.dim):
        raise StoreError(f"embedder {embedder.name!r} returned shape {e.shape}, expected "
                         f"({len(texts)}, {embedder.dim})")
    return [e[i:i + m] for i, m, _ in spans]


def stored_rows(tv: np.ndarray) -> np.ndarray:
    """The STORED_ROWS rows of text vectors tv (m, dim) the catalog keeps: evenly spaced, the first
    (the description's, when there is one) included."""
    if len(tv) <= STORED_ROWS:
        return tv
    return tv[np.linspace(0, len(tv) - 1, STORED_ROWS).round().astype(int)]


def centroid(tv: np.ndarray, has_description: bool = True) -> np.ndarray:
    """The centroid c (dim,) of text vectors tv (m, dim) whose first row is the description's when
    has_description (see the module doc)."""
    if has_description and len(tv) > 1:
        c = 0.5 * tv[0] + 0.5 * normalize_rows(tv[1:].mean(axis=0))[0]
    else:
        c = tv.mean(axis=0)
    return normalize_rows(c)[0]


def shard_embeddings(embedder: Embedder, items: Sequence[tuple]) -> np.ndarray:
    """(description, samples[, queries]) -> the shards' centroids (n, dim) float32 unit rows."""
    items = [(it[0], it[1], it[2] if len(it) > 2 else ()) for it in items]
    tvs = text_vectors(embedder, items)
    return np.stack([centroid(tv, bool((d or "").strip())) for tv, (d, _, _) in zip(tvs, items)])


def shard_embedding(embedder: Embedder, description: str, samples: Sequence[str] = (),
                    queries: Sequence[str] = ()) -> np.ndarray:
    """One shard's centroid (dim,) float32, unit norm."""
    return shard_embeddings(embedder, [(description, samples, queries)])[0]


def given_embeddings(embeddings: np.ndarray, n: int, dim: int, embedder_name: str) -> np.ndarray:
    """Precomputed vectors for n shards, checked ((n, dim), finite, non-zero) and normalised."""
    vecs = np.asarray(embeddings, dtype=np.float32)
    if vecs.ndim != 2 or vecs.shape != (n, dim):
        raise StoreError(f"embeddings have shape {tuple(vecs.shape)}, expected ({n}, {dim}) for embedder "
                         f"{embedder_name!r}")
    if not np.isfinite(vecs).all():
        raise StoreError("embeddings contain NaN or Inf values")
    if (np.linalg.norm(vecs, axis=1) == 0).any():
        raise StoreError("an embedding is the zero vector")
    return normalize_rows(vecs)
