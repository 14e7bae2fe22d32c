"""Every vLLM symbol WRAG subclasses, patches or relies on, in one list.

tests/test_serving_hooks.py resolves each of them and fails loudly when a vLLM upgrade moves or
renames one, and checks the facts of vLLM's code WRAG relies on without importing a symbol for them
(VLLM_SOURCE_FACTS: how engine requests of one completions body are named and ordered). The hooks
themselves are in this package (layers.py, scheduler.py, runner.py, prompts.py); the supported
plugin entry points are plugin.py (vllm.general_plugins) and frontend.py (vllm.endpoint_plugins).
"""
from __future__ import annotations

import importlib

# (module, qualified attribute, how WRAG uses it)
VLLM_SYMBOLS = [
    ("vllm.model_executor.layers.linear", "MergedColumnParallelLinear", "subclassed + register_oot (gate_up_proj)"),
    ("vllm.model_executor.layers.linear", "RowParallelLinear", "subclassed + register_oot (down_proj)"),
    ("vllm.model_executor.layers.linear", "MergedColumnParallelLinear.forward", "re-implemented in the subclass"),
    ("vllm.model_executor.layers.linear", "RowParallelLinear.forward", "re-implemented in the subclass"),
    ("vllm.model_executor.custom_op", "op_registry_oot", "checked to register the layers once"),
    ("vllm.distributed", "tensor_model_parallel_all_gather", "used by the gate_up forward"),
    ("vllm.distributed", "tensor_model_parallel_all_reduce", "used by the down forward"),
    ("vllm.distributed.utils", "split_tensor_along_last_dim", "used by the down forward"),
    ("vllm.config", "get_current_vllm_config", "layers read the WRAG config at construction"),
    ("vllm.config.scheduler", "SchedulerConfig.get_scheduler_cls", "wrapped (scheduler subclass)"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.add_request", "overridden in the subclass"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.schedule", "overridden in the subclass"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.finish_requests", "overridden in the subclass"),
    ("vllm.v1.core.sched.scheduler", "Scheduler._free_request", "overridden in the subclass"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.get_num_unfinished_requests", "overridden in the subclass"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.has_requests", "overridden in the subclass"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.update_from_output", "overridden: errors for refused requests"),
    ("vllm.v1.engine", "EngineCoreOutput", "built for refused requests (finish_reason ERROR)"),
    ("vllm.v1.engine", "EngineCoreOutputs", "built for refused requests"),
    ("vllm.v1.engine", "FinishReason.ERROR", "finish reason of refused requests"),
    ("vllm.v1.request", "Request.update_block_hashes", "resalt(): prefix-cache keys per shard set"),
    ("vllm.v1.request", "Request.from_engine_core_request", "cache_salt reaches Request.cache_salt"),
    ("vllm.v1.core.sched.async_scheduler", "AsyncScheduler", "possible base of the subclass"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._prepare_inputs", "wrapped (V1 runner step hook)"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.prepare_inputs", "wrapped (V2 runner step hook)"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.add_requests", "wrapped (V2: read extra_args)"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.finish_requests", "wrapped (V2: forget requests)"),
    ("vllm.v1.engine.async_llm", "AsyncLLM.add_request", "wrapped (API server: prompt i's plan, prompts.py)"),
    ("vllm.plugins.endpoint_plugins.interface", "EndpointPlugin", "protocol implemented by frontend.WragEndpoint"),
    ("vllm.entrypoints.serve.middleware.authenticate", "AuthenticationMiddleware.verify_token",
     "admin routes check --api-key the same way"),
]
# (module, qualified attribute, code snippets its source contains in this order, what WRAG relies on);
# whitespace is ignored in the comparison
VLLM_SOURCE_FACTS = [
    ("vllm.entrypoints.openai.completion.serving", "OpenAIServingCompletion._create_completion",
     ('request_id_item = f"{request_id}-{i}"', "self.engine_client.generate(", "request_id_item,"),
     "engine request i of a completions body is named {request_id}-{i} (prompts.prompt_index)"),
    ("vllm.renderers.online_renderer", "OnlineRenderer.preprocess_completion",
     ("prompts.extend(prompt_to_seq(prompt_embeds))", "prompts.extend(prompt_to_seq(prompt_input))"),
     "engine inputs of a completions body: prompt_embeds first, then the prompts (frontend.query_texts)"),
    ("vllm.v1.engine.async_llm", "AsyncLLM.generate", ("await self.add_request(request_id, prompt, sampling_params,",),
     "add_request sees the request id the completions route gave generate (prompts.pick_plan)"),
]
# attributes read on vLLM objects (not importable symbols; checked by the integration tests)
VLLM_ATTRIBUTES = [
    "Request.request_id, Request.sampling_params.extra_args, Request.prompt_token_ids, Request.client_index",
    "Request.cache_salt, Request.block_hashes (resalt)",
    "V1 runner: self.input_batch.req_ids/num_reqs, self.requests[id].sampling_params, self.query_start_loc.cpu",
    "V2 runner: NewRequestData.req_id/.sampling_params, InputBatch.req_ids/.query_start_loc_np",
    "SchedulerOutput.finished_req_ids, scheduled_new_reqs",
    "linear layers: quant_method.apply, tp_rank, tp_size, output_sizes, input_size_per_partition, params_dtype",
]


def resolve_symbol(module: str, attr: str):
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def changed_sources() -> list[str]:
    """The VLLM_SOURCE_FACTS that vLLM's source no longer states."""
    import inspect

    out = []
    for mod, attr, snippets, why in VLLM_SOURCE_FACTS:
        src = "".join(inspect.getsource(resolve_symbol(mod, attr)).split())
        at = 0
        for snip in snippets:
            at = src.find("".join(snip.split()), at)
            if at < 0:
                out.append(f"{mod}.{attr} no longer contains {snip!r} ({why})")
                break
    return out


def missing_symbols() -> list[str]:
    out = []
    for mod, attr, _ in VLLM_SYMBOLS:
        try:
            resolve_symbol(mod, attr)
        except (ImportError, AttributeError) as e:
            out.append(f"{mod}.{attr}: {e}")
    return out
