"""Security suite of the serving path: what a hostile or careless client can and cannot do.

Fast tests run the real WRAG front end (middleware + admin routes) in-process in a FastAPI app
whose generate routes only echo what they would hand vLLM, and the engine-core admission logic
without vLLM. The slow tests (end of file) run them against a real `vllm serve`.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import urllib.request

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from wrag_vllm.serving.frontend import ROUTES, WragEndpoint
from wrag_vllm.serving.config import WragConfig
from wrag_vllm.serving.plan import Plan
from wrag_vllm.serving.resolver import Resolver
from wrag_vllm.serving.seal import ensure_key
from wrag_vllm.serving.controls import RequestError, parse_controls
from wrag_vllm.serving.plan import PLAN_KEY

KEY = "sec-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "the patient has a disease"}]}
BODIES = {  # one minimal body per generate route WRAG retrieves on
    "/v1/chat/completions": CHAT, "/v1/completions": {"model": "m", "prompt": "the patient has a disease"},
    "/v1/responses": {"model": "m", "input": "the patient has a disease"},
    "/v1/messages": {**CHAT, "max_tokens": 4}, "/invocations": CHAT,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_fp):
    from helpers_shards import random_shard

    from wrag_vllm.store import ShardStore

    st = ShardStore(tmp_path_factory.mktemp("sec") / "store")
    for i, (sid, d) in enumerate({"med": "medicine, diseases and patients",
                                  "code": "programming and python code"}.items()):
        st.add(random_shard(tiny_fp, sid, rank=4, seed=i, description=d))
    return st


@pytest.fixture
def front(store, tmp_path, monkeypatch):
    """make(tokens=..., **settings) -> (TestClient, seen): seen[i] = (route, body vLLM would get)."""
    monkeypatch.delenv("WRAG_PLAN_KEY", raising=False)
    ensure_key()

    def make(tokens=(KEY,), echo_status=200, **settings):
        from wrag_vllm.serving.metrics import front_metrics

        plugin = WragEndpoint()
        plugin.cfg = WragConfig(store=str(store.root), threshold=0.2, **settings).validate()
        plugin.resolver = Resolver(plugin.cfg, store)
        plugin.tokens = list(tokens)
        plugin.metrics = front_metrics()
        app, seen = FastAPI(), []
        for route in ROUTES:
            async def echo(request: Request, route=route):
                seen.append((route, json.loads(await request.body() or b"null")))
                return JSONResponse({"ok": echo_status == 200}, status_code=echo_status)
            app.add_api_route(route, echo, methods=["POST"])
        plugin.attach_router(app)
        return TestClient(app), seen
    return make


# ------------------------------------------------------------------ every generate route
@pytest.mark.parametrize("route", list(BODIES))
def test_every_route_goes_through_the_front_end(front, route):
    client, seen = front()
    r = client.post(route, json={**BODIES[route], "vllm_xargs": {"wrag_shards": ["med"]}}, headers=AUTH)
    assert r.status_code == 200 and r.headers["x-wrag-shards"] == "med=1" and r.headers["x-wrag-source"] == "explicit"
    sealed = seen[-1][1]["vllm_xargs"][PLAN_KEY]
    assert Plan.from_sealed(sealed).ids == ["med"]
    r = client.post(route, json=BODIES[route], headers=AUTH)  # retrieval from this route's body form
    assert r.headers["x-wrag-shards"].startswith("med=") and r.headers["x-wrag-source"] == "retrieved"


@pytest.mark.parametrize("route", list(BODIES))
@pytest.mark.parametrize("xargs", [{"wrag_plan": "{}"}, {"wrag_slots": '[["k", 1, "/etc/passwd"]]'},
                                   {"wrag_weights": [1e30], "wrag_shards": ["med"]}, {"wrag_method": "ties"},
                                   {"wrag_params": {"lam": -5}}, {"wrag_params": {"rho": 1e9}}])
def test_internal_keys_and_out_of_range_controls_get_400_on_every_route(front, route, xargs):
    client, seen = front()
    r = client.post(route, json={**BODIES[route], "vllm_xargs": xargs}, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] and not seen  # nothing reached vLLM


@pytest.mark.parametrize("route,body", [
    ("/inference/v1/generate", {"token_ids": [1, 2], "sampling_params": {"extra_args": {"wrag_slots": "[]"}}}),
    ("/inference/v1/generate", {"token_ids": [1, 2], "sampling_params": {"extra_args": {"wrag_shards": ["med"]}}}),
])
def test_routes_without_retrieval_refuse_wrag_controls(front, route, body):
    client, seen = front()
    r = client.post(route, json=body, headers=AUTH)
    assert r.status_code == 400 and "not available on" in r.json()["error"]["message"] and not seen
    r = client.post(route, json={"token_ids": [1, 2], "sampling_params": {}}, headers=AUTH)
    assert r.status_code == 200 and seen  # without WRAG controls: vLLM's business


def test_form_route_refuses_wrag_controls(front):
    client, seen = front()
    files = {"file": ("a.wav", b"RIFF....", "audio/wav")}
    r = client.post("/v1/audio/transcriptions", files=files, headers=AUTH,
                    data={"model": "m", "vllm_xargs": json.dumps({"wrag_plan": "x"})})
    assert r.status_code == 400 and not seen


def test_generate_routes_outside_v1_need_the_key(front):
    client, seen = front()
    assert client.post("/invocations", json=BODIES["/invocations"]).status_code == 401
    assert client.post("/inference/v1/generate", json={"token_ids": [1]}).status_code == 401
    assert not seen
    assert client.post("/invocations", json=BODIES["/invocations"], headers=AUTH).status_code == 200


def test_deeply_nested_json_is_a_400(front):
    client, seen = front()
    deep = ("[" * 100000) + ("]" * 100000)
    for route in ("/v1/completions", "/wrag/retrieve"):
        r = client.post(route, content=deep, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 400, (route, r.text)
    assert not seen


def test_query_is_cut_to_the_token_budget(front, store, monkeypatch):
    """A 5 MB prompt: only the last ~query_max_tokens of it are embedded."""
    got = []
    real = store.embedder.embed
    monkeypatch.setattr(store.embedder, "embed", lambda texts: (got.extend(texts), real(texts))[1])
    client, _ = front(query_max_tokens=64)
    prompt = "lorem ipsum " * 400000 + "the patient has a disease"
    r = client.post("/v1/completions", json={"model": "m", "prompt": prompt}, headers=AUTH)
    assert r.status_code == 200 and r.headers["x-wrag-shards"].startswith("med=")
    assert got and max(len(t) for t in got) <= 4 * 64 and got[-1].endswith("the patient has a disease")


def test_multi_prompt_completions_get_a_plan_per_prompt(front):
    """Each text prompt of a completions batch is retrieved for itself; vLLM gets their sealed plans
    as a list in prompt order (hooks/prompts.py hands engine request i plan i)."""
    client, seen = front()
    body = {"model": "m", "prompt": ["the patient has a disease", "my python code does not compile", ""]}
    r = client.post("/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    plans = [Plan.from_sealed(p) for p in seen[-1][1]["vllm_xargs"][PLAN_KEY]]
    assert [p.ids[:1] for p in plans] == [["med"], ["code"], []]
    shards = r.headers["x-wrag-shards"].split(";")
    assert shards[0].startswith("med=") and shards[1].startswith("code=") and shards[2] == "-"
    assert r.headers["x-wrag-source"] == "retrieved;retrieved;none" and ";" not in r.headers["x-wrag-method"]
    assert r.headers["x-wrag-scores"].count(";") == 2


@pytest.mark.parametrize("prompt,xargs,shards,source", [
    (["the patient has a disease"], {}, "med=1", "retrieved"),      # one prompt in a list: as before
    (["the patient has a disease", "code"], {"wrag_shards": ["code"]}, "code=1", "explicit"),
    (["the patient has a disease", "code"], {"wrag_off": 1}, "-", "off"),
    ([[1, 2, 3], [4, 5]], {}, "-", "none"),                             # token ids: no text, no retrieval
    (["the patient has a disease", [1, 2]], {}, "med=1", "retrieved"),  # mixed: vLLM answers the 400
    (["the patient has a disease", 5], {}, "med=1", "retrieved"),
    ([None, "the patient has a disease"], {}, "-", "none"),
    ([], {}, "-", "none"),
])
def test_completions_with_one_plan_for_all_prompts(front, prompt, xargs, shards, source):
    client, seen = front()
    r = client.post("/v1/completions", json={"model": "m", "prompt": prompt, "vllm_xargs": xargs}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.headers["x-wrag-shards"].split("=")[0] == shards.split("=")[0] and r.headers["x-wrag-source"] == source
    assert isinstance(seen[-1][1]["vllm_xargs"][PLAN_KEY], str)


def test_many_prompts_are_bounded_and_empty_ones_retrieve_nothing(front):
    client, seen = front(max_prompts=8)
    r = client.post("/v1/completions", json={"model": "m", "prompt": ["a disease"] * 9}, headers=AUTH)
    assert r.status_code == 400 and "at most 8 prompts" in r.json()["error"]["message"] and not seen
    assert r.json()["error"]["param"] == "prompt"
    for xargs in ({"wrag_shards": ["med"]}, {"wrag_off": True}):  # no retrieval: no limit, one plan
        r = client.post("/v1/completions", json={"model": "m", "prompt": ["x"] * 10000, "vllm_xargs": xargs},
                        headers=AUTH)
        assert r.status_code == 200 and isinstance(seen[-1][1]["vllm_xargs"][PLAN_KEY], str)
        assert ";" not in r.headers["x-wrag-shards"]
    r = client.post("/v1/completions", json={"model": "m", "prompt": ["", "", " "]}, headers=AUTH)
    assert r.status_code == 200 and r.headers["x-wrag-shards"] == "-;-;-"
    r = client.post("/v1/completions", json={"model": "m", "prompt": "the patient has a disease",
                                             "prompt_embeds": ["AAAA", "AAAA"]}, headers=AUTH)
    assert r.headers["x-wrag-source"] == "none;none;retrieved"  # vLLM serves the embeds first


def test_failed_requests_say_so_in_headers(front):
    """A 5xx from the engine (set refused or failed): x-wrag-source: failed, no shards claimed."""
    client, _ = front(echo_status=500)
    r = client.post("/v1/completions", json={"model": "m", "prompt": "x", "vllm_xargs": {"wrag_shards": ["med"]}},
                    headers=AUTH)
    assert r.status_code == 500 and r.headers["x-wrag-source"] == "failed" and r.headers["x-wrag-shards"] == "-"


# ------------------------------------------------------------------ per-request limits
def test_weights_methods_and_params_are_bounded():
    cfg = WragConfig(store="/x", max_weight=2.0)
    assert parse_controls({"wrag_shards": ["a"], "wrag_weights": [2.0]}, cfg).weights == [2.0]
    for w in (2.01, 1e30, -1e-9, float("inf")):
        with pytest.raises(RequestError, match="max_weight"):
            parse_controls({"wrag_shards": ["a"], "wrag_weights": [w]}, cfg)
    with pytest.raises(RequestError, match="offline rule"):
        parse_controls({"wrag_method": "ties"}, cfg)
    assert parse_controls({"wrag_method": "ties"}, WragConfig(store="/x", request_methods=["ties"])).method == "ties"
    from wrag_vllm.serving.controls import check_method_params
    check_method_params("svd-centered", {"lam": 1.0, "rho": 8}, cfg)
    for bad in ({"lam": -5}, {"lam": 1e9}, {"rho": 10 ** 9}, {"max_rank": 10 ** 6}, {"rho_energy": 2}):
        with pytest.raises(RequestError):
            check_method_params("svd-centered", bad, cfg)


# ------------------------------------------------------------------ admin surface
def test_admin_writes_are_off_by_default_and_need_a_key(front, store, tmp_path):
    client, _ = front()
    r = client.post("/wrag/shards", json={"path": str(tmp_path)}, headers=AUTH)
    assert r.status_code == 403 and "admin_writes" in r.text
    assert client.delete("/wrag/shards/med", headers=AUTH).status_code == 403
    client, _ = front(tokens=(), admin_writes=True, admin_dirs=[str(tmp_path)])
    r = client.post("/wrag/shards", json={"path": str(tmp_path)})
    assert r.status_code == 403 and "--api-key" in r.text
    assert "med" in store


@pytest.mark.parametrize("path", ["GET /wrag/config", "GET /wrag/shards", "POST /wrag/retrieve",
                                  "GET /wrag/chat/methods", "POST /wrag/shards", "DELETE /wrag/shards/med"])
def test_every_wrag_route_follows_the_api_key(front, path):
    client, _ = front(admin_writes=True)
    method, url = path.split()
    r = client.request(method, url, json={"text": "x"})
    assert r.status_code == 401
    r = client.request(method, url, json={"text": "x"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


def test_registration_by_path_only_inside_admin_dirs_one_message(front, store, tiny_fp, tmp_path):
    from helpers_shards import random_shard

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir(), outside.mkdir()
    random_shard(tiny_fp, "out1", description="outside").save(outside / "out1.safetensors")
    (allowed / "junk.safetensors").write_bytes(b"\x00" * 64)
    (allowed / "secret.txt").write_text("TOP-SECRET-CONTENT " * 10)
    (allowed / "link.safetensors").symlink_to(outside / "out1.safetensors")
    client, _ = front(admin_writes=True, admin_dirs=[str(allowed)])
    before = {m["id"] for m in store.list()}
    messages = set()
    for p in (outside / "out1.safetensors", allowed / "missing.safetensors", allowed / "junk.safetensors",
              allowed / "secret.txt", allowed / "link.safetensors", allowed / ".." / "outside" / "out1.safetensors",
              "/etc/passwd", "/proc/self/environ"):
        r = client.post("/wrag/shards", json={"path": str(p)}, headers=AUTH)
        assert r.status_code == 400, (p, r.text)
        messages.add(r.json()["error"]["message"])
    assert len(messages) == 1 and "TOP-SECRET" not in next(iter(messages))
    assert {m["id"] for m in store.list()} == before
    random_shard(tiny_fp, "in1", description="inside the admin folder").save(allowed / "in1.safetensors")
    r = client.post("/wrag/shards", json={"path": str(allowed / "in1.safetensors")}, headers=AUTH)
    assert r.status_code == 200 and r.json()["id"] == "in1"
    assert client.delete("/wrag/shards/in1", headers=AUTH).status_code == 200
    assert client.delete("/wrag/shards/in1", headers=AUTH).status_code == 404


def test_uploads_over_http(front, store, tiny_fp, tmp_path):
    from helpers_shards import random_shard

    client, _ = front(admin_writes=True, max_upload_mb=1)
    raw = (random_shard(tiny_fp, "up1", description="uploaded").save(tmp_path / "u.safetensors")).read_bytes()
    r = client.post("/wrag/shards?id=up-octet", content=raw, headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert r.status_code == 200 and r.json()["id"] == "up-octet"
    r = client.post("/wrag/shards", files={"shard": ("x.safetensors", raw)}, headers=AUTH,
                    data={"id": "up-form", "description": "an uploaded shard", "samples": json.dumps(["a text"]),
                          "queries": json.dumps(["how do I upload a shard?"])})
    assert r.status_code == 200 and r.json()["samples"] == ["a text"], r.text
    assert r.json()["queries"] == ["how do I upload a shard?"]
    # queries that are not a list of strings, or too many: a clear 400, nothing registered
    for bad, why in ((json.dumps({"q": 1}), "queries"), ("[1, 2]", "queries"), (json.dumps(["q"] * 1001), "1001 queries")):
        r = client.post("/wrag/shards", files={"shard": ("x.safetensors", raw)}, headers=AUTH,
                        data={"id": "up-bad", "queries": bad})
        assert r.status_code == 400 and why in r.text, r.text
    assert "up-bad" not in store
    # a bad upload: a clear reason about the bytes, no server path
    r = client.post("/wrag/shards", files={"shard": ("x.safetensors", b"not a shard")}, headers=AUTH)
    assert r.status_code == 400 and "/tmp" not in r.text and "wrag-upload" not in r.text
    # too large, and cross-site "simple" content types
    r = client.post("/wrag/shards", content=b"\0" * (2 << 20), headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert r.status_code == 413
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):
        r = client.post("/wrag/shards", content=json.dumps({"path": "/x"}), headers={**AUTH, "Content-Type": ctype})
        assert r.status_code == 415
    r = client.post("/wrag/retrieve", content=json.dumps({"text": "x"}), headers={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 415
    for sid in ("up-octet", "up-form"):
        store.remove(sid)


@pytest.mark.parametrize("factor", [300.0, 1e6])
def test_extreme_shard_values_are_refused_at_registration(front, store, tiny_fp, tmp_path, factor):
    import re

    from helpers_shards import random_shard

    client, _ = front(admin_writes=True)
    sh = random_shard(tiny_fp, "huge", description="extreme values")
    for f in sh.factors.values():
        f.B.mul_(factor)
    raw = sh.save(tmp_path / "huge.safetensors").read_bytes()
    r = client.post("/wrag/shards", content=raw, headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert r.status_code == 400 and re.search("RMS|magnitude", r.json()["error"]["message"]), r.text
    assert "huge" not in store


def test_no_absolute_paths_in_responses(front, store):
    client, _ = front(admin_dirs=["/srv/shards"])
    for url in ("/wrag/config", "/wrag/shards"):
        text = client.get(url, headers=AUTH).text
        assert str(store.root) not in text and "/srv/shards" not in text, (url, text)


# ------------------------------------------------------------------ engine core (no vLLM)
class _Req:
    def __init__(self, rid, extra_args, cache_salt=None):
        from vllm.sampling_params import SamplingParams

        self.request_id, self.client_index, self.cache_salt = rid, 0, cache_salt
        self.sampling_params = SamplingParams(extra_args=extra_args)
        self.prompt_token_ids = [1, 2, 3]


def test_engine_refuses_what_the_front_end_did_not_seal(store, tmp_path, monkeypatch):
    from wrag_vllm.serving.admission import Admission

    monkeypatch.delenv("WRAG_PLAN_KEY", raising=False)
    ensure_key()
    cfg = WragConfig(store=str(store.root))
    adm = Admission(cfg, str(tmp_path / "run"), text_of=lambda r: "")
    forged = Plan(["med"], [1e30], "linear").to_json()
    cases = {"unsealed": {PLAN_KEY: forged}, "bad-seal": {PLAN_KEY: "00" * 32 + "." + forged},
             "slots": {"wrag_slots": '[["k", 1.0, "/etc/passwd"]]'}, "controls": {"wrag_weights": [1]},
             "plan-list": {PLAN_KEY: [Plan(["med"], [1.0], "linear").sealed()] * 2}}  # the API hook did not pick
    for rid, ea in cases.items():
        assert adm.arrive(rid, _Req(rid, ea), ea) is False
    for _ in range(200):
        adm.poll(idle=True)
        if len(adm.failed) == len(cases):
            break
    assert sorted(r.request_id for r in adm.take_failed()) == sorted(cases) and not adm.pending
    ok = {PLAN_KEY: Plan(source="off").sealed()}
    assert adm.arrive("fine", _Req("fine", ok), ok) is True


def test_engine_salts_the_prefix_cache_per_applied_set(store, tmp_path, monkeypatch):
    from wrag_vllm.serving.admission import Admission, cache_salt

    monkeypatch.delenv("WRAG_PLAN_KEY", raising=False)
    ensure_key()
    salts = {}
    adm = Admission(WragConfig(store=str(store.root)), str(tmp_path / "run"),
                    resalt=lambda req, s: salts.__setitem__(req.request_id, s))
    plans = {"a": Plan(["med"], [1.0], "linear"), "b": Plan(["med"], [1.0], "linear"),
             "c": Plan(["med"], [0.5], "linear"), "d": Plan(["med", "code"], [0.5, 0.5], "svd-centered")}
    for rid, p in plans.items():
        ea = {PLAN_KEY: p.sealed()}
        adm.arrive(rid, _Req(rid, ea, cache_salt="client" if rid == "b" else None), ea)
    for _ in range(200):
        adm.poll(idle=True)
        if len(salts) == len(plans):
            break
    assert len(set(salts.values())) == 4  # other client salt, other weight, other set: other salt
    assert all(s.startswith("wrag:") for s in salts.values())
    assert cache_salt(None, []) != cache_salt("x", [])


# ====================================================================== against a real vllm serve
SLOW_WRAG = {"slots": 4, "k_max": 3, "max_rank": 16, "top_k": 1, "threshold": 0.3, "admin_writes": True}
PREFIX = ("A long shared system prompt that many tenants send first, so that vLLM's prefix cache "
          "holds its KV blocks: be brief and kind. ")  # > 1 KV block of the char-level tokenizer


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from helpers_server import Server, model_and_store

    tmp = tmp_path_factory.mktemp("wrag-sec")
    model_dir, _, store, _ = model_and_store(tmp, {"law": "contracts, courts and lawsuits",
                                                   "med": "medicine, diseases and patients",
                                                   "broken": "a shard whose file goes bad on disk"}, seed=30)
    srv = Server(model_dir, tmp / "store", tmp, wrag={**SLOW_WRAG, "admin_dirs": [str(tmp / "incoming")]},
                 api_key="sec-key-1", eager=True, extra_args=["--enable-prompt-tokens-details", "--enable-scale-out"])
    try:
        srv.wait_ready()
        yield {"srv": srv, "store": store, "tmp": tmp}
    finally:
        srv.stop()


def _call(served, path, body, key=KEY, method="POST"):
    from helpers_server import call_json

    return call_json(served["srv"].base_url, path, body, key, method)


def _complete(served, prompt, xargs=None, salt=None, chat=False):
    """(greedy token ids, cached prompt tokens, headers)."""
    body = {"model": "tiny", "max_tokens": 8, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]  # the chat template adds a shared prefix too
    else:
        body["prompt"] = prompt
    if xargs is not None:
        body["vllm_xargs"] = xargs
    if salt is not None:
        body["cache_salt"] = salt
    status, headers, out = _call(served, "/v1/chat/completions" if chat else "/v1/completions", body)
    assert status == 200, out
    details = (out.get("usage") or {}).get("prompt_tokens_details") or {}
    choice = out["choices"][0]
    return choice["token_ids"], details.get("cached_tokens") or 0, headers


def _fresh(served, prompt, xargs=None, chat=False):
    """What a fresh server answers: a unique cache salt reuses no cached block."""
    return _complete(served, prompt, xargs, salt=os.urandom(8).hex(), chat=chat)[0]


@pytest.mark.slow
def test_route_list_matches_vllm_routes(served):
    """Every vLLM route whose request carries vllm_xargs or sampling params is one WRAG watches."""
    with urllib.request.urlopen(served["srv"].base_url + "/openapi.json", timeout=60) as r:
        spec = json.loads(r.read())
    schemas = spec["components"]["schemas"]

    def props(schema):
        if "$ref" in schema:
            schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
        out = set(schema.get("properties", {}))
        for sub in schema.get("anyOf", []) + schema.get("oneOf", []) + schema.get("allOf", []):
            out |= props(sub)
        return out

    carrying = set()
    for path, ops in spec["paths"].items():
        for content in ((ops.get("post") or {}).get("requestBody") or {}).get("content", {}).values():
            if props(content.get("schema", {})) & {"vllm_xargs", "sampling_params", "extra_args"}:
                carrying.add(path)
    assert "/v1/completions" in carrying and "/inference/v1/generate" in carrying  # the check sees them
    assert carrying - set(ROUTES) == set(), "vLLM routes that take vllm_xargs but WRAG does not watch"
    assert "/invocations" in spec["paths"]  # dispatches by body type (no schema): watched by name
    for path, kind in ROUTES.items():
        if not path.startswith("/v1/audio"):  # audio routes exist only for speech models
            assert path in spec["paths"], f"{path} is gone from vLLM: update api.ROUTES"


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True])
def test_prefix_cache_never_mixes_shard_sets(served, chat):
    """Base and shard requests on one long shared prefix, in both orders, give the tokens they give
    on a fresh server; the cache still serves repeats of the same set."""
    law = {"wrag_shards": ["law"]}
    for order, prefix in (("base-first", PREFIX), ("shard-first", PREFIX.replace("tenants", "clients"))):
        p_base, p_shard = prefix + "Question one?", prefix + "Question two!"
        if order == "base-first":
            base = _complete(served, p_base, chat=chat)
            shard = _complete(served, p_shard, law, chat=chat)
        else:
            shard = _complete(served, p_shard, law, chat=chat)
            base = _complete(served, p_base, chat=chat)
        assert shard[2]["x-wrag-shards"] == "law=1"
        assert base[0] == _fresh(served, p_base, chat=chat), order
        assert shard[0] == _fresh(served, p_shard, law, chat=chat), order
        assert base[0] != shard[0]  # the shard changes the answer: the test can see a mix-up
        # prefix caching stays on: the same set on the same prefix reuses blocks
        again = _complete(served, p_base + " More?", chat=chat)
        assert again[1] > 0, "prefix caching is off: this test would prove nothing"
        again = _complete(served, p_shard + " More?", law, chat=chat)
        assert again[1] > 0 and again[0] == _fresh(served, p_shard + " More?", law, chat=chat)


@pytest.mark.slow
def test_hostile_requests_cannot_change_other_requests(served):
    prompts = [PREFIX + f"Tell me about item {i}." for i in range(4)]
    ref = {(p, chat): _fresh(served, p, {"wrag_off": True}, chat=chat) for p in prompts for chat in (False, True)}
    strongest = {"wrag_shards": ["law", "med"], "wrag_weights": [2.0, 2.0], "wrag_method": "svd-centered",
                 "wrag_params": json.dumps({"lam": 4.0})}
    refused = [{"wrag_shards": ["law"], "wrag_weights": [1e30]}, {"wrag_plan": "{}"}, {"wrag_method": "ties"},
               {"wrag_slots": '[["k", 1.0, "/etc/passwd"]]'}, {"wrag_params": json.dumps({"rho": 1e9})}]

    def hostile(i):
        chat = bool(i % 2)
        if i % 3 == 0:
            body = {"model": "tiny", "prompt": prompts[i % 4], "max_tokens": 4, "vllm_xargs": refused[i % 5]}
            assert _call(served, "/v1/completions", body)[0] == 400
            return None
        return _complete(served, prompts[i % 4], strongest, chat=chat)

    def victim(i):
        p, chat = prompts[i % 4], bool(i % 2)
        return (p, chat), _complete(served, p, {"wrag_off": True}, chat=chat)[0]

    with cf.ThreadPoolExecutor(max_workers=12) as ex:
        futs = [ex.submit(hostile, i) for i in range(12)] + [ex.submit(victim, i) for i in range(12)]
        results = [f.result() for f in futs]
    for key, toks in (r for r in results[12:]):
        assert toks == ref[key], key
    for key in ref:  # and afterwards, through whatever the hostile requests left in the cache
        assert _complete(served, key[0], {"wrag_off": True}, chat=key[1])[0] == ref[key]


@pytest.mark.slow
def test_no_request_stops_the_server(served):
    """Server keys, bad payloads and a shard that fails to prepare: errors for those requests only."""
    forged = {"wrag_slots": '[["k", 1.0, "/etc/passwd"]]'}
    for path, body in (("/v1/completions", {"model": "tiny", "prompt": "x"}),
                       ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}),
                       ("/v1/messages", {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}),
                       ("/v1/responses", {"model": "tiny", "input": "x"}),
                       ("/invocations", {"model": "tiny", "prompt": "x"})):
        for xargs in (forged, {"wrag_plan": "00." + Plan(["law"], [1.0]).to_json()}):
            status, _, out = _call(served, path, {**body, "vllm_xargs": xargs})
            assert status == 400 and "set by the server" in out["error"]["message"], (path, out)
    status, _, out = _call(served, "/inference/v1/generate",
                           {"token_ids": [5, 6, 7], "sampling_params": {"max_tokens": 2, "extra_args": forged}})
    assert status == 400, out
    status, headers, out = _call(served, "/invocations", {"model": "tiny", "prompt": "x"}, key=None)
    assert status == 401
    # the Anthropic route is a WRAG route like the others
    status, headers, out = _call(served, "/v1/messages", {"model": "tiny", "max_tokens": 4, "messages": [
        {"role": "user", "content": "a court ruled on the contract"}], "vllm_xargs": {"wrag_shards": ["med"]}})
    assert status == 200 and headers["x-wrag-shards"] == "med=1", out
    # a shard whose file went bad after registration: that request fails, and says so
    shard_file = next((served["tmp"] / "store" / "shards").glob("broken*.safetensors"))
    shard_file.write_bytes(b"\0" * 128)
    status, headers, out = _call(served, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2,
                                                              "vllm_xargs": {"wrag_shards": ["broken"]}})
    assert status == 500 and headers["x-wrag-source"] == "failed", (status, headers, out)
    with urllib.request.urlopen(served["srv"].base_url + "/health", timeout=30) as r:
        assert r.status == 200
    toks, _, headers = _complete(served, PREFIX + "Still there?", {"wrag_shards": ["law"]})
    assert headers["x-wrag-shards"] == "law=1" and toks == _fresh(served, PREFIX + "Still there?", {"wrag_shards": ["law"]})
