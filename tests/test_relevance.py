"""Relevance heads (store/relevance.py) with the real MiniLM embedder, FAISS and SQLite: calibrated
scores, the shipped background, the demo shards on everyday requests, the schema-1 upgrade."""
from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from helpers_shards import random_shard, tiny_base

from wrag_vllm.embed import get_embedder
from wrag_vllm.store import ShardStore, relevance
from wrag_vllm.store.embedding import shard_embedding


@pytest.fixture(scope="module")
def minilm():
    emb = get_embedder("minilm")
    emb.embed(["warm up"])
    return emb


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory, minilm):
    from wrag_vllm.demo import domain_shards

    store = ShardStore(tmp_path_factory.mktemp("demo") / "store")
    store.add_many(domain_shards().values())
    yield store
    store.close()


def test_shipped_background_matches_the_corpus(minilm):
    """The precomputed vectors are the default embedder's vectors of today's corpus file."""
    path = relevance._shipped(minilm)
    assert path.exists(), f"{path} missing: run python -m benchmarks.data.build_background"
    vecs, texts = relevance.background_vectors(minilm), relevance.background_texts()
    assert vecs.shape == (len(texts), 384)
    idx = [0, len(texts) // 2, len(texts) - 1]
    assert np.allclose(vecs[idx], minilm.embed([texts[i] for i in idx]), atol=3e-3)


def test_fit_head_is_one_vector_scoring_a_probability():
    rng = np.random.default_rng(0)
    centre = rng.standard_normal(16)
    pos = centre + 0.3 * rng.standard_normal((40, 16))
    neg = rng.standard_normal((200, 16))
    h = relevance.fit_head(pos, neg)
    assert h.shape == (17,) and h.dtype == np.float32
    z = relevance.query_rows(np.stack([centre, -centre]).astype(np.float32)) @ h
    assert relevance.probability(z[0]) > 0.9 and relevance.probability(z[1]) < 0.1
    assert relevance.logit(relevance.probability(1.5)) == pytest.approx(1.5, abs=1e-6)
    assert np.isfinite(relevance.logit(1.0)) and np.isfinite(relevance.logit(0.0))


@pytest.mark.parametrize("text, want", [
    ("What causes high blood pressure?", "medicine"),
    ("my laptop won't connect to the wifi", "computing"),
    ("Can my landlord keep my security deposit?", "law"),
    ("Why did the Roman Empire fall?", "history"),
])
def test_demo_shards_take_their_everyday_questions(demo_store, text, want):
    hits = demo_store.search(text, k=4)
    assert hits[0][0] == want and hits[0][1] >= 0.5, hits
    assert all(p < hits[0][1] for _, p in hits[1:])


@pytest.mark.parametrize("text", ["Write a poem about the sea.", "hi! how are you today?",
                                  "Give me a recipe for banana bread."])
def test_demo_shards_stay_out_of_general_chat(demo_store, text):
    assert all(p < 0.5 for _, p in demo_store.search(text, k=4)), demo_store.search(text, k=4)


def test_adding_a_shard_never_refits_the_others(tmp_path, minilm):
    base = tiny_base(0)
    store = ShardStore(tmp_path / "s")
    store.add(random_shard(base, "heart", rank=2, description="Cardiology: heart disease and blood pressure.",
                           samples=["What is atrial fibrillation?"]))
    before = store._catalog.vectors([1])[0].copy()
    store.add(random_shard(base, "lungs", rank=2, seed=1, description="Pulmonology: asthma, COPD, lungs.",
                           samples=["How is asthma treated?"]))
    assert np.array_equal(store._catalog.vectors([1])[0], before)
    assert store.search("chest pain and high blood pressure", k=1)[0][0] == "heart"
    assert store.search("wheezing and shortness of breath from asthma", k=1)[0][0] == "lungs"


def test_a_given_vector_gets_the_fixed_cosine_head(tmp_path, minilm):
    store = ShardStore(tmp_path / "s")
    v = shard_embedding(minilm, "Cardiology: heart disease and blood pressure.")
    store.add(random_shard(tiny_base(0), "heart", rank=2, description="Cardiology"), embedding=v)
    assert store.get_meta("heart")["embed_source"] == "given"
    want = relevance.probability(relevance.COSINE_ALPHA * (1.0 - relevance.COSINE_MID))
    assert store.search_vector(v, k=1)[0][1] == pytest.approx(want, rel=1e-4)


def test_schema_1_store_is_upgraded_on_open(tmp_path, minilm):
    """A store of the previous schema (cosine centroids, no queries, no text vectors) opens, gets
    its heads fitted once, and keeps its shards."""
    root = tmp_path / "old"
    base = tiny_base(0)
    with ShardStore(root) as s:
        s.add_many([random_shard(base, "heart", rank=2, description="Cardiology: heart disease."),
                     random_shard(base, "tax", rank=2, seed=1, description="Tax law: income tax and VAT.")])
    con = sqlite3.connect(root / "catalog.sqlite")
    for fid, desc in con.execute("SELECT fid, description FROM shards").fetchall():
        con.execute("UPDATE shards SET embedding = ? WHERE fid = ?", (shard_embedding(minilm, desc).tobytes(), fid))
    cols = ("fid, id, file, name, description, samples, rank, targets, layers, bytes, provenance, "
            "allow_attention, embed_source, added_at, embedding")
    con.execute("CREATE TABLE old (fid INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
                "file TEXT NOT NULL UNIQUE, name TEXT NOT NULL, description TEXT NOT NULL, samples TEXT NOT NULL, "
                "rank INTEGER NOT NULL, targets TEXT NOT NULL, layers TEXT NOT NULL, bytes INTEGER NOT NULL, "
                "provenance TEXT NOT NULL, allow_attention INTEGER NOT NULL, embed_source TEXT NOT NULL, "
                "added_at TEXT NOT NULL, embedding BLOB NOT NULL)")
    con.execute(f"INSERT INTO old ({cols}) SELECT {cols} FROM shards")
    con.execute("DROP TABLE shards")
    con.execute("ALTER TABLE old RENAME TO shards")
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    store = ShardStore(root)
    assert store.verify() == [] and len(store) == 2
    assert store.search("how much income tax do I owe", k=1)[0][0] == "tax"
    assert set(store.text_vectors(["heart", "tax"])) == {"heart", "tax"}
    con = sqlite3.connect(root / "catalog.sqlite")
    meta = dict(con.execute("SELECT key, value FROM meta"))
    assert meta["schema_version"] == "2" and "stale_heads" not in meta
    con.close()


def test_a_follow_up_keeps_the_conversation_domain(demo_store):
    """The front end's query: the last user turn after the earlier ones (query_context_turns)."""
    from wrag_vllm.serving.frontend import query_text

    body = {"messages": [{"role": "system", "content": "You are helpful."},
                         {"role": "user", "content": "What causes high blood pressure?"},
                         {"role": "assistant", "content": "Many things: salt, stress, genetics, age. " * 20},
                         {"role": "user", "content": [{"type": "text", "text": "and how is it treated?"}]}]}
    assert query_text("chat", body, 0) == "and how is it treated?"
    q = query_text("chat", body, 2)
    assert q == "and how is it treated?\nWhat causes high blood pressure?"
    hit = demo_store.search(q, k=1)[0]
    assert hit[0] == "medicine" and hit[1] >= 0.5, hit
    assert query_text("responses", {"input": body["messages"]}, 1) == q
    assert query_text("chat", {"messages": [{"role": "assistant", "content": "hi"}]}, 2) is None
    # context is what a budget cuts, never the last turn; a last turn without text retrieves nothing
    long = {"messages": [{"role": "user", "content": "x = 1\n" * 400}, body["messages"][3]]}
    assert query_text("chat", long, 2, max_chars=1024) == "and how is it treated?"
    image = {"messages": body["messages"][:2] + [{"role": "user", "content": [{"type": "image_url"}]}]}
    assert query_text("chat", image, 2) is None


def test_the_catalog_keeps_a_bounded_subset_of_text_vectors(tmp_path, minilm):
    from wrag_vllm.store.embedding import STORED_ROWS

    store = ShardStore(tmp_path / "s")
    samples = [f"question {i} about the heart and blood pressure" for i in range(40)]
    store.add(random_shard(tiny_base(0), "heart", rank=2, description="Cardiology.", samples=samples,
                           queries=["is a pulse of 110 too fast?"]))
    tv = store.text_vectors(["heart"])["heart"]
    assert tv.shape == (STORED_ROWS, 384)
    assert np.allclose(tv[0], minilm.embed(["Cardiology."])[0], atol=2e-3)  # the description's row is kept
    assert np.allclose(tv[-1], minilm.embed(["is a pulse of 110 too fast?"])[0], atol=2e-3)
