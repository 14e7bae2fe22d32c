"""WRAG inside an ordinary vLLM server. One request, file by file (plan.py draws the hand-offs):

    API server
        frontend    vllm.endpoint_plugins entry point: ASGI middleware on every generate route
        controls    the client's vllm_xargs wrag_* → RequestControls (HTTP 400 messages)
        resolver    retrieval (store search) + score → weight rule → a Plan
        plan        the hand-offs between processes: Plan, SlotRef, extra_args keys, JSON forms
        seal        HMAC seal on the plan (no client can forge one)
    engine core
        admission   prepare off the engine loop, admit only what the shard pool can hold, refuse
        preparer    Plan → slot payload files (shards / cached compositions)
    worker
        pool        fixed device slot pool (LRU) + host cache; fills the per-step DeltaMeta
    vLLM internals
        hooks/      layers (gate_up/down_proj + the delta), scheduler subclass, runner step hooks,
                    symbols (every vLLM symbol relied on, checked by a test)
    around it
        plugin      vllm.general_plugins entry point (installs hooks/ in every process)
        config      WragConfig: --additional-config '{"wrag": {...}}' and WRAG_* environment variables
        rundir      the folder the processes of one server share
        admin       the /wrag admin routes: API key, admin writes, uploads
        asgi        replayed bodies, forms and JSON errors for frontend and admin
        chat_page   GET /wrag/chat
        metrics     prometheus metrics (served on vLLM's /metrics)
        cli         `wrag serve MODEL [vLLM args]`
"""
