"""WRAG inside an ordinary vLLM server.

Modules (one job each):
    config      WragConfig: --additional-config '{"wrag": {...}}' and WRAG_* environment variables
    xargs       per-request controls (vllm_xargs wrag_*) -> validated RequestControls, HTTP 400 messages
    seal        HMAC seal on the plan the API server hands the engine (no client can forge one)
    resolver    retrieval (store search) + score -> weight rule -> a Plan (shard ids, weights, method)
    preparer    engine-core side: Plan -> slot payload files (shards / cached compositions)
    scheduler   scheduler mixin: prepare off the engine loop, admit only what the shard pool can hold
    pool        worker side: fixed device slot pool (LRU) + host cache, fills the per-token metadata
    vllm_hooks  THE ONLY module that touches vLLM internals; lists every patched/subclassed symbol;
                the out-of-tree gate_up_proj / down_proj classes calling wrag_kernels.apply_delta
    plugin      vllm.general_plugins entry point
    api         vllm.endpoint_plugins entry point: request middleware on every generate route
    admin       the /wrag admin routes: API key, admin writes, uploads
    metrics     prometheus metrics (served on vLLM's /metrics)
    cli         `wrag serve MODEL [vLLM args]`
"""
