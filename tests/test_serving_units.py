"""Fast unit tests of the serving logic that does not need a vLLM server."""
from __future__ import annotations

import json
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from wrag_vllm.errors import WragError
from wrag_vllm.serving.config import WragConfig
from wrag_vllm.serving.plan import Plan
from wrag_vllm.serving.resolver import softmax_weights
from wrag_vllm.serving.controls import RequestError, parse_controls

CFG = WragConfig(store="/nonexistent", max_top_k=8)


# ------------------------------------------------------------------ config
def test_config_sources_and_precedence():
    c = WragConfig.from_sources({"wrag": {"top_k": 5, "method": "linear", "slots": 16}},
                                environ={"WRAG_TOP_K": "2", "WRAG_STORE": "/s"})
    assert (c.top_k, c.method, c.slots, c.store) == (2, "linear", 16, "/s")  # env wins
    assert WragConfig.from_sources('{"wrag": false}', environ={}).enabled is False
    with pytest.raises(WragError, match="unknown WRAG setting"):
        WragConfig.from_sources({"wrag": {"topk": 1}}, environ={})
    with pytest.raises(WragError, match="temperature"):
        WragConfig.from_sources({"wrag": {"temperature": 0}}, environ={})
    with pytest.raises(WragError, match="k_max"):
        WragConfig.from_sources({"wrag": {"slots": 2, "k_max": 4}}, environ={})


# ------------------------------------------------------------------ vllm_xargs
@pytest.mark.parametrize("xargs,shards,weights", [
    ({"wrag_shards": ["a", "b"], "wrag_weights": [0.7, 0.3]}, ["a", "b"], [0.7, 0.3]),
    ({"wrag_shards": "a,b", "wrag_weights": "0.7,0.3"}, ["a", "b"], [0.7, 0.3]),
    ({"wrag_shards": '["a","b"]', "wrag_weights": "[1, 2]"}, ["a", "b"], [1.0, 2.0]),
    ({"wrag_shards": ["a"]}, ["a"], None),
])
def test_xargs_list_forms(xargs, shards, weights):
    c = parse_controls(xargs, CFG)
    assert c.shards == shards and c.weights == weights


@pytest.mark.parametrize("xargs,msg", [
    ({"wrag_top_k": 0}, "1..8"), ({"wrag_top_k": 10**9}, "1..8"), ({"wrag_top_k": 2.5}, "integer"),
    ({"wrag_top_k": True}, "boolean"), ({"wrag_shards": ["a"], "wrag_weights": [float("nan")]}, "finite"),
    ({"wrag_shards": ["a"], "wrag_weights": ["inf"]}, "finite"), ({"wrag_shards": ["a"], "wrag_weights": [-1]}, "≥ 0"),
    ({"wrag_shards": ["a", "b"], "wrag_weights": [0, 0]}, "all weights are zero"), ({"wrag_weights": [1]}, "needs wrag_shards"),
    ({"wrag_shards": ["a", "a"]}, "twice"), ({"wrag_shards": [1]}, "non-empty strings"),
    ({"wrag_shards": {"a": 1}}, "expected a list"), ({"wrag_threshold": 2}, "[0, 1]"), ({"wrag_threshold": -0.1}, "[0, 1]"),
    ({"wrag_method": "magic"}, "unknown composition method"), ({"wrag_off": "maybe"}, "true/false"),
    ({"wrag_plan": "{}"}, "set by the server"), ({"wrag_slots": "[]"}, "set by the server"),
    ({"wrag_bogus": 1}, "unknown WRAG control"), ({"wrag_params": "{bad"}, "not valid JSON"),
])
def test_xargs_errors(xargs, msg):
    with pytest.raises(RequestError, match=msg.replace("[", r"\[").replace(".", r"\.").replace("(", r"\(")):
        parse_controls(xargs, CFG)


def test_xargs_ignore_other_keys_and_off():
    c = parse_controls({"session_id": "x", "wrag_off": "true"}, CFG)
    assert c.off and c.shards is None


