"""WRAG inside an ordinary vLLM server.

Modules (one job each):
    config      WragConfig: --additional-config '{"wrag": {...}}' and WRAG_* environment variables
    xargs       per-request controls (vllm_xargs wrag_*) -> validated RequestControls, HTTP 400 messages
    resolver    retrieval (store search) + score -> weight rule -> a Plan (shard ids, weights, method)
    preparer    engine-core side: Plan -> slot payload files (shards / cached compositions)
    scheduler   scheduler mixin: prepare off the engine loop, admit only what the shard pool can hold
    pool        worker side: fixed device slot pool (LRU) + host cache, fills the per-token metadata
    layers      out-of-tree gate_up_proj / down_proj classes calling wrag_kernels.apply_delta
    vllm_hooks  THE ONLY module that touches vLLM internals; lists every patched/subclassed symbol
    plugin      vllm.general_plugins entry point
    api         vllm.endpoint_plugins entry point: request middleware + /wrag admin routes
    metrics     prometheus metrics (served on vLLM's /metrics)
    cli         `wrag serve MODEL [vLLM args]`
"""
