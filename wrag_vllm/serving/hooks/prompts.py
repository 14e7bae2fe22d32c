"""Hook 4 (API server): engine request i of a multi-prompt completions request gets prompt i's plan.

vLLM serves a completions body with N prompts as N engine requests that share one `extra_args`
dict (the body's vllm_xargs), so the front end cannot give each its own plan through the body
alone. It writes a list instead, `extra_args[PLAN_KEY] = [sealed plan of prompt 0, …, N-1]`, and
AsyncLLM.add_request — called once per engine request with its request id, before the request is
serialized to the engine core — is wrapped to replace the list with element i in a copy of the
request's SamplingParams. vLLM names engine request i of a completions request
`f"{request_id}-{i}"` (OpenAIServingCompletion._create_completion; the client's X-Request-Id or
`request_id` is only ever the part before it), which `prompt_index` reads back.

Fail closed: a list whose index cannot be read (a vLLM upgrade changed the name) is left as it
is, and the engine core refuses a plan that is not one sealed string (admission.py): that request
fails with an error, it is never served with another prompt's shards. Installed by the front end
(frontend.WragEndpoint.init_state), so only in API-server processes.
"""
from __future__ import annotations

import copy
import logging

from ..plan import PLAN_KEY

log = logging.getLogger("vllm.wrag")


def prompt_index(request_id: str) -> int | None:
    """i of a completions engine request named `{request_id}-{i}`; None for any other name."""
    _, sep, tail = request_id.rpartition("-")
    return int(tail) if sep and tail.isascii() and tail.isdigit() else None


def pick_plan(params, request_id: str):
    """`params` itself, unless its extra_args carry a per-prompt plan list: then a copy whose own
    extra_args hold the plan of this request's prompt (the list is shared by all prompts' params)."""
    ea = getattr(params, "extra_args", None)
    plans = ea.get(PLAN_KEY) if isinstance(ea, dict) else None
    if not isinstance(plans, list):
        return params
    i = prompt_index(request_id)
    if i is None or i >= len(plans):
        log.error("WRAG: request %s has %d per-prompt plans and no prompt index in its id: the engine "
                  "will refuse it", request_id, len(plans))
        return params
    out = copy.copy(params)
    out.extra_args = {**ea, PLAN_KEY: plans[i]}
    return out


def install_prompt_plans() -> None:
    """Idempotent: wrap AsyncLLM.add_request with pick_plan."""
    from vllm.v1.engine.async_llm import AsyncLLM

    if getattr(AsyncLLM.add_request, "_wrag_orig", None) is not None:
        return
    orig = AsyncLLM.add_request

    async def add_request(self, request_id, prompt, params, *args, **kwargs):
        return await orig(self, request_id, prompt, pick_plan(params, request_id), *args, **kwargs)

    add_request._wrag_orig = orig
    AsyncLLM.add_request = add_request