# ------------------------------------------------------------------ plan / weights
def test_softmax_weights_and_plan_roundtrip():
    w = softmax_weights([0.9, 0.5], 0.1)
    assert abs(sum(w) - 1) < 1e-12 and w[0] / w[1] == pytest.approx(torch.e ** 4)
    p = Plan(["a", "b"], w, "svd-centered", {}, [0.9, 0.5], "retrieved", 3)
    q = Plan.from_json(p.to_json())
    assert q == p and p.header().startswith("a=0.982")
    assert Plan().header() == "-"
    with pytest.raises(ValueError):
        Plan.from_json(json.dumps({"v": 99}))


# ------------------------------------------------------------------ resolver against a real store
@pytest.fixture()
def store_with_shards(tmp_path, tiny_fp):
    from helpers_shards import random_shard

    from wrag_vllm.store import ShardStore

    st = ShardStore(tmp_path / "store")
    for i, (sid, d) in enumerate({"med": "medicine, diseases and patients",
                                  "code": "programming and python code"}.items()):
        st.add(random_shard(tiny_fp, sid, rank=4, seed=i, description=d))
    return st


def test_resolver_retrieval_threshold_and_explicit(store_with_shards):
    from wrag_vllm.serving.resolver import Resolver

    cfg = WragConfig(store=str(store_with_shards.root), top_k=2, threshold=0.3, max_rank=8)
    r = Resolver(cfg, store_with_shards)
    p = r.resolve("the patient has a disease", parse_controls({}, cfg))
    assert p.ids == ["med"] and p.weights == [1.0] and p.source == "retrieved"
    assert r.resolve("zzz qqq", parse_controls({"wrag_threshold": 0.99}, cfg)).empty
    p = r.resolve(None, parse_controls({"wrag_shards": ["med", "code"]}, cfg))
    assert p.weights == [0.5, 0.5] and p.source == "explicit"
    with pytest.raises(RequestError, match="unknown shard id 'x'"):
        r.resolve(None, parse_controls({"wrag_shards": ["med", "x"]}, cfg))
    # slot rank: 2 rank-4 shards compose to rank ≤ 8 = max_rank: fine; with max_rank 6 and no
    # composite budget refused
    r2 = Resolver(WragConfig(store="", max_rank=6, composite_rank=0), store_with_shards)
    with pytest.raises(RequestError, match="max_rank"):
        r2.resolve(None, parse_controls({"wrag_shards": ["med", "code"]}, cfg))
    # ...but linear with k ≤ k_max uses one slot per shard: fine
    assert r2.resolve(None, parse_controls({"wrag_shards": ["med", "code"], "wrag_method": "linear"}, cfg)).ids


def test_composite_rank_budget(store_with_shards, tmp_path):
    """The server's budget becomes compose's max_rank for composites only, capped at the slot rank,
    never below the largest shard's rank; a request's own max_rank / energy win; k = 1 is exact."""
    from wrag_vllm.serving.preparer import Preparer
    from wrag_vllm.serving.resolver import Resolver
    from wrag_vllm.shard import load_shard

    both = {"wrag_shards": ["med", "code"]}
    cfg = WragConfig(store=str(store_with_shards.root), max_rank=6, composite_rank=5)
    r = Resolver(cfg, store_with_shards)
    assert r.resolve(None, parse_controls(both, cfg)).params == {"max_rank": 5}
    assert r.resolve(None, parse_controls({**both, "wrag_params": {"max_rank": 3}}, cfg)).params == {"max_rank": 3}
    with pytest.raises(RequestError, match="max_rank 6"):   # energy bounds no rank: Σ r_i = 8 > 6
        r.resolve(None, parse_controls({**both, "wrag_params": {"energy": 0.9}}, cfg))
    assert r.resolve(None, parse_controls({**both, "wrag_method": "linear"}, cfg)).params == {}  # slots, no composite
    low = WragConfig(store="", max_rank=6, composite_rank=2)   # below the shards' rank 4: rank 4
    assert Resolver(low, store_with_shards).resolve(None, parse_controls(both, low)).params == {"max_rank": 4}
    fits = WragConfig(store="", max_rank=16, composite_rank=12)  # Σ r_i = 8 within the budget: untouched
    assert Resolver(fits, store_with_shards).resolve(None, parse_controls(both, fits)).params == {}
    high = WragConfig(store="", max_rank=6, composite_rank=64)  # above the slot rank: the slot rank
    p = Resolver(high, store_with_shards).resolve(None, parse_controls(both, high))
    assert p.params == {"max_rank": 6}
    prep = Preparer(high, tmp_path / "run", Resolver(high, store_with_shards))
    assert load_shard(prep.prepare(p)[0].path).rank == 6    # rank 8 composite truncated to 6
    one = r.resolve(None, parse_controls({"wrag_shards": ["med"]}, cfg))
    got, want = load_shard(prep.prepare(one)[0].path), store_with_shards.load("med")
    assert got.rank == 4 and all(torch.allclose(got.factors[k].delta(), want.factors[k].delta(), atol=1e-5)
                                 for k in want.factors)


