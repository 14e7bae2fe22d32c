"""Two `vllm serve` replicas on one PostgreSQL store, as two machines would run them: each has its own
local cache (WRAG_CACHE_DIR), so a replica needs nothing but the store's URL. A shard added through
one replica's admin route is retrieved and applied by the other on its next request, with the
tokens of the dense reference; after a removal commits, neither applies it.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import urllib.request

import pytest

pytestmark = pytest.mark.slow

SHARDS = {
    "law": "contracts, courts, legal liability, lawsuits and statutes",
    "med": "medicine, diseases, patients, symptoms and clinical treatment",
    "astro": "astronomy, planets, stars, galaxies and telescopes",
}
API_KEY = "replica-key"
WRAG = {"slots": 4, "k_max": 3, "max_rank": 16, "top_k": 1, "threshold": 0.3, "admin_writes": True}
N_TOK = 8


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, pg_cluster):
    from helpers_server import Server, build_model_dir
    from helpers_shards import random_shard

    from wrag_vllm.fingerprint import fingerprint_dir
    from wrag_vllm.store import ShardStore

    tmp = tmp_path_factory.mktemp("replicas")
    model_dir = build_model_dir(tmp / "model")
    fp = fingerprint_dir(model_dir)
    url = pg_cluster.url("replicas")
    shards = {sid: random_shard(fp, sid, rank=4, seed=20 + i, description=d, scale=4.0)
              for i, (sid, d) in enumerate(SHARDS.items())}
    os.environ["WRAG_CACHE_DIR"] = str(tmp / "cache-test")
    with ShardStore(url) as store:
        store.add_many(shards.values())
    servers = {name: Server(model_dir, url, tmp / name, wrag={**WRAG, "admin_dirs": [str(tmp)]}, api_key=API_KEY,
                            env={"WRAG_CACHE_DIR": str(tmp / f"cache-{name}")})
               for name in ("a", "b")}
    try:
        with cf.ThreadPoolExecutor(2) as ex:  # both start at once, like two machines
            list(ex.map(lambda s: s.wait_ready(), servers.values()))
        yield {"servers": servers, "model_dir": model_dir, "fp": fp, "shards": shards, "tmp": tmp, "url": url}
    finally:
        for s in servers.values():
            s.stop()
        os.environ.pop("WRAG_CACHE_DIR", None)


def _complete(srv, prompt, xargs=None):
    from helpers_server import call_json

    body = {"model": "tiny", "prompt": prompt, "max_tokens": N_TOK, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True, **({"vllm_xargs": xargs} if xargs else {})}
    status, headers, out = call_json(srv.base_url, "/v1/completions", body, API_KEY)
    return status, headers, out


def test_a_shard_added_on_one_replica_is_applied_by_the_other(replicas):
    from helpers_server import call_json, hf_greedy
    from helpers_shards import random_shard

    a, b = replicas["servers"]["a"], replicas["servers"]["b"]
    prompt = "lava erupts from the volcano"
    status, headers, _ = _complete(b, prompt)
    assert status == 200 and "volcano" not in headers.get("x-wrag-shards", "")
    new = random_shard(replicas["fp"], "volcano", rank=4, seed=99, scale=4.0,
                       description="volcanoes, lava, magma and eruptions")
    path = replicas["tmp"] / "volcano.safetensors"
    new.save(path)
    status, _, meta = call_json(a.base_url, "/wrag/shards", {"path": str(path)}, API_KEY)
    assert status == 200, meta
    # the very next request on the other replica retrieves it (its resolver reads the store's
    # generation per request), loads its bytes from the database and applies it
    status, headers, out = _complete(b, prompt)
    assert status == 200 and headers["x-wrag-shards"] == "volcano=1", headers
    replicas["shards"]["volcano"] = new
    want = hf_greedy(replicas["model_dir"], replicas["shards"], prompt, ("volcano",), (1.0,), "svd-centered", n=N_TOK)
    assert out["choices"][0]["token_ids"] == want
    status, _, listed = call_json(b.base_url, "/wrag/shards", None, API_KEY, method="GET")
    assert status == 200 and "volcano" in {m["id"] for m in listed["shards"]}

    # removal through the first replica: no request on either applies it afterwards
    req = urllib.request.Request(a.base_url + "/wrag/shards/volcano", method="DELETE",
                                 headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200
    for srv in (b, a):
        status, headers, _ = _complete(srv, prompt)
        assert status == 200 and "volcano" not in headers.get("x-wrag-shards", ""), headers
        status, _, out = _complete(srv, prompt, {"wrag_shards": ["volcano"]})
        assert status == 400 and "unknown shard id" in out["error"]["message"]
    # the replicas kept serving the shards they share
    status, headers, _ = _complete(b, "the patient has a disease")
    assert status == 200 and headers["x-wrag-shards"] == "med=1"
