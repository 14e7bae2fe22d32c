"""The embedding rule: which texts of a shard are embedded, and how they become one vector.

With d = description.strip(), S = the first MAX_SAMPLES non-blank samples and e(·) the embedder
(unit rows):
    v = normalize(½·e(d) + ½·mean_i e(S_i))   if d and S
    v = e(d)                                  if only d
    v = normalize(mean_i e(S_i))              if only S
i.e. the centroid of the texts where the description weighs as much as all samples together, so
many samples cannot drown the author's description. A shard with no text at all is refused: the
texts are also what `ShardStore.reindex` re-embeds when the store moves to another embedder.

A caller may give precomputed vectors instead (bulk imports); `given_embeddings` checks them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..embed import Embedder, normalize_rows
from ..errors import StoreError

MAX_SAMPLES = 32  # samples embedded per shard (bounded cost per add)


def _shard_texts(description: str, samples: Sequence[str]) -> tuple[str, list[str]]:
    d = (description or "").strip()
    s = [t.strip() for t in (samples or []) if isinstance(t, str) and t.strip()][:MAX_SAMPLES]
    return d, s


def embed_source(description: str, samples: Sequence[str]) -> str:
    """Which texts the rule embeds: "description", "samples", "description+samples" or "" (none)."""
    d, s = _shard_texts(description, samples)
    return "+".join(p for p, ok in (("description", d), ("samples", s)) if ok)


def shard_embeddings(embedder: Embedder, items: Sequence[tuple[str, Sequence[str]]]) -> np.ndarray:
    """(description, samples) pairs -> (n, dim) float32 unit rows, one embedder call for all texts."""
    texts: list[str] = []
    spans = []
    for desc, samples in items:
        d, s = _shard_texts(desc, samples)
        if not d and not s:
            raise StoreError("empty description and no samples: nothing to embed")
        i = len(texts)
        texts.extend(([d] if d else []) + s)
        spans.append((i, bool(d), len(s)))
    e = np.asarray(embedder.embed(texts), dtype=np.float32)  # (len(texts), dim)
    if e.shape != (len(texts), embedder.dim):
        raise StoreError(f"embedder {embedder.name!r} returned shape {e.shape}, expected "
                         f"({len(texts)}, {embedder.dim})")
    out = np.empty((len(items), embedder.dim), dtype=np.float32)
    for row, (i, has_d, ns) in enumerate(spans):
        parts = []
        if has_d:
            parts.append(e[i])
        if ns:
            j = i + int(has_d)
            parts.append(normalize_rows(e[j:j + ns].mean(axis=0))[0])
        out[row] = parts[0] if len(parts) == 1 else 0.5 * (parts[0] + parts[1])
    return normalize_rows(out)


def shard_embedding(embedder: Embedder, description: str, samples: Sequence[str] = ()) -> np.ndarray:
    """One shard's embedding (dim,) float32, unit norm."""
    return shard_embeddings(embedder, [(description, samples)])[0]


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