def test_preparer_linear_slots_composite_and_removal(store_with_shards, tmp_path):
    from wrag_vllm.serving.preparer import Preparer
    from wrag_vllm.serving.resolver import Resolver
    from wrag_vllm.shard import load_shard

    cfg = WragConfig(store=str(store_with_shards.root), k_max=2)
    prep = Preparer(cfg, tmp_path / "run", Resolver(cfg, store_with_shards))
    lin = prep.prepare(Plan(["med", "code"], [0.6, 0.4], "linear"))
    assert [s.weight for s in lin] == [0.6, 0.4] and len({s.key for s in lin}) == 2
    comp = prep.prepare(Plan(["med", "code"], [0.6, 0.4], "svd-centered"))
    assert len(comp) == 1 and comp[0].weight == 1.0 and comp[0].key.startswith("c-")
    assert load_shard(comp[0].path).rank <= 8
    assert prep.prepare(Plan(["med", "code"], [0.6, 0.4], "svd-centered"))[0].key == comp[0].key
    # weights equal after the composition cache's rounding are one payload (retrieval noise ~1e-7)
    assert prep.prepare(Plan(["med", "code"], [0.6 + 1e-7, 0.4 - 1e-7], "svd-centered"))[0].key == comp[0].key
    assert prep.prepare(Plan(["med", "code"], [0.61, 0.39], "svd-centered"))[0].key != comp[0].key
    store_with_shards.remove("med")
    with pytest.raises(WragError):
        prep.prepare(Plan(["med"], [1.0], "linear"))  # a removed shard is never prepared again


def test_prepare_cached_only_for_written_payloads(store_with_shards, tmp_path):
    """The engine loop's fast path: slots of a set whose payloads exist, the same prepare() gives;
    None for a cold set, a busy store or a removed shard (prepare() then decides)."""
    from wrag_vllm.serving.preparer import Preparer
    from wrag_vllm.serving.resolver import Resolver

    cfg = WragConfig(store=str(store_with_shards.root), k_max=2)
    prep = Preparer(cfg, tmp_path / "run", Resolver(cfg, store_with_shards))
    for plan in (Plan(["med", "code"], [0.6, 0.4], "linear"), Plan(["med", "code"], [0.6, 0.4], "svd-centered")):
        assert prep.prepare_cached(plan) is None                      # nothing written yet
        refs = prep.prepare(plan)
        assert prep.prepare_cached(plan) == refs
    assert prep.prepare_cached(Plan()) == []
    with prep.resolver._lock:                                          # another thread holds the store
        import threading
        out = []
        t = threading.Thread(target=lambda: out.append(prep.prepare_cached(plan)))
        t.start(); t.join()
        assert out == [None]
    store_with_shards.remove("med")
    assert prep.prepare_cached(Plan(["med"], [1.0], "linear")) is None


