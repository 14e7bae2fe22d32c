"""ALL coupling between WRAG and vLLM internals lives in this module.

Every vLLM symbol WRAG subclasses, patches or relies on is listed in VLLM_SYMBOLS; the test
tests/test_serving_hooks.py fails loudly when a vLLM upgrade moves or renames one of them.

Hook points (few, named):
  1. Layers   MergedColumnParallelLinear.register_oot / RowParallelLinear.register_oot: out-of-tree
              classes for `*.mlp.gate_up_proj` and `*.mlp.down_proj` (other users of these classes,
              e.g. o_proj, get the unmodified behaviour). The delta is added to the local partition
              before the layer's all-gather / all-reduce.
  2. Scheduler SchedulerConfig.get_scheduler_cls is wrapped so that a plain `vllm serve` gets a
              subclass of the scheduler vLLM would have chosen (Scheduler or AsyncScheduler) with the
              admission logic of scheduler.Admission mixed in (same effect as --scheduler-cls, without
              making the user pass it and without losing async scheduling).
  3. Runner   after the model runner has laid out the flat batch, fill the shard pool's per-token
              metadata:  V1 runner (CPU and GPU V1): GPUModelRunner._prepare_inputs;
              V2 runner (v1/worker/gpu/, GPU default): GPUModelRunner.add_requests /
              finish_requests / prepare_inputs.
  4. Plugins  vllm.general_plugins (plugin.register) and vllm.endpoint_plugins (api.register_routes,
              implementing vllm.plugins.endpoint_plugins.interface.EndpointPlugin).
"""
from __future__ import annotations

import importlib
import logging
import os
import re

import torch

