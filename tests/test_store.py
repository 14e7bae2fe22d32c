"""ShardStore with real SQLite and PostgreSQL (each test runs on both: the store_at fixture), FAISS,
safetensors and the real MiniLM embedder."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_shards import random_shard, tiny_base, tiny_llama
from helpers_store import check_consistent, snapshot, unit

from wrag_vllm.embed import get_embedder, normalize_rows, register_embedder
from wrag_vllm.errors import ShardError, StoreError, WragError
from wrag_vllm.fingerprint import fingerprint_model
from wrag_vllm import shard as shard_io
from wrag_vllm.shard import Shard
from wrag_vllm.store import INDEX, ShardStore, default_store_path, shard_embedding

DOMAINS = {
    "cardio": ("Cardiology: heart failure, arrhythmia, myocardial infarction and blood pressure.",
               ["What are the symptoms of atrial fibrillation?", "How is hypertension treated?"]),
    "tax": ("Tax law: income tax returns, VAT, deductions and corporate taxation.",
            ["Can I deduct my home office?", "When is the VAT return due?"]),
    "compilers": ("Compilers: parsing, register allocation, instruction selection and optimisation.",
                  ["How does SSA form help constant propagation?"]),
    "baking": ("French pastry and baking: croissants, bread dough, laminated butter, ovens.", []),
    "astro": ("", ["How do black holes form?", "What is the redshift of a distant galaxy?",
                   "Explain the life cycle of a star."]),
}
QUERIES = {
    "My heart beats irregularly and I feel chest pain": "cardio",
    "how much tax do I owe on my salary": "tax",
    "write a lexer and a parser for my programming language": "compilers",
    "recipe for a flaky croissant": "baking",
    "neutron stars and supernova explosions": "astro",
}


@pytest.fixture(scope="module")
def minilm():
    emb = get_embedder("minilm")
    emb.embed(["warm up"])  # load once for the whole module
    return emb


@pytest.fixture(scope="module")
def base():
    return tiny_base(0)


@pytest.fixture(scope="module")
def other_base():
    return tiny_base(1)  # same shapes, different weights


@pytest.fixture
def domain_store(store_at, base, minilm):
    with ShardStore(store_at("store")) as store:
        store.add_many([_with_desc(random_shard(base, sid, rank=2, seed=i, samples=samples), desc)
                        for i, (sid, (desc, samples)) in enumerate(DOMAINS.items())])
    store = ShardStore(store_at("store"))  # reopened: index cache persisted at the current generation
    yield store
    store.close()


def _with_desc(shard: Shard, desc: str) -> Shard:
    shard.description = desc
    return shard


# ----------------------------------------------------------------------------------- basics
def test_add_list_meta_load_roundtrip(store_at, base, minilm):
    store = ShardStore(store_at("s"))
    assert store.base is None and store.generation == 0 and store.list() == []
    sh = random_shard(base, "med", rank=3, seed=7, description="medicine", samples=["a", "b"])
    sh.provenance = {"source": "test"}
    row = store.add(sh)
    assert store.base == base and store.generation == 1 and len(store) == 1 and "med" in store
    assert row == store.get_meta("med") == store.list()[0]
    assert row["rank"] == 3 and row["targets"] == ["down_proj", "gate_proj", "up_proj"]
    assert row["layers"] == [0, 1] and row["samples"] == ["a", "b"] and row["provenance"] == {"source": "test"}
    assert row["embed_source"] == "description+samples" and row["bytes"] == Path(row["path"]).stat().st_size
    name = "med.safetensors" if store_at.backend == "sqlite" else Path(row["path"]).name  # med@<sha>.safetensors
    assert Path(row["path"]) == store.root / "shards" / name == store.path("med") and name.startswith("med")
    back = store.load("med")
    assert back.id == "med" and back.base == base and set(back.factors) == set(sh.factors)
    for k, f in sh.factors.items():
        assert torch.equal(back.factors[k].A, f.A) and torch.equal(back.factors[k].B, f.B)
        assert back.factors[k].scale == f.scale
    assert store.verify() == []


def test_search_finds_the_right_domain(domain_store):
    for q, want in QUERIES.items():
        hits = domain_store.search(q, k=3)
        assert hits[0][0] == want, (q, hits)
        assert len(hits) == 3 and hits[0][1] >= hits[1][1] >= hits[2][1]
        assert 0.0 <= hits[2][1] <= hits[0][1] <= 1.0  # relevance probabilities


def test_search_many_matches_search(domain_store):
    qs = list(QUERIES)
    many = domain_store.search_many(qs, k=2)
    for q, hits in zip(qs, many):
        one = domain_store.search(q, k=2)
        assert [i for i, _ in hits] == [i for i, _ in one]
        assert np.allclose([s for _, s in hits], [s for _, s in one], atol=1e-5)
    assert domain_store.search_many([], k=2) == []
    assert domain_store.search("anything", k=0) == []
    assert len(domain_store.search("anything", k=50)) == len(DOMAINS)  # k clipped to the store size


def test_embedding_rule(domain_store, minilm):
    """Text vectors [e(d)] + e(samples) + e(queries); centroid normalize(½ e(d) + ½ normalize(mean e(s)));
    each head gives its own texts p > ½."""
    desc, samples = DOMAINS["cardio"]
    e = minilm.embed([desc] + samples)
    want = normalize_rows(0.5 * e[0] + 0.5 * normalize_rows(e[1:].mean(0))[0])[0]
    assert np.allclose(shard_embedding(minilm, desc, samples), want, atol=1e-6)
    tv = domain_store.text_vectors(["cardio", "astro", "baking", "nope"])
    assert set(tv) == {"cardio", "astro", "baking"}
    assert np.allclose(tv["cardio"], e, atol=2e-3)  # stored as float16 (all 3 rows: ≤ STORED_ROWS)
    assert tv["baking"].shape == (1, 384) and tv["astro"].shape == (3, 384)
    for sid, (d, s) in DOMAINS.items():
        for text in [d] + s if d else s:
            hit = domain_store.search(text, k=1)[0]
            assert hit[0] == sid and hit[1] > 0.5, (text, hit)
    assert domain_store.get_meta("astro")["embed_source"] == "samples"
    # blank samples are ignored, whitespace trimmed
    assert np.allclose(shard_embedding(minilm, "  x ", ["", "   "]), minilm.embed(["x"])[0], atol=1e-6)


def test_search_vector_normalises_and_checks(domain_store, minilm):
    v = minilm.embed(["recipe for a flaky croissant"])[0]
    scaled, plain = domain_store.search_vector(v * 7.0, k=2), domain_store.search_vector(v, k=2)
    assert [i for i, _ in scaled] == [i for i, _ in plain] == ["baking", scaled[1][0]]
    assert [s for _, s in scaled] == pytest.approx([s for _, s in plain], abs=1e-6)
    with pytest.raises(StoreError, match="shape"):
        domain_store.search_vector(np.ones(10, np.float32), k=1)
    with pytest.raises(StoreError, match="NaN"):
        domain_store.search_vector(np.full(384, np.nan, np.float32), k=1)


def test_remove_and_overwrite(domain_store, base, minilm):
    g = domain_store.generation
    path = Path(domain_store.get_meta("tax")["path"])
    domain_store.remove("tax")
    assert domain_store.generation == g + 1 and "tax" not in domain_store and not path.exists()
    assert all(h[0] != "tax" for h in domain_store.search("income tax return", k=5))
    # overwrite: new content, new file name, the old file is gone, one row
    old = domain_store.get_meta("baking")
    new = random_shard(base, "baking", rank=4, seed=99, description="Quantum field theory and particle physics.")
    with pytest.raises(StoreError, match="already exists"):
        domain_store.add(new)
    row = domain_store.add(new, overwrite=True)
    assert row["rank"] == 4 and row["path"] != old["path"] and not Path(old["path"]).exists()
    assert [r["id"] for r in domain_store.list()].count("baking") == 1
    assert domain_store.search("the Higgs boson and quarks", k=1)[0][0] == "baking"
    assert domain_store.load("baking").rank == 4
    row2 = domain_store.add(new, overwrite=True)  # alternate back to the plain name
    assert not Path(row["path"]).exists()
    if domain_store.location == domain_store.root:  # a folder store alternates between two names
        assert Path(row2["path"]).name == "baking.safetensors"
    assert domain_store.verify() == []


def test_reopen_uses_persisted_index_and_catches_up(store_at, base):
    root = store_at("s")
    with ShardStore(root) as a:
        a.load_index()  # adds with given vectors need no index: a loaded one is kept in step and persisted
        for i in range(5):
            a.add(random_shard(base, f"s{i}", rank=2, seed=i), embedding=unit(f"s{i}"))
    b = ShardStore(root)
    assert not b._index.loaded and b.generation == 5 and len(b) == 5  # no search yet: no index in memory
    b.load_index()
    assert b._index.persisted == (b._index.epoch, b._index.generation) == (b._index.epoch, 5)  # the file's
    assert [b.search_vector(unit(f"s{i}"), 1)[0][0] for i in range(5)] == [f"s{i}" for i in range(5)]
    # a writer that never closes leaves the index file stale: the next opener's first search diffs it
    b.add(random_shard(base, "late", rank=2, seed=9), embedding=unit("late"))
    b.remove("s0")
    c = ShardStore(root)
    assert c.generation == 7 and len(c) == 5 and c.search_vector(unit("late"), 1)[0][0] == "late"
    assert all(h[0] != "s0" for h in c.search_vector(unit("s0"), 5))
    assert c.verify() == []
    # a corrupt index file is only a cache: rebuilt from the catalog
    c.close(), b.close()
    (c.root / INDEX).write_bytes(b"garbage" * 100)
    d = ShardStore(root)
    assert d.verify() == [] and d.search_vector(unit("late"), 1)[0][0] == "late"


def test_refresh_across_instances(store_at, base):
    root = store_at("s")
    writer, reader = ShardStore(root), ShardStore(root)
    reader.load_index()  # else its first search loads the index as of then
    assert reader.refresh() is False
    writer.add(random_shard(base, "x", rank=2), embedding=unit("x"))
    assert reader.search_vector(unit("x"), 1) == []  # not yet refreshed
    assert reader.refresh() is True and reader.generation == writer.generation == 1
    assert reader.search_vector(unit("x"), 1)[0][0] == "x" and reader.base == base
    assert reader.refresh() is False
    writer.remove("x")
    assert reader.refresh() is True and reader.search_vector(unit("x"), 1) == []
    # a remove and an add between two refreshes (same count): still seen exactly
    for i in ("p", "q"):
        writer.add(random_shard(base, i, rank=2), embedding=unit(i))
    reader.refresh()
    writer.remove("p")
    writer.add(random_shard(base, "r", rank=2), embedding=unit("r"))
    assert reader.refresh() is True and {i for i, _ in reader.search_vector(unit("r"), 5)} == {"q", "r"}
    assert reader.verify() == [] and len(reader) == 2
    # the no-change path (what a server pays per batch; timed by benchmarks.micro.bench_store)
    assert not any(reader.refresh() for _ in range(100))


def test_threads_share_one_store(store_at, base):
    store = ShardStore(store_at("s"))
    store.add(random_shard(base, "seed", rank=2), embedding=unit("seed"))
    errors = []

    def writer(t):
        try:
            for j in range(5):
                i = f"t{t}-{j}"
                store.add(random_shard(base, i, rank=2, seed=j), embedding=unit(i))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def reader():
        try:
            for _ in range(200):
                assert store.search_vector(unit("seed"), 1)[0][0] == "seed"
                store.refresh()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=writer, args=(t,)) for t in range(2)] + [threading.Thread(target=reader)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert errors == [] and len(store) == 11 and store.generation == 11 and store.verify() == []


def test_default_store_path(monkeypatch, tmp_path):
    monkeypatch.setenv("WRAG_STORE", str(tmp_path / "w"))
    assert default_store_path() == tmp_path / "w"
    monkeypatch.setenv("WRAG_STORE", "postgresql://wrag@db.example/shards")
    assert default_store_path() == "postgresql://wrag@db.example/shards"
    for bad in ("mysql://db/x", "s3://bucket/store", "file:///tmp/x"):
        monkeypatch.setenv("WRAG_STORE", bad)
        with pytest.raises(StoreError, match="not supported"):
            default_store_path()
    monkeypatch.delenv("WRAG_STORE")
    assert default_store_path() == Path.home() / ".local/share/wrag/store"


def test_attention_shards_only_with_override(store_at, base):
    store = ShardStore(store_at("s"))
    att = random_shard(base, "att", rank=2, modules=("q_proj", "gate_proj"))
    with pytest.raises(ShardError, match="attention"):
        store.add(att, embedding=unit("att"))
    assert store.list() == [] and list((store.root / "shards").iterdir()) == []
    row = store.add(att, allow_attention=True, embedding=unit("att"))
    assert row["allow_attention"] is True and "q_proj" in row["targets"]
    assert store.load("att").factors[(0, "q_proj")].rank == 2


# ------------------------------------------------------------------- base and embedder binding
def test_init_binds_base(store_at, base, other_base):
    root = store_at("s")
    store = ShardStore.init(root, base=base)
    assert store.base == base and ShardStore(root).base == base and store.generation == 0
    ShardStore.init(root, base=base)  # idempotent
    with pytest.raises(StoreError, match="weights_hash differs"):
        ShardStore.init(root, base=other_base)
    with pytest.raises(StoreError, match="different base model"):
        store.add(random_shard(other_base, "o", rank=2), embedding=unit("o"))
    assert store.list() == []


def test_refuses_to_mix_embedders(store_at, base, minilm):
    class Tiny:
        name, dim = "tiny-test", 8

        def embed(self, texts):
            return normalize_rows(np.stack([unit(t, 8) for t in texts])) if texts else np.zeros((0, 8), np.float32)

    root = store_at("s")
    ShardStore(root).add(random_shard(base, "a", rank=2, description="heart disease"))
    with pytest.raises(StoreError, match=r"embedder 'minilm' \(dim 384\).*'tiny-test' \(dim 8\)"):
        ShardStore(root, embedder=Tiny())
    # a store built with Tiny refuses MiniLM
    other = store_at("t")
    ShardStore(other, embedder=Tiny()).add(random_shard(base, "b", rank=2, description="b"))
    with pytest.raises(StoreError, match="refusing to mix"):
        ShardStore(other, embedder=minilm)
    # reindex switches a store to another embedder explicitly
    register_embedder("tiny-test", Tiny)
    s = ShardStore(root)
    g = s.generation
    assert s.reindex(Tiny()) == 1 and s.embedder_name == "tiny-test" and s.dim == 8
    hit = s.search("heart disease", 1)[0]
    assert s.generation == g + 1 and hit[0] == "a" and hit[1] > 0.5, hit
    assert ShardStore(root).search("heart disease", 1)[0][0] == "a"  # resolved through the registry
    with pytest.raises(StoreError, match="refusing to mix"):
        ShardStore(root, embedder=minilm)


def test_open_missing_store_without_create(store_at):
    with pytest.raises(StoreError, match="no shard store"):
        ShardStore(store_at("nope"), create=False)
    assert not store_at.exists("nope")


# ---------------------------------------------------------------- bad input leaves the store intact
def _nan_shard(base):
    sh = random_shard(base, "bad", rank=2, description="Cardiology and hearts")
    sh.factors[(1, "up_proj")].B[3, 1] = float("nan")
    return sh


def _inf_shard(base):
    sh = random_shard(base, "bad", rank=2, description="Cardiology and hearts")
    sh.factors[(0, "gate_proj")].A[0, 0] = float("inf")
    return sh


def _shape_shard(base):
    sh = random_shard(base, "bad", rank=2, description="Cardiology and hearts")
    f = sh.factors[(0, "down_proj")]
    f.A = torch.randn(2, base.hidden_size)  # down_proj takes d_in = intermediate_size
    return sh


def _rank_mismatch_shard(base):
    sh = random_shard(base, "bad", rank=2, description="Cardiology and hearts")
    sh.factors[(1, "gate_proj")].B = torch.randn(base.intermediate_size, 3)
    return sh


def _layer_shard(base):
    sh = random_shard(base, "bad", rank=2, description="Cardiology and hearts")
    sh.factors[(7, "gate_proj")] = sh.factors[(0, "gate_proj")]
    return sh


def _wide_base_shard(base):
    wide = fingerprint_model(tiny_llama(0, hidden_size=32, intermediate_size=64))
    return random_shard(wide, "bad", rank=2, description="Cardiology and hearts")


BAD = {
    "other base weights": (lambda b, o: random_shard(o, "bad", rank=2, description="hearts"),
                           StoreError, "different base model.*weights_hash differs"),
    "other base shapes": (lambda b, o: _wide_base_shard(b), StoreError, "hidden_size differs"),
    "shape mismatch": (lambda b, o: _shape_shard(b), ShardError, "do not fit the base model"),
    "rank mismatch": (lambda b, o: _rank_mismatch_shard(b), ShardError, "rank mismatch"),
    "layer out of range": (lambda b, o: _layer_shard(b), ShardError, "layer index out of range"),
    "nan": (lambda b, o: _nan_shard(b), ShardError, "NaN or Inf"),
    "inf": (lambda b, o: _inf_shard(b), ShardError, "NaN or Inf"),
    "duplicate id": (lambda b, o: random_shard(b, "tax", rank=2, description="again"), StoreError,
                     "'tax' already exists"),
    "attention targets": (lambda b, o: random_shard(b, "bad", rank=2, modules=("q_proj",), description="x"),
                          ShardError, "attention"),
    "lm_head target": (lambda b, o: Shard(id="bad", base=b, description="x", factors={
                           (0, "lm_head"): random_shard(b, "z", rank=2).factors[(0, "gate_proj")]}),
                       ShardError, "never touch"),
    "empty description no samples": (lambda b, o: _with_desc(random_shard(b, "bad", rank=2, samples=["  "]), " "),
                                     StoreError, "empty description and no samples"),
    "invalid id": (lambda b, o: random_shard(b, "../escape", rank=2, description="x"), ShardError,
                   "invalid shard id"),
    "no factors": (lambda b, o: Shard(id="bad", base=b, factors={}, description="x"), ShardError,
                   "no factors"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_and_store_untouched(domain_store, base, other_base, case):
    make, err, msg = BAD[case]
    before = snapshot(domain_store)
    with pytest.raises(err, match=msg):
        domain_store.add(make(base, other_base))
    assert snapshot(domain_store) == before
    assert snapshot(ShardStore(domain_store.location)) == before  # and on disk, as another process sees it
    assert domain_store.verify() == []


def test_bad_unknown_ids_and_vectors(domain_store, base):
    before = snapshot(domain_store)
    for call in (lambda: domain_store.remove("nope"), lambda: domain_store.get_meta("nope"),
                 lambda: domain_store.load("nope")):
        with pytest.raises(StoreError, match="unknown shard id 'nope'"):
            call()
    with pytest.raises(StoreError, match="did you mean 'cardio'"):
        domain_store.get_meta("cardoi")
    good = random_shard(base, "fine", rank=2, description="fine")
    for emb, msg in ((np.ones(5), "shape"), (np.full(384, np.inf), "NaN or Inf"), (np.zeros(384), "zero vector")):
        with pytest.raises(StoreError, match=msg):
            domain_store.add(good, embedding=emb)
    with pytest.raises(StoreError, match="appears twice"):
        domain_store.add_many([good, random_shard(base, "fine", rank=2, description="x")])
    with pytest.raises(WragError):  # all-or-nothing: one bad shard, none added
        domain_store.add_many([good, _nan_shard(base)])
    assert snapshot(domain_store) == before and domain_store.verify() == []


def test_failure_while_writing_files_rolls_back(domain_store, base, monkeypatch):
    """An I/O error on the 2nd of 3 files: the 1st file is deleted, no row, same generation."""
    before = snapshot(domain_store)
    real_write, calls = shard_io.write_atomic, []

    def flaky(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(shard_io, "write_atomic", flaky)
    with pytest.raises(OSError, match="No space"):
        domain_store.add_many([random_shard(base, f"n{i}", rank=2, description=f"n{i}") for i in range(3)])
    assert snapshot(domain_store) == before and domain_store.verify() == []
    monkeypatch.setattr(shard_io, "write_atomic", real_write)
    rows = domain_store.add_many([random_shard(base, f"n{i}", rank=2, description=f"n{i}") for i in range(3)])
    assert [r["id"] for r in rows] == ["n0", "n1", "n2"] and domain_store.generation == before["generation"] + 1


def test_orphans_left_by_a_dead_writer_are_cleaned_on_open(store_at, base):
    store = ShardStore(store_at("s"))
    store.add(random_shard(base, "keep", rank=2), embedding=unit("keep"))
    store.close()
    folder = store.root  # the store's folder, or a database store's local cache
    random_shard(base, "ghost", rank=2).save(folder / "shards" / "ghost.safetensors")  # file, no row
    (folder / "shards" / ".tmp-x.safetensors").write_bytes(b"half")
    (folder / "index.faiss.tmp-1-ab").write_bytes(b"half")
    s = check_consistent(store_at("s"))
    assert [r["id"] for r in s.list()] == ["keep"]
    assert sorted(p.name for p in (folder / "shards").iterdir()) == [Path(s.get_meta("keep")["path"]).name]
    assert json.loads(json.dumps(s.list()))  # meta rows are JSON-serialisable (the CLI prints them)


def test_large_index_is_compressed_and_exact(store_at, base, monkeypatch):
    """From COMPRESS_AT rows the index holds 4-bit PQ codes instead of float32 heads, and a search
    rescores its candidates with the catalog's heads: the hits and scores of an exact search."""
    from wrag_vllm.store import index as index_mod
    from wrag_vllm.store.relevance import cosine_head, probability, query_rows

    monkeypatch.setattr(index_mod, "COMPRESS_AT", 300)
    monkeypatch.setattr(index_mod, "RETRAIN_GROWTH", 2)
    rng = np.random.default_rng(0)
    centers = normalize_rows(rng.standard_normal((12, 384)).astype(np.float32))
    vecs = normalize_rows(centers[rng.integers(0, 12, 1400)] + 0.35 * rng.standard_normal((1400, 384)).astype(np.float32))
    ids = [f"c{i:04d}" for i in range(len(vecs))]
    shards = [random_shard(base, i, rank=1, seed=j) for j, i in enumerate(ids)]
    root = store_at("s")
    store = ShardStore(root)
    store.load_index()
    store.add_many(shards[:250], embeddings=vecs[:250])
    assert not store._index.compressed
    store.add_many(shards[250:700], embeddings=vecs[250:700])
    assert store._index.compressed and store._index.trained_at == 700
    _, data = store._index.image()
    assert len(data) / 700 < 4 * 385 / 4  # codebooks included, under a quarter of the float32 heads

    def check(st, n):
        heads = np.stack([cosine_head(v) for v in vecs[:n]])
        q = normalize_rows(vecs[:60] + 0.05 * rng.standard_normal((60, 384)).astype(np.float32))
        exact = query_rows(q) @ heads.T
        got = st.search_vectors(q, k=3)
        same = 0
        for row, ex in zip(got, exact):
            want = np.argsort(-ex)[:3]
            same += [i for i, _ in row] == [ids[j] for j in want]
            for i, p in row:  # every score returned is the exact one
                assert p == pytest.approx(probability(ex[ids.index(i)]), abs=1e-5)
        assert same >= 57, same  # ≥ 95% of the top-3 lists exactly as an exact search
        assert [r[0][0] for r in got] == ids[:60]

    check(store, 700)
    store.remove(ids[0])
    assert all(i != ids[0] for i, _ in store.search_vector(vecs[0], 5)) and store.verify() == []
    store.add(shards[0], embedding=vecs[0])
    store.close()
    again = ShardStore(root)
    again.load_index()  # the compressed index from its file
    assert again._index.compressed and again._index.trained_at == 700 and again._index.persisted is not None
    check(again, 700)
    again.add_many(shards[700:], embeddings=vecs[700:])  # grown 2×: codebooks retrained on 1,400 rows
    assert again._index.trained_at == 1400 and again.verify() == []
    check(again, 1400)