def test_admission_admits_a_warm_set_on_arrival(store_with_shards, tmp_path):
    from wrag_vllm.serving.admission import Admission
    from wrag_vllm.serving.seal import ensure_key

    ensure_key()
    cfg = WragConfig(store=str(store_with_shards.root), k_max=2)
    adm = Admission(cfg, str(tmp_path / "run"))
    adm.resolver._store = store_with_shards
    plan = Plan(["med"], [1.0], "linear")
    sealed = {"wrag_plan": plan.sealed()}
    assert adm.arrive("r1", _Req("r1"), sealed) is False and adm.pending["r1"].future is not None   # cold
    assert [r.request_id for r in adm.poll(idle=True)] in (["r1"], [])
    while adm.pending:
        adm.poll(idle=True)
    assert adm.arrive("r2", _Req("r2"), sealed) is False
    p = adm.pending["r2"]
    assert p.future is None and p.slots and p.keys == adm.inside["r1"]   # warm: ready without a thread
    assert [r.request_id for r in adm.poll(idle=False)] == ["r2"]
    adm.shutdown()


# ------------------------------------------------------------------ admission (pool capacity)
class _Req:
    def __init__(self, rid):
        self.request_id = rid

        class SP:
            extra_args = {}
        self.sampling_params = SP()


def test_admission_never_exceeds_pool_and_keeps_order(tmp_path):
    from wrag_vllm.serving.plan import SlotRef
    from wrag_vllm.serving.admission import Admission, _Pending

    cfg = WragConfig(store=str(tmp_path / "s"), slots=2, k_max=2)
    adm = Admission(cfg, str(tmp_path / "run"))

    def pend(rid, keys):
        f = Future()
        f.set_result((Plan(list(keys), [1.0] * len(keys), "linear"), [SlotRef(k, 1.0, "/x") for k in keys]))
        adm.pending[rid] = _Pending(rid, _Req(rid), f)

    pend("r1", ["a"]); pend("r2", ["b"]); pend("r3", ["c"]); pend("r4", ["a"]); pend("r5", [])
    got = [r.request_id for r in adm.poll(idle=False)]
    assert got == ["r1", "r2", "r4", "r5"]          # r3 waits: {a, b} fill the 2 slots
    assert set().union(*adm.inside.values()) == {"a", "b"}
    adm.finished("r1")
    assert adm.poll(idle=False) == []               # r4 still uses a
    adm.finished("r4")
    assert [r.request_id for r in adm.poll(idle=False)] == ["r3"]
    adm.shutdown()


# ------------------------------------------------------------------ worker pool
class _FakeLayer:
    """Stands in for a WRAG linear: records which payload each slot holds."""

    def __init__(self):
        self.slots = {}

    def wrag_load_slot(self, slot, factors, R):
        self.slots[slot] = factors


def test_pool_lru_pins_and_meta(tmp_path, tiny_fp):
    from helpers_shards import random_shard

    from wrag_vllm.serving.pool import ShardPool
    from wrag_vllm.serving.plan import SlotRef

    paths = {}
    for sid in "abc":
        paths[sid] = str(random_shard(tiny_fp, sid, rank=2, seed=ord(sid)).save(tmp_path / f"{sid}.safetensors"))
    pool = ShardPool(slots=2, max_rank=4, k_max=2, max_tokens=16, max_seqs=4, host_cache_bytes=1 << 20,
                     run_dir=None, device="cpu")
    layer = _FakeLayer()
    pool.register(layer)
    ref = lambda s, w=1.0: SlotRef(s, w, paths[s])  # noqa: E731
    qsl = torch.tensor([0, 3, 4])
    pool.step([[ref("a", 0.5), ref("b", 0.5)], []], qsl)
    assert set(pool.slot_of) == {"a", "b"} and pool.evictions == 0
    pool.step([[ref("c")], [ref("b")]], qsl)        # a is evicted (LRU), b pinned
    assert set(pool.slot_of) == {"b", "c"} and pool.evictions == 1
    # more payloads than slots (the scheduler prevents it): that sequence loses its shards, the
    # worker lives and the others keep theirs
    pool.step([[ref("a")], [ref("b"), ref("c")]], qsl)
    assert pool.failures == 1 and set(pool.slot_of) == {"b", "c"}
    assert pool.seq_slots[0].tolist() == [-1, -1]
    assert sorted(pool.seq_slots[1].tolist()) == sorted([pool.slot_of["b"], pool.slot_of["c"]])
    # a payload file that cannot be read: the same, and the pool is unchanged
    pool.step([[SlotRef("x", 1.0, str(tmp_path / "missing.safetensors"))], [ref("b")]], qsl)
    assert pool.failures == 2 and set(pool.slot_of) == {"b", "c"} and pool.seq_slots[0].tolist() == [-1, -1]


