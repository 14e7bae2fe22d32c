"""vLLM data parallelism on CPU with WRAG: `--data-parallel-size 2` runs two engine cores, each with
its own pool and admission; the front end routes by shard set (affinity.py) and every request,
on either engine, gets the dense reference's tokens."""
from __future__ import annotations

import urllib.request

import pytest

pytestmark = pytest.mark.slow

SHARDS = {"law": "contracts, courts, legal liability, lawsuits and statutes",
          "med": "medicine, diseases, patients, symptoms and clinical treatment",
          "astro": "astronomy, planets, stars, galaxies and telescopes"}
PROMPTS = {"the patient has a disease": "med", "a court ruled on the contract": "law",
           "stars and galaxies through a telescope": "astro"}


def test_two_engines_route_by_shard_set_and_match_the_reference(tmp_path):
    from helpers_server import Server, call_json, hf_greedy, model_and_store

    model_dir, _, store, shards = model_and_store(tmp_path, SHARDS, seed=10)
    store.close()
    srv = Server(model_dir, tmp_path / "store", tmp_path,
                 wrag={"slots": 4, "k_max": 3, "max_rank": 16, "top_k": 1, "threshold": 0.3},
                 extra_args=["--data-parallel-size", "2"])
    try:
        srv.wait_ready()
        for prompt, sid in list(PROMPTS.items()) * 2:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True,
                    "return_token_ids": True}
            status, headers, out = call_json(srv.base_url, "/v1/completions", body)
            assert status == 200 and headers["x-wrag-shards"] == f"{sid}=1", (status, headers, out)
            want = hf_greedy(model_dir, shards, prompt, (sid,), (1.0,), "svd-centered")
            assert out["choices"][0]["token_ids"] == want
        # two API server processes: /metrics comes from prometheus_client's multiprocess files, and
        # the engines' counters are still there (metrics.FrontMetrics.refresh_engine)
        with urllib.request.urlopen(srv.base_url + "/metrics", timeout=60) as r:
            text = r.read().decode()
        values = {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in text.splitlines()
                  if line.startswith("wrag_")}
        assert values.get("wrag_pool_loads_total", 0) >= 3, sorted(values)  # each engine loaded its sets
        log = srv.log_path.read_text()
        assert "shard-affinity routing over 2 data-parallel engines" in log
        assert "EngineCore_DP1" in log  # two engine cores really ran
    finally:
        srv.stop()