def test_watch_keeps_a_reader_current(store_at, base):
    """watch(): a reader's index follows another writer's commits with no refresh() call (a database
    store hears NOTIFY, a folder store polls)."""
    root = store_at("s")
    writer, reader = ShardStore(root), ShardStore(root)
    reader.load_index()
    changed = threading.Event()
    reader.watch(on_change=changed.set, poll_s=0.1)
    writer.add(random_shard(base, "w", rank=2), embedding=unit("w"))
    assert changed.wait(20) and reader.generation == writer.generation
    assert reader.search_vector(unit("w"), 1)[0][0] == "w"  # search itself never refreshes
    reader.close()
    assert reader._watcher is not None and not reader._watcher.is_alive()


def test_watch_warns_once_per_outage(tmp_path, base, monkeypatch, caplog):
    """A catalog that cannot be read for a while: one warning when it starts, one when it is back,
    not one per poll."""
    import logging
    import time

    store = ShardStore(tmp_path / "s")
    real, calls = store.refresh, {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] <= 20:
            raise StoreError("the database went away")
        return real()

    monkeypatch.setattr(store, "refresh", flaky)
    with caplog.at_level(logging.WARNING, logger="wrag.store"):
        store.watch(poll_s=0.01)
        t = time.monotonic()
        while calls["n"] < 25 and time.monotonic() - t < 20:
            time.sleep(0.01)
        store.close()
    msgs = [r.getMessage() for r in caplog.records if r.name == "wrag.store"]
    assert calls["n"] >= 25
    assert sum("could not catch up" in m for m in msgs) == 1, msgs
    assert sum("caught up again" in m for m in msgs) == 1, msgs