@pytest.mark.parametrize("additional, env, on", [
    ({}, {}, False),                                   # installed but not asked for: plain vLLM
    ({"wrag": {"top_k": 2}}, {}, True),
    ({}, {"VLLM_PLUGINS": "foo,wrag"}, True),
    ({}, {"WRAG_ENABLED": "1"}, True),
    ({"wrag": {"enabled": False}}, {"VLLM_PLUGINS": "wrag"}, False),
    ({"wrag": {}}, {"WRAG_ENABLED": "0"}, False),
])
def test_wrag_acts_only_when_asked(additional, env, on):
    assert WragConfig.from_sources(additional, environ=env).enabled is on


def test_embed_batcher_caches_repeated_queries():
    """A repeated query is answered from the LRU (no embedder call); concurrent new ones share a call."""
    import threading

    from wrag_vllm.embed import get_embedder
    from wrag_vllm.serving.resolver import EmbedBatcher

    calls = []

    class Store:  # the two attributes EmbedBatcher reads of a ShardStore
        embedder_name = "minilm"

        class embedder:
            @staticmethod
            def embed(texts):
                calls.append(list(texts))
                return get_embedder().embed(texts)

    b = EmbedBatcher(cache_bytes=3 * (384 * 4 + 12))  # a vector and its key text (≤ 12 characters)
    v = b.embed(Store, "what causes high blood pressure?")
    assert np.allclose(v, get_embedder().embed(["what causes high blood pressure?"])[0], atol=1e-6)
    assert np.array_equal(b.embed(Store, "what causes high blood pressure?"), v) and len(calls) == 1
    out = {}
    ts = [threading.Thread(target=lambda i=i: out.__setitem__(i, b.embed(Store, f"question {i}"))) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(out) == 6 and sum(map(len, calls[1:])) == 6 and len(calls) < 7
    assert len(b.cache) == 3  # the byte budget holds three vectors


# ------------------------------------------------------------------ multi-prompt completions
EMBEDS = "AAAA"  # a prompt_embeds value (base64 bytes): a prompt without text


@pytest.mark.parametrize("body,want", [
    ({"prompt": "the patient has a disease"}, ["the patient has a disease"]),
    ({"prompt": ["only one"]}, ["only one"]),                                   # one prompt: as before
    ({"prompt": ["a fever", "a contract", ""]}, ["a fever", "a contract", ""]),  # one query per prompt
    ({"prompt": [1, 2, 3]}, [None]),                                             # token ids: no text
    ({"prompt": [[1, 2], [3]]}, [None]),                                         # a token batch: one plan
    ({"prompt": []}, [None]),
    ({"prompt": ["a fever", [1, 2]]}, ["a fever"]),   # mixed: vLLM refuses the body; one query, as before
    ({"prompt": ["a fever", 7]}, ["a fever"]),
    ({"prompt": {"text": "x"}}, [None]),
    ({}, [None]),
    ({"prompt": ["a fever", "a contract"], "prompt_embeds": EMBEDS}, [None, "a fever", "a contract"]),
    ({"prompt": "a fever", "prompt_embeds": [EMBEDS, EMBEDS]}, [None, None, "a fever"]),  # embeds first
    ({"prompt_embeds": [EMBEDS, EMBEDS]}, [None]),
])
def test_completion_queries_one_per_engine_request(body, want):
    from wrag_vllm.serving.frontend import query_texts

    assert query_texts("completion", body) == want


def test_chat_and_responses_bodies_have_one_query():
    from wrag_vllm.serving.frontend import query_texts

    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "prompt": ["x", "y"]}
    assert query_texts("chat", chat) == ["b"]
    assert query_texts("responses", {"input": "z", "prompt": ["x", "y"]}) == ["z"]


