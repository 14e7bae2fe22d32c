"""The real `vllm serve` path with the Triton backend: under Triton's interpreter on CPU, compiled
with CUDA graphs on a GPU.

The GPU serves WRAG through the Triton kernels; no GPU runs in CI. Here a CPU server is started
with `kernel_backend: triton` and TRITON_INTERPRET=1, so the kernels run on the real batch
metadata the V1 model runner hook fills (prefill segments: SGMV; decode steps: BGMV), and the
greedy tokens must equal the HF dense reference — as the CPU backends' must in test_serving.py.
Where CUDA is present (benchmarks/gpu_check.sh) the same test runs vLLM's default GPU set-up:
torch.compile + CUDA graphs captured at start-up with dummy batches, the kernels graph-safe — the
tokens of every replayed decode step must still carry the delta.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow
ON_GPU = torch.cuda.is_available()

SHARDS = {"law": "contracts, courts and lawsuits", "med": "medicine, diseases and patients",
          "code": "programming, software and python code"}
N_TOK = 8 if ON_GPU else 4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("triton")
    from helpers_server import Server, model_and_store

    tmp = tmp_path_factory.mktemp("wrag-triton")
    model_dir, _, _, shards = model_and_store(tmp, SHARDS, seed=50)
    srv = Server(model_dir, tmp / "store", tmp, eager=not ON_GPU, env={} if ON_GPU else {"TRITON_INTERPRET": "1"},
                 wrag={"slots": 4, "k_max": 3, "max_rank": 16, "kernel_backend": "triton"})
    try:
        srv.wait_ready()
        yield {"srv": srv, "model_dir": model_dir, "shards": shards}
    finally:
        srv.stop()


def _complete(served, prompt, xargs):
    from helpers_server import call_json

    body = {"model": "tiny", "prompt": prompt, "max_tokens": N_TOK, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True, "vllm_xargs": xargs}
    status, _, out = call_json(served["srv"].base_url, "/v1/completions", body, timeout=600)
    assert status == 200, out
    return out["choices"][0]["token_ids"]


@pytest.mark.parametrize("ids,weights,method", [(("med",), (1.0,), "linear"),
                                                 (("law", "code", "med"), (0.5, 0.3, 0.2), "linear")] +
                         ([(("law", "code", "med"), (0.5, 0.3, 0.2), "svd-centered")] if ON_GPU else []),
                         ids=["k1", "k3-linear"] + (["k3-svd"] if ON_GPU else []))
def test_triton_backend_in_vllm_serve_matches_hf(served, ids, weights, method):
    from helpers_server import hf_greedy

    prompt = "the patient has a disease of the heart"
    toks = _complete(served, prompt, {"wrag_shards": list(ids), "wrag_weights": list(weights), "wrag_method": method})
    ref = hf_greedy(served["model_dir"], served["shards"], prompt, ids, weights, method, N_TOK)
    assert toks == ref
    assert ref != hf_greedy(served["model_dir"], served["shards"], prompt, n=N_TOK), "the delta changed nothing"
    log = served["srv"].log_path.read_text()
    assert "(kernels: triton)" in log   # the worker pool ran Triton
    if ON_GPU:
        assert "(kernels: triton, graph-safe)" in log and "Graph capturing finished" in log, "no CUDA graphs were captured"
