"""End-to-end: a real `vllm serve` (CPU build) with the WRAG plugins, one per test session.

Reference: HF transformers fp32 with the composed delta added densely to the FFN weights
(W_p += ΔW_p for every (layer, projection) of compose(shards, weights, method)); greedy tokens
must be equal.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow

SHARDS = {  # id -> description (the retrieval text)
    "law": "contracts, courts, legal liability, lawsuits and statutes",
    "med": "medicine, diseases, patients, symptoms and clinical treatment",
    "code": "programming, software, compilers and python code",
    "cook": "cooking recipes, baking bread, kitchen and food",
    "astro": "astronomy, planets, stars, galaxies and telescopes",
    "music": "music, guitar, piano, songs and concerts",
}
API_KEY = "test-key-123"
WRAG = {"slots": 4, "k_max": 3, "max_rank": 16, "top_k": 1, "threshold": 0.3}
PROMPTS = ["the patient has a disease", "my python code fails to compile", "hello there, friend",
           "a court ruled on the contract", "bake bread in the oven"]
N_TOK = 8


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    from helpers_server import Server, model_and_store

    tmp = tmp_path_factory.mktemp("wrag-serve")
    model_dir, fp, _, shards = model_and_store(tmp, SHARDS, seed=10)
    # compiled (the product default) unless WRAG_TEST_EAGER=1 (faster startup while developing)
    eager = os.environ.get("WRAG_TEST_EAGER", "0") == "1"
    srv = Server(model_dir, tmp / "store", tmp, wrag={**WRAG, "admin_writes": True, "admin_dirs": [str(tmp)]},
                 api_key=API_KEY, eager=eager)
    try:
        startup = srv.wait_ready()
        print(f"\nvllm serve ready in {startup:.1f}s")
        yield {"srv": srv, "model_dir": model_dir, "fp": fp, "shards": shards, "tmp": tmp, "startup": startup}
    finally:
        srv.stop()


def _post(served, path, body, key=API_KEY):
    from helpers_server import call_json

    return call_json(served["srv"].base_url, path, body, key)


def complete(served, prompt, xargs=None, n=N_TOK):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    status, headers, out = _post(served, "/v1/completions", body)
    assert status == 200, out
    return out["choices"][0]["token_ids"], headers.get("x-wrag-shards")


# ---------------------------------------------------------------------------- HF reference
def hf_tokens(served, prompt, shard_ids=(), weights=(), method="linear", n=N_TOK):
    from helpers_server import hf_greedy

    return hf_greedy(served["model_dir"], served["shards"], prompt, shard_ids, weights, method, n)


CASES = [(("med",), (1.0,), "linear"), (("med",), (1.0,), "svd-centered"),
         (("law", "code", "cook"), (0.5, 0.3, 0.2), "linear"),
         (("law", "code", "cook"), (0.5, 0.3, 0.2), "svd-centered")]


def test_base_matches_hf(served):
    for p in PROMPTS[:3]:
        toks, hdr = complete(served, p, {"wrag_off": True})
        assert hdr == "-"
        assert toks == hf_tokens(served, p)


@pytest.mark.parametrize("ids,weights,method", CASES, ids=["k1-linear", "k1-svd", "k3-linear", "k3-svd"])
def test_explicit_shards_match_hf(served, ids, weights, method):
    changed = False
    for p in PROMPTS[:3]:
        toks, hdr = complete(served, p, {"wrag_shards": list(ids), "wrag_weights": list(weights),
                                         "wrag_method": method})
        assert hdr == ",".join(f"{i}={w:.4g}" for i, w in zip(ids, weights))
        ref = hf_tokens(served, p, ids, weights, method)
        assert toks == ref, (p, toks, ref)
        changed |= ref != hf_tokens(served, p)
    assert changed, "the shards never changed the greedy tokens: the test would not detect a missing delta"


def test_concurrent_mixed_requests_equal_alone(served):
    """36 concurrent requests, 6 distinct single shards + 3-shard sets + none, on a 4-slot pool:
    every request gets the tokens it gets alone; base requests get exactly the base tokens."""
    sets = [None, ("law",), ("med",), ("code",), ("cook",), ("astro",), ("music",),
            ("law", "med", "astro"), None]
    jobs = [(PROMPTS[i % len(PROMPTS)], sets[i % len(sets)]) for i in range(36)]

    def xa(s):
        return {"wrag_off": 1} if s is None else {"wrag_shards": list(s), "wrag_method": "linear"}

    alone = {}
    for p, s in set(jobs):
        alone[(p, s)] = complete(served, p, xa(s))[0]
    t0 = time.time()
    with cf.ThreadPoolExecutor(max_workers=36) as ex:
        got = list(ex.map(lambda j: complete(served, j[0], xa(j[1]))[0], jobs))
    print(f"\n36 concurrent requests in {time.time() - t0:.1f}s")
    for (p, s), toks in zip(jobs, got):
        assert toks == alone[(p, s)], (p, s)
        if s is None:
            assert toks == hf_tokens(served, p)


def test_completions_batch_gets_a_plan_per_prompt(served):
    """A medical and a legal prompt in one completions request: each retrieves its own shard and
    gets the tokens it gets alone; under the other prompt's shard the legal prompt's tokens
    differ, so one plan for the whole batch would fail here. With n = 2 the pick comes before
    vLLM fans a prompt out into its samples."""
    prompts = ["the patient has a disease", "a court ruled on the contract", "hello there, friend"]
    body = {"model": "tiny", "prompt": prompts, "max_tokens": N_TOK, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}
    status, headers, out = _post(served, "/v1/completions", body)
    assert status == 200, out
    shards = headers["x-wrag-shards"].split(";")
    assert len(shards) == 3 and shards[0].startswith("med=") and shards[1].startswith("law="), shards
    assert headers["x-wrag-source"].split(";")[:2] == ["retrieved", "retrieved"]
    got = [c["token_ids"] for c in sorted(out["choices"], key=lambda c: c["index"])]
    alone = [complete(served, p) for p in prompts]
    assert got == [toks for toks, _ in alone] and shards == [hdr for _, hdr in alone]
    assert complete(served, prompts[1], {"wrag_shards": ["med"]})[0] != alone[1][0]

    sampled = {**body, "prompt": prompts[:2], "n": 2, "temperature": 1.0, "seed": 7}
    status, headers, out = _post(served, "/v1/completions", sampled)
    assert status == 200, out
    assert headers["x-wrag-shards"].split(";") == shards[:2]
    got = [c["token_ids"] for c in sorted(out["choices"], key=lambda c: c["index"])]
    for i, p in enumerate(prompts[:2]):
        status, _, one = _post(served, "/v1/completions", {**sampled, "prompt": p})
        assert status == 200 and got[2 * i:2 * i + 2] == [c["token_ids"] for c in
                                                          sorted(one["choices"], key=lambda c: c["index"])]


BAD = [
    ({"wrag_shards": ["nope"]}, "unknown shard id"),
    ({"wrag_top_k": 0}, "wrag_top_k"),
    ({"wrag_top_k": 10**9}, "wrag_top_k"),
    ({"wrag_shards": ["law"], "wrag_weights": ["NaN"]}, "finite"),
    ({"wrag_shards": ["law"], "wrag_weights": [-1.0]}, "≥ 0"),
    ({"wrag_shards": ["law", "med"], "wrag_weights": [1.0]}, "2 shard(s)"),
    ({"wrag_top_k": "three"}, "integer"),
    ({"wrag_threshold": "high"}, "number"),
    ({"wrag_method": "magic"}, "unknown composition method"),
    ({"wrag_off": "maybe"}, "wrag_off"),
    ({"wrag_slots": "[]"}, "set by the server"),
    ({"wrag_tpo_k": 3}, "unknown WRAG control"),
]


@pytest.mark.parametrize("xargs,msg", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_xargs_give_400(served, xargs, msg):
    status, _, out = _post(served, "/v1/completions",
                           {"model": "tiny", "prompt": "hi", "max_tokens": 2, "vllm_xargs": xargs})
    assert status == 400, out
    assert msg in out["error"]["message"]
    toks, _ = complete(served, "hello there, friend", {"wrag_off": 1})  # still serving
    assert len(toks) == N_TOK


def test_retrieval_chat_and_openai_client_with_hot_add(served):
    from openai import OpenAI

    from helpers_shards import random_shard

    srv = served["srv"]
    client = OpenAI(base_url=srv.base_url + "/v1", api_key=API_KEY)
    # retrieval from the chat's last user turn; the header names the shard
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "ignore"}, {"role": "assistant", "content": "ok"},
                                {"role": "user", "content": "the patient has a disease"}],
        max_tokens=4, temperature=0)
    assert raw.headers["x-wrag-shards"].startswith("med=")
    assert raw.headers["x-wrag-source"] == "retrieved"

    # admin routes follow --api-key
    unauth = _post(served, "/wrag/retrieve", {"text": "x"}, key=None)
    assert unauth[0] == 401, unauth
    status, _, out = _post(served, "/wrag/retrieve", {"text": "stars and galaxies through a telescope"})
    assert status == 200 and out["shards"][0]["id"] == "astro"

    # register a new shard while requests are in flight
    new = random_shard(served["fp"], "volcano", rank=4, seed=99, scale=4.0,
                       description="volcanoes, lava, magma and eruptions")
    path = served["tmp"] / "volcano.safetensors"
    new.save(path)
    served["shards"]["volcano"] = new
    with cf.ThreadPoolExecutor(max_workers=8) as ex:
        inflight = [ex.submit(complete, served, PROMPTS[i % 5], {"wrag_shards": ["law"]}, 24) for i in range(8)]
        status, _, meta = _post(served, "/wrag/shards", {"path": str(path)})
        assert status == 200, meta
        assert all(len(f.result()[0]) == 24 for f in inflight)
    resp = client.completions.with_raw_response.create(model="tiny", prompt="lava erupts from the volcano",
                                                       max_tokens=N_TOK, temperature=0,
                                                       extra_body={"return_token_ids": True})
    assert resp.headers["x-wrag-shards"] == "volcano=1"
    toks = resp.parse().choices[0].token_ids
    assert toks == hf_tokens(served, "lava erupts from the volcano", ("volcano",), (1.0,), "svd-centered")

    # removal: never applied to requests admitted afterwards
    req = urllib.request.Request(srv.base_url + "/wrag/shards/volcano", method="DELETE",
                                 headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200
    toks2, hdr = complete(served, "lava erupts from the volcano")
    assert "volcano" not in (hdr or "")
    status, _, out = _post(served, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2,
                                                        "vllm_xargs": {"wrag_shards": ["volcano"]}})
    assert status == 400 and "unknown shard id" in out["error"]["message"]


def test_metrics_exposed(served):
    complete(served, "the patient has a disease")
    for sid in ("law", "med", "code", "cook", "astro", "music"):  # 6 payloads through 4 slots
        complete(served, "hello there, friend", {"wrag_shards": [sid], "wrag_method": "linear"})
    req = urllib.request.Request(served["srv"].base_url + "/metrics")
    text = urllib.request.urlopen(req, timeout=30).read().decode()
    for name in ("wrag_retrieval_seconds_count", "wrag_shards_per_request_bucket", "wrag_composition_cache_hit_rate",
                 "wrag_pool_evictions_total", "wrag_compositions_total"):
        assert name in text, name
    evictions = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("wrag_pool_evictions_total")]
    assert evictions and evictions[0] > 0  # 7+ distinct payloads went through a 4-slot pool