def test_wrag_headers_one_plan_as_before_several_per_prompt():
    from wrag_vllm.serving.frontend import wrag_headers

    med = Plan(["med"], [1.0], "svd-centered", {}, [0.91], "retrieved", 1)
    two = Plan(["law", "code"], [0.75, 0.25], "svd-centered", {}, [0.8, 0.6], "retrieved", 1)
    none = Plan(method="svd-centered", source="none", generation=1)
    assert dict(wrag_headers([med], False)) == {b"x-wrag-shards": b"med=1", b"x-wrag-method": b"svd-centered",
                                                b"x-wrag-source": b"retrieved", b"x-wrag-scores": b"med=0.9100"}
    assert dict(wrag_headers([none], True)) == {b"x-wrag-shards": b"-", b"x-wrag-method": b"svd-centered",
                                                b"x-wrag-source": b"failed", b"x-wrag-scores": b"-"}
    h = dict(wrag_headers([med, none, two], False))
    assert h[b"x-wrag-shards"] == b"med=1;-;law=0.75,code=0.25"
    assert h[b"x-wrag-scores"] == b"med=0.9100;-;law=0.8000,code=0.6000"
    assert h[b"x-wrag-source"] == b"retrieved;none;retrieved" and h[b"x-wrag-method"] == b"svd-centered"
    h = dict(wrag_headers([med, two], True))
    assert h[b"x-wrag-shards"] == b"-;-" and h[b"x-wrag-source"] == b"failed;failed"


@pytest.mark.parametrize("rid,i", [("cmpl-abc-0", 0), ("cmpl-abc-12", 12), ("cmpl-job-7-3", 3),
                                   ("cmpl-abc", None), ("cmpl-abc-", None), ("cmpl-abc-x1", None),
                                   ("cmpl-abc-\u00b2", None), ("chatcmpl-abc", None), ("", None)])
def test_prompt_index_of_completions_request_ids(rid, i):
    from wrag_vllm.serving.hooks.prompts import prompt_index

    assert prompt_index(rid) == i


def test_pick_plan_gives_each_engine_request_its_prompts_plan():
    from vllm.sampling_params import SamplingParams

    from wrag_vllm.serving.hooks.prompts import pick_plan
    from wrag_vllm.serving.plan import PLAN_KEY

    shared = {PLAN_KEY: ["plan-0", "plan-1", "plan-2"], "other": 1}
    params = [SamplingParams(extra_args=shared) for _ in range(3)]   # as vLLM builds them: one dict
    picked = [pick_plan(p, f"cmpl-req-7-{i}") for i, p in enumerate(params)]
    assert [p.extra_args for p in picked] == [{PLAN_KEY: f"plan-{i}", "other": 1} for i in range(3)]
    assert shared[PLAN_KEY] == ["plan-0", "plan-1", "plan-2"] and all(p.extra_args is shared for p in params)
    assert pick_plan(params[0], "cmpl-req-3") is params[0]       # no such prompt: the engine refuses it
    assert pick_plan(params[0], "cmpl-req") is params[0]
    one = SamplingParams(extra_args={PLAN_KEY: "sealed"})
    assert pick_plan(one, "cmpl-req-0") is one and pick_plan(SamplingParams(), "cmpl-req-0").extra_args is None


def test_resolve_many_embeds_once_and_equals_resolve(store_with_shards, monkeypatch):
    from wrag_vllm.serving.resolver import Resolver

    cfg = WragConfig(store=str(store_with_shards.root), top_k=2, threshold=0.3, max_rank=8)
    calls = []
    real = store_with_shards.embedder.embed
    monkeypatch.setattr(store_with_shards.embedder, "embed", lambda texts: (calls.append(list(texts)), real(texts))[1])
    texts = ["the patient has a disease", "my python code crashes", None, "", "the patient has a disease"]
    plans = Resolver(cfg, store_with_shards).resolve_many(texts, parse_controls({}, cfg))
    assert calls == [["the patient has a disease", "my python code crashes"]]   # one call, each text once
    assert [p.ids[:1] for p in plans] == [["med"], ["code"], [], [], ["med"]]
    assert [p.source for p in plans] == ["retrieved", "retrieved", "none", "none", "retrieved"]
    alone = Resolver(cfg, store_with_shards)
    for t, p in zip(texts, plans):
        q = alone.resolve(t, parse_controls({}, cfg))
        assert (q.ids, q.source) == (p.ids, p.source) and q.weights == pytest.approx(p.weights, abs=1e-6)
    calls.clear()
    explicit = Resolver(cfg, store_with_shards).resolve_many(texts[:2], parse_controls({"wrag_shards": ["code"]}, cfg))
    assert not calls and [p.ids for p in explicit] == [["code"], ["code"]]


