"""Relevance heads: a retrieval score that means "this text belongs to this shard's domain".

For shard s and a text with embedding x = e(text) (unit row, dim d):

    p_s(x) = σ(w_s·x + b_s)                       σ(z) = 1 / (1 + e^(−z))

(w_s, b_s) is an L2-regularised logistic regression fitted when the shard is registered:

    positives  the shard's own texts: description, samples and queries (embedding.py)
    negatives  BACKGROUND: general text shipped with the package (data/background/general.jsonl:
               everyday requests and passages, written for this project, Apache-2.0), and the
               texts of the NEIGHBOURS shards of the store whose heads score the new shard's
               centroid highest (its confusable domains; other shards of the same add count too)
    weights    each class weighs half of the loss (class_weight="balanced"), so p_s = ½ where a
               text is as likely the shard's as anyone else's: the threshold reads as a
               probability, the same for every shard, instead of a raw cosine whose meaning
               depends on how far the shard's texts sit from short questions.

FAISS keeps h_s = [w_s, b_s] (d + 1 values) and is searched with q = [e(text), 1]: h_s·q = w_s·x + b_s
is the logit, so one exact inner-product search gives the top k shards by p_s (σ is monotone).

A shard registered with a precomputed vector v (bulk imports) has no texts to fit on; its head is
the cosine through a fixed logistic: w = α·v, b = −α·c₀, i.e. p = σ(α·(cos − c₀)).

Registering a shard never refits the others: a head fitted before B was added saw none of B's
texts. `ShardStore.reindex()` refits every head with the whole store as neighbours.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np

from ..embed import Embedder

BACKGROUND = Path(__file__).resolve().parent.parent / "data" / "background"
NEIGHBOURS = 8          # shards whose texts are a new head's hard negatives
C = 2.0                 # inverse L2 strength of the logistic regression (chosen on the dev set: docs/decisions.md)
COSINE_ALPHA, COSINE_MID = 20.0, 0.35   # the fixed head of a shard given as a vector
_P_EPS = 1e-7

_bg_lock = threading.Lock()
_bg_cache: dict[str, np.ndarray] = {}


def background_texts() -> list[str]:
    with open(BACKGROUND / "general.jsonl", encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


def background_digest() -> str:
    """sha256 of the background corpus file: the key of its precomputed embeddings."""
    return hashlib.sha256((BACKGROUND / "general.jsonl").read_bytes()).hexdigest()[:16]


def _shipped(embedder: Embedder) -> Path:
    return BACKGROUND / f"{embedder.name}-{background_digest()}.npy"


def background_vectors(embedder: Embedder) -> np.ndarray:
    """The background corpus embedded by `embedder`: (n, d) float32 unit rows. Shipped precomputed
    for the default embedder (`python -m benchmarks.data.build_background` writes the file);
    embedded once per process for any other."""
    key = f"{embedder.name}/{embedder.dim}"
    with _bg_lock:
        if key not in _bg_cache:
            path = _shipped(embedder)
            if path.exists():
                vecs = np.load(path).astype(np.float32)
            else:
                vecs = np.asarray(embedder.embed(background_texts()), dtype=np.float32)
            if vecs.shape[1:] != (embedder.dim,):
                raise ValueError(f"background embeddings {path} have shape {vecs.shape}, embedder "
                                 f"{embedder.name!r} has dim {embedder.dim}")
            _bg_cache[key] = vecs
        return _bg_cache[key]


def fit_head(pos: np.ndarray, neg: np.ndarray, c: float | None = None) -> np.ndarray:
    """The head [w, b] (d + 1,) float32 of texts pos (m, d) against neg (n, d); see the module doc."""
    from sklearn.linear_model import LogisticRegression   # only writers fit heads

    x = np.concatenate([pos, neg]).astype(np.float64)
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    lr = LogisticRegression(C=C if c is None else c, class_weight="balanced", max_iter=1000, tol=1e-6).fit(x, y)
    return np.r_[lr.coef_[0], lr.intercept_[0]].astype(np.float32)


def cosine_head(v: np.ndarray) -> np.ndarray:
    """The fixed head of a shard given only as a unit vector v (d,): p = σ(α·(v·x − c₀))."""
    return np.r_[COSINE_ALPHA * np.asarray(v, dtype=np.float32), -COSINE_ALPHA * COSINE_MID].astype(np.float32)


def head_dim(dim: int) -> int:
    """Values per index row for an embedder of `dim`: the weights and the bias."""
    return dim + 1


def query_rows(q: np.ndarray) -> np.ndarray:
    """Unit query rows q (n, d) -> (n, d + 1) rows [q, 1] for the head index."""
    return np.ascontiguousarray(np.hstack([q, np.ones((len(q), 1), dtype=np.float32)]), dtype=np.float32)


def probability(logit: float) -> float:
    return float(1.0 / (1.0 + np.exp(-np.clip(logit, -60.0, 60.0))))


def logit(p: float) -> float:
    """The inverse of `probability`, clamped so that p = 0 or 1 stays finite."""
    p = min(max(float(p), _P_EPS), 1.0 - _P_EPS)
    return float(np.log(p / (1.0 - p)))