log = logging.getLogger("vllm.wrag")

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
    ("vllm.v1.core.sched.scheduler", "Scheduler.add_request", "overridden in the mixin"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.schedule", "overridden in the mixin"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.finish_requests", "overridden in the mixin"),
    ("vllm.v1.core.sched.scheduler", "Scheduler._free_request", "overridden in the mixin"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.get_num_unfinished_requests", "overridden in the mixin"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.has_requests", "overridden in the mixin"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.update_from_output", "overridden: errors for refused requests"),
    ("vllm.v1.engine", "EngineCoreOutput", "built for refused requests (finish_reason ERROR)"),
    ("vllm.v1.engine", "EngineCoreOutputs", "built for refused requests"),
    ("vllm.v1.engine", "FinishReason.ERROR", "finish reason of refused requests"),
    ("vllm.v1.request", "Request.update_block_hashes", "resalt(): prefix-cache keys per shard set"),
    ("vllm.v1.request", "Request.from_engine_core_request", "cache_salt reaches Request.cache_salt"),
    ("vllm.v1.core.sched.async_scheduler", "AsyncScheduler", "possible base of the mixin"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._prepare_inputs", "wrapped (V1 runner step hook)"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.prepare_inputs", "wrapped (V2 runner step hook)"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.add_requests", "wrapped (V2: read extra_args)"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.finish_requests", "wrapped (V2: forget requests)"),
    ("vllm.plugins.endpoint_plugins.interface", "EndpointPlugin", "protocol implemented by api.WragEndpoint"),
    ("vllm.entrypoints.serve.middleware.authenticate", "AuthenticationMiddleware.verify_token",
     "admin routes check --api-key the same way"),
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


def missing_symbols() -> list[str]:
    out = []
    for mod, attr, _ in VLLM_SYMBOLS:
        try:
            resolve_symbol(mod, attr)
        except (ImportError, AttributeError) as e:
            out.append(f"{mod}.{attr}: {e}")
    return out


# ====================================================================== process-wide state
_POOL = None


def get_pool():
    return _POOL


def _make_pool(cfg, vllm_config, dtype):
    global _POOL
    if _POOL is None:
        from .pool import ShardPool
        sc = vllm_config.scheduler_config
        max_tokens = int(max(sc.max_num_batched_tokens, getattr(sc, "max_num_seqs", 1)))
        _POOL = ShardPool(slots=cfg.slots, max_rank=cfg.max_rank, k_max=cfg.k_max, max_tokens=max_tokens,
                          max_seqs=int(sc.max_num_seqs), host_cache_bytes=cfg.host_cache_mb << 20,
                          run_dir=os.environ.get("WRAG_RUN_DIR"), device=torch.get_default_device(),
                          dtype=dtype)
        install_runner_hooks()
        log.info("WRAG: shard pool with %d slots of rank %d per FFN layer", cfg.slots, cfg.max_rank)
    return _POOL


# ====================================================================== 1. layers
_PREFIX = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.(gate_up_proj|down_proj)$")


def _wrag_setup(layer, kind: str) -> None:
    """Allocate the fixed pool buffers if this linear is a decoder FFN projection and WRAG is on."""
    layer.wrag_pool = None
    m = _PREFIX.search(getattr(layer, "prefix", "") or "")
    if not m or (kind == "gate_up") != (m.group(2) == "gate_up_proj"):
        return
    from vllm.config import get_current_vllm_config
    from .config import WragConfig

    vllm_config = get_current_vllm_config()
    cfg = WragConfig.from_vllm_config(vllm_config)
    if not cfg.enabled:
        return
    if kind == "gate_up" and (len(layer.output_sizes) != 2 or layer.output_sizes[0] != layer.output_sizes[1]):
        log.warning("WRAG: %s is not a [gate, up] pair; left unmodified", layer.prefix)
        return
    dtype = layer.params_dtype
    pool = _make_pool(cfg, vllm_config, dtype)
    S, R = cfg.slots, cfg.max_rank
    layer.wrag_layer = int(m.group(1))
    layer.wrag_kind = kind
    if kind == "gate_up":
        d_in, d_out, n = layer.input_size, layer.output_sizes[0] // layer.tp_size, 2
    else:
        d_in, d_out, n = layer.input_size_per_partition, layer.output_size, 1
    layer.wrag_dims = (d_in, d_out)
    layer.register_buffer("wrag_a_pool", torch.zeros(n, S, R, d_in, dtype=dtype), persistent=False)   # (n, S, R, d_in)
    layer.register_buffer("wrag_b_pool", torch.zeros(n, S, d_out, R, dtype=dtype), persistent=False)  # (n, S, d_out, R)
    layer.register_buffer("wrag_slot_ranks", torch.zeros(S, dtype=torch.int32), persistent=False)     # (S,)
    layer.wrag_meta = pool.meta
    layer.wrag_apply_fn = pool.apply_fn
    layer.wrag_pool = pool
    pool.register(layer)


@torch.no_grad()
def _wrag_load_slot(layer, slot: int, factors: dict, R: int) -> None:
    """Write one payload's factors for this layer into `slot` (zero-padded to rank R; TP-sliced)."""
    mods = ("gate_proj", "up_proj") if layer.wrag_kind == "gate_up" else ("down_proj",)
    d_in, d_out = layer.wrag_dims
    rank_max = 0
    for si, mod in enumerate(mods):
        layer.wrag_a_pool[si, slot].zero_()
        layer.wrag_b_pool[si, slot].zero_()
        f = factors.get((layer.wrag_layer, mod))
        if f is None:
            continue
        r = f.rank
        if r > R:
            raise ValueError(f"payload rank {r} > pool rank {R}")
        A, B = f.A.float(), f.B.float() * f.scale       # A (r, D_in), B (D_out, r)
        if layer.wrag_kind == "gate_up":                 # column-parallel: slice B by output rows
            B = B[layer.tp_rank * d_out:(layer.tp_rank + 1) * d_out]
        else:                                            # row-parallel: slice A by input columns
            A = A[:, layer.tp_rank * d_in:(layer.tp_rank + 1) * d_in]
        layer.wrag_a_pool[si, slot, :r].copy_(A)
        layer.wrag_b_pool[si, slot, :, :r].copy_(B)
        rank_max = max(rank_max, r)
    layer.wrag_slot_ranks[slot] = rank_max


def _linear_classes():
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
    return MergedColumnParallelLinear, RowParallelLinear


def _build_layer_classes():
    from vllm.distributed import tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce
    from vllm.distributed.utils import split_tensor_along_last_dim

    Merged, Row = _linear_classes()

    class WragMergedColumnParallelLinear(Merged):
        """gate_up_proj with the in-batch shard delta: y[gate|up] += Σ_j w·B_j(A_j x)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _wrag_setup(self, "gate_up")

        def wrag_load_slot(self, slot, factors, R):
            _wrag_load_slot(self, slot, factors, R)

        def forward(self, input_):
            if self.wrag_pool is None:
                return super().forward(input_)
            bias = self.bias if not self.skip_bias_add else None
            output_parallel = self.quant_method.apply(self, input_, bias)   # (T, 2·d_ff/tp)
            self.wrag_apply_fn(output_parallel, input_, self.wrag_a_pool, self.wrag_b_pool,
                               self.wrag_slot_ranks, self.wrag_meta)
            if self.gather_output and self.tp_size > 1:
                output = tensor_model_parallel_all_gather(output_parallel)
            else:
                output = output_parallel
            if not self.return_bias:
                return output
            return output, (self.bias if self.skip_bias_add else None)

    class WragRowParallelLinear(Row):
        """down_proj with the in-batch shard delta, added before the all-reduce (partial sums)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _wrag_setup(self, "down")

        def wrag_load_slot(self, slot, factors, R):
            _wrag_load_slot(self, slot, factors, R)

        def forward(self, input_):
            if self.wrag_pool is None:
                return super().forward(input_)
            if self.input_is_parallel:
                input_parallel = input_
            else:
                input_parallel = split_tensor_along_last_dim(input_, num_partitions=self.tp_size)[
                    self.tp_rank].contiguous()
            bias_ = None if (self.tp_rank > 0 or self.skip_bias_add) else self.bias
            output_parallel = self.quant_method.apply(self, input_parallel, bias_)   # (T, d_model)
            self.wrag_apply_fn(output_parallel, input_parallel, self.wrag_a_pool, self.wrag_b_pool,
                               self.wrag_slot_ranks, self.wrag_meta)
            if self.reduce_results and self.tp_size > 1:
                output = tensor_model_parallel_all_reduce(output_parallel)
            else:
                output = output_parallel
            if not self.return_bias:
                return output
            return output, (self.bias if self.skip_bias_add else None)

    return WragMergedColumnParallelLinear, WragRowParallelLinear


_LAYER_CLASSES = None


def register_layers():
    """Idempotent: register the out-of-tree layer classes (before the model is built)."""
    global _LAYER_CLASSES
    from vllm.model_executor.custom_op import op_registry_oot

    Merged, Row = _linear_classes()
    if _LAYER_CLASSES is None:
        _LAYER_CLASSES = _build_layer_classes()
    gu, dn = _LAYER_CLASSES
    if op_registry_oot.get("MergedColumnParallelLinear") is None:
        Merged.register_oot(gu, name="MergedColumnParallelLinear")
    if op_registry_oot.get("RowParallelLinear") is None:
        Row.register_oot(dn, name="RowParallelLinear")
    for name, cls in (("MergedColumnParallelLinear", gu), ("RowParallelLinear", dn)):
        if op_registry_oot.get(name) is not cls:
            log.warning("WRAG: another plugin replaced %s (%s); WRAG deltas will not be applied there",
                        name, op_registry_oot.get(name))
    return _LAYER_CLASSES


# ====================================================================== 2. scheduler
_SCHED_CACHE: dict = {}


def make_scheduler_cls(base):
    """A subclass of `base` (vLLM's Scheduler or AsyncScheduler) with WRAG admission."""
    if getattr(base, "_wrag", False):
        return base
    if base in _SCHED_CACHE:
        return _SCHED_CACHE[base]

    from .config import WragConfig
    from .metrics import EngineStats
    from .scheduler import Admission

    class WragScheduler(base):
        _wrag = True

        def __init__(self, vllm_config, *args, **kwargs):
            super().__init__(vllm_config, *args, **kwargs)
            cfg = WragConfig.from_vllm_config(vllm_config)
            self.wrag = None
            if cfg.enabled:
                run_dir = os.environ.get("WRAG_RUN_DIR") or _ensure_run_dir()
                tok_name = vllm_config.model_config.tokenizer
                self.wrag = Admission(cfg, run_dir, text_of=_prompt_text_fn(tok_name),
                                      stats=EngineStats(run_dir, "engine"), resalt=resalt)

        def add_request(self, request) -> None:
            w = self.wrag
            if w is None or request.request_id in self.requests or request.sampling_params is None:
                return super().add_request(request)
            ea = request.sampling_params.extra_args
            if w.arrive(request.request_id, request, ea):
                return super().add_request(request)

        def schedule(self, *args, **kwargs):
            w = self.wrag
            if w is not None and w.pending:
                idle = not base.has_requests(self)
                for r in w.poll(idle):
                    base.add_request(self, r)
            return super().schedule(*args, **kwargs)

        def finish_requests(self, request_ids, finished_status):
            if self.wrag is not None:
                ids = ([request_ids] if isinstance(request_ids, str)
                       else list(self.wrag.pending) if request_ids is None else list(request_ids))
                self.wrag.abort_pending(ids)
                if not isinstance(request_ids, str) and request_ids is not None:
                    request_ids = ids
            return super().finish_requests(request_ids, finished_status)

        def _free_request(self, request, *args, **kwargs):
            if self.wrag is not None:
                self.wrag.finished(request.request_id)
            return super()._free_request(request, *args, **kwargs)

        def update_from_output(self, scheduler_output, model_runner_output):
            outputs = super().update_from_output(scheduler_output, model_runner_output)
            if self.wrag is not None and self.wrag.failed:
                _emit_errors(outputs, self.wrag.take_failed())
            return outputs

        def get_num_unfinished_requests(self) -> int:
            n = super().get_num_unfinished_requests()
            return n + (len(self.wrag.pending) + len(self.wrag.failed) if self.wrag is not None else 0)

        def has_requests(self) -> bool:
            return super().has_requests() or bool(self.wrag is not None and (self.wrag.pending or self.wrag.failed))

        def shutdown(self) -> None:
            if self.wrag is not None:
                self.wrag.shutdown()
            super().shutdown()

    WragScheduler.__name__ = WragScheduler.__qualname__ = f"Wrag{base.__name__}"
    _SCHED_CACHE[base] = WragScheduler
    return WragScheduler


def resalt(request, salt: str) -> None:
    """Give a request (not yet in vLLM's scheduler) another prefix-cache salt: its block hashes
    were computed at arrival with the client's salt, so they are recomputed from scratch."""
    request.cache_salt = salt
    request.block_hashes = []
    request.update_block_hashes()


def _emit_errors(outputs: dict, requests) -> None:
    """Finish requests that never entered vLLM's scheduler with finish_reason ERROR (the client
    gets an error: HTTP 500 or an error event in the stream)."""
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

    for r in requests:
        eco = outputs.get(r.client_index)
        if eco is None:
            eco = outputs[r.client_index] = EngineCoreOutputs()
        eco.outputs.append(EngineCoreOutput(r.request_id, [], finish_reason=FinishReason.ERROR))
        eco.finished_requests = set(eco.finished_requests or ()) | {r.request_id}


def _prompt_text_fn(tokenizer_name):
    """Fallback query text when the front end did not resolve the request: the decoded prompt."""
    state = {}

    def text_of(request):
        tok = state.get("tok")
        if tok is None:
            from transformers import AutoTokenizer
            tok = state["tok"] = AutoTokenizer.from_pretrained(tokenizer_name)
        ids = getattr(request, "prompt_token_ids", None) or []
        return tok.decode(ids, skip_special_tokens=True)

    return text_of


_SCHED_PATCHED = False


def install_scheduler_selection():
    global _SCHED_PATCHED
    if _SCHED_PATCHED:
        return
    from vllm.config.scheduler import SchedulerConfig

    orig = SchedulerConfig.get_scheduler_cls

    def get_scheduler_cls(self):
        return make_scheduler_cls(orig(self))

    get_scheduler_cls._wrag_orig = orig
    SchedulerConfig.get_scheduler_cls = get_scheduler_cls
    _SCHED_PATCHED = True


# ====================================================================== 3. runner step hooks
_RUNNER_PATCHED = False


def install_runner_hooks():
    """Called when the first WRAG layer is built (so only in worker processes)."""
    global _RUNNER_PATCHED
    if _RUNNER_PATCHED:
        return
    _RUNNER_PATCHED = True
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner

    orig_prepare = V1Runner._prepare_inputs

    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        out = orig_prepare(self, scheduler_output, *args, **kwargs)
        pool = _POOL
        if pool is not None:
            pool.forget(scheduler_output.finished_req_ids)
            n = self.input_batch.num_reqs
            refs = []
            for rid in self.input_batch.req_ids[:n]:
                st = self.requests.get(rid)
                sp = getattr(st, "sampling_params", None)
                refs.append(pool.refs_for(rid, sp.extra_args if sp is not None else None))
            pool.step(refs, self.query_start_loc.cpu[: n + 1])
        return out

    V1Runner._prepare_inputs = _prepare_inputs

    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    except Exception as e:  # the V2 runner needs CUDA-only imports on some builds
        log.debug("WRAG: V2 model runner not importable here (%s); only the V1 hook is installed", e)
        return
    orig_add, orig_finish, orig_prep2 = V2Runner.add_requests, V2Runner.finish_requests, V2Runner.prepare_inputs

    def add_requests(self, scheduler_output):
        pool = _POOL
        if pool is not None:
            for nr in scheduler_output.scheduled_new_reqs:
                pool.forget([nr.req_id])
                sp = nr.sampling_params
                pool.refs_for(nr.req_id, sp.extra_args if sp is not None else None)
        return orig_add(self, scheduler_output)

    def finish_requests(self, scheduler_output):
        if _POOL is not None:
            _POOL.forget(scheduler_output.finished_req_ids)
        return orig_finish(self, scheduler_output)

    def prepare_inputs(self, scheduler_output, *args, **kwargs):
        ib = orig_prep2(self, scheduler_output, *args, **kwargs)
        pool = _POOL
        if pool is not None:
            refs = [pool.refs_for(rid, None) for rid in ib.req_ids]
            qsl = torch.from_numpy(ib.query_start_loc_np[: len(ib.req_ids) + 1])
            pool.step(refs, qsl)
        return ib

    V2Runner.add_requests, V2Runner.finish_requests, V2Runner.prepare_inputs = (
        add_requests, finish_requests, prepare_inputs)


# ====================================================================== run directory
def _ensure_run_dir() -> str:
    """Directory shared by the processes of one server (payload files, engine stats). Created by
    the first process that loads the plugin (the API server), inherited by its children."""
    d = os.environ.get("WRAG_RUN_DIR")
    if d and os.path.isdir(d):
        return d
    import atexit
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="wrag-run-")
    os.environ["WRAG_RUN_DIR"] = d
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(d, ignore_errors=True))
    return d


def install() -> None:
    """Everything the general plugin does, in every vLLM process."""
    from .seal import ensure_key

    _ensure_run_dir()
    ensure_key()
    register_layers()
    install_scheduler_selection()