_METRICS_SCRIPT = r"""
import json, os, sys
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from wrag_vllm.serving.metrics import FrontMetrics, EngineStats

run = os.environ["WRAG_RUN_DIR"]
w = EngineStats(run, "worker"); w.set(pool_loads=5, pool_evictions=2)
e = EngineStats(run, "engine"); e.composition(0.5, hit=False); e.composition(0.25, hit=True); e.flush(force=True)
m = FrontMetrics(CollectorRegistry())   # an API server's metrics
m.refresh_engine()                       # what the middleware does on GET /metrics
scrape = CollectorRegistry(); multiprocess.MultiProcessCollector(scrape)   # what vLLM's /metrics serves
print(generate_latest(scrape).decode())
"""


@pytest.mark.parametrize("multiprocess", [False, True])
def test_engine_metrics_in_both_prometheus_modes(tmp_path, multiprocess):
    """The engine's and workers' counters reach /metrics whether vLLM serves one registry (one API
    server) or prometheus_client's multiprocess files (several API servers, data parallelism),
    where a registered collector is never asked: same names, same values."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "WRAG_RUN_DIR": str(tmp_path / "run")}
    script = _METRICS_SCRIPT
    if multiprocess:
        (tmp_path / "prom").mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prom")
    else:  # one registry with the collector, as vLLM serves without multiprocess mode
        script = script.replace("scrape = CollectorRegistry(); multiprocess.MultiProcessCollector(scrape)",
                                "scrape = m_reg").replace("m = FrontMetrics(CollectorRegistry())",
                                                          "m_reg = CollectorRegistry(); m = FrontMetrics(m_reg)")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    values = {}
    for line in out.stdout.splitlines():
        if line.startswith("wrag_") and " " in line:
            name, v = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(v)
    assert values["wrag_pool_loads_total"] == 5 and values["wrag_pool_evictions_total"] == 2, values
    assert values["wrag_compositions_total"] == 2 and values["wrag_composition_cache_hits_total"] == 1
    assert values["wrag_composition_seconds_total"] == pytest.approx(0.75)
    assert values["wrag_composition_hit_seconds_total"] == pytest.approx(0.25)
    assert values["wrag_composition_miss_seconds_total"] == pytest.approx(0.5)
    assert values["wrag_composition_cache_hit_rate"] == pytest.approx(0.5)


def test_engine_stats_reach_the_file_after_a_burst(tmp_path):
    """Writes are rate-limited, but the last counts of a burst are written shortly after it."""
    import time

    from wrag_vllm.serving.metrics import EngineStats, read_engine_stats

    st = EngineStats(str(tmp_path), "engine")
    for _ in range(5):
        st.prepared(0.01, 1)
    t = time.monotonic()
    while read_engine_stats(str(tmp_path)).get("prepared") != 5 and time.monotonic() - t < 5:
        time.sleep(0.05)
    assert read_engine_stats(str(tmp_path))["prepared"] == 5


def test_engine_stats_never_raise(tmp_path):
    """Counters updated from many threads at once, and a run directory that went away: the file is
    written one writer at a time, and a write that fails costs the metrics, never the caller."""
    import shutil
    import threading

    from wrag_vllm.serving.metrics import EngineStats, read_engine_stats

    st = EngineStats(str(tmp_path / "run"), "engine")
    errors = []

    def hammer():
        try:
            for i in range(200):
                st.composition(0.001, hit=bool(i % 2))
                st.flush(force=i % 7 == 0)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    st.flush(force=True)
    assert errors == [] and read_engine_stats(str(tmp_path / "run"))["composition_count"] == 1600
    shutil.rmtree(tmp_path / "run")
    st.prepared(0.1, 1)
    st.flush(force=True)  # the folder is gone: no exception
