"""Domain corpora: deterministic builders, recorded split, prompts kept apart from samples."""
from __future__ import annotations

import json

import pytest

from wrag_vllm import domains
from wrag_vllm.errors import WragError


@pytest.fixture(scope="module")
def built():
    return domains.build_all()


def test_four_domains_with_enough_data(built):
    assert set(built) >= {"medicine", "computing", "law", "history"}
    for d in built.values():
        assert len(d.train_texts) >= 300 and len(d.heldout_texts) >= 50, d.summary()
        assert len(d.heldout_prompts) >= 50 and len(d.samples) == domains.N_SAMPLES
        assert d.description and sum(map(len, d.train_texts)) > 250_000


def test_builders_are_deterministic(built):
    again = domains.medicine()
    assert again == built["medicine"]
    assert domains.law().train_ids == built["law"].train_ids


def test_split_matches_recorded_ids(built):
    rec = json.loads((domains.DATA_DIR / "splits.json").read_text())["domains"]
    for name, d in built.items():
        assert rec[name] == {"train": d.train_ids, "heldout": d.heldout_ids, "prompts": d.prompt_ids}, name


def test_split_is_disjoint_and_prompts_are_heldout(built):
    for name, d in built.items():
        assert not set(d.train_ids) & set(d.heldout_ids)
        assert set(d.prompt_ids) <= set(d.heldout_ids)
        frac = len(d.heldout_ids) / (len(d.heldout_ids) + len(d.train_ids))
        assert 0.15 < frac < 0.3, (name, frac)
        held_prompts = set(d.heldout_prompts)
        assert not any(s in held_prompts for s in d.samples), "samples must not leak evaluation prompts"
        # no held-out text appears verbatim in training (shared passages are one item)
        train = set(d.train_texts)
        assert not any(t in train for t in d.heldout_texts)


def test_unknown_domain():
    with pytest.raises(WragError, match="known domains"):
        domains.build_domain("astrology")


# ------------------------------------------------------------------ committed domain shards
SHARD_DIR = domains.DATA_DIR.parent / "shards"


def _committed():
    return sorted(SHARD_DIR.glob("*.safetensors")) if SHARD_DIR.exists() else []


@pytest.mark.skipif(not _committed(), reason="domain shards not trained yet")
def test_committed_shards_are_valid_ffn_rank8():
    from wrag_vllm.shard import FFN_MODULES, load_shard, read_meta
    from wrag_vllm.train import corpus_hash

    names = {p.stem for p in _committed()}
    assert names == set(domains.DOMAINS)
    for p in _committed():
        assert p.stat().st_size <= 5_000_000
        s = load_shard(p)
        assert s.id == p.stem and s.rank == 8 and s.target_modules == sorted(FFN_MODULES)
        assert len(s.factors) == 30 * 3 and s.base.num_layers == 30 and s.base.hidden_size == 576
        d = domains.build_domain(p.stem)
        # the files carry the first samples of their training day; `wrag demo` registers them with
        # the domain's current samples and queries (demo.domain_shards)
        assert s.description == d.description and s.samples == d.samples[:len(s.samples)]
        assert not set(d.samples + d.queries) & set(d.heldout_prompts)
        assert read_meta(p)["provenance"]["corpus_hash"] == corpus_hash(d.train_texts), \
            "the shard was trained on the current train split"


@pytest.mark.slow
@pytest.mark.skipif(not _committed(), reason="domain shards not trained yet")
def test_committed_shards_fit_the_converted_base():
    """The conversion is deterministic: shards trained on one machine fit the base built on another."""
    from wrag_vllm.basemodel import ensure_base_model, find_gguf
    from wrag_vllm.fingerprint import fingerprint_dir
    from wrag_vllm.shard import load_shard

    try:
        find_gguf()
    except WragError as e:
        pytest.skip(str(e))
    fp = fingerprint_dir(ensure_base_model())
    for p in _committed():
        assert load_shard(p).base.mismatch(fp) is None, p.name
