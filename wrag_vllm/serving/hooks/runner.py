"""Hook 3: after the model runner has laid out a step's flat batch, fill the pool's metadata.

    V1 runner (CPU and GPU V1):       GPUModelRunner._prepare_inputs
    V2 runner (v1/worker/gpu/, GPU):  GPUModelRunner.add_requests / finish_requests / prepare_inputs

Each sequence of the batch gets the slot references its request carries (plan.SLOTS_KEY in its
extra_args, written by the engine core); pool.ShardPool.step loads them into device slots and
fills the one DeltaMeta every WRAG layer reads. Installed by the first WRAG layer, so only in
worker processes.
"""
from __future__ import annotations

import logging

import torch

from ..pool import worker_pool

log = logging.getLogger("vllm.wrag")
_INSTALLED = False


def install_runner_hooks() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    _hook_v1_runner()
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    except Exception as e:  # the V2 runner needs CUDA-only imports on some builds
        log.debug("WRAG: V2 model runner not importable here (%s); only the V1 hook is installed", e)
        return
    _hook_v2_runner(V2Runner)


def _hook_v1_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner

    orig_prepare = V1Runner._prepare_inputs

    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        out = orig_prepare(self, scheduler_output, *args, **kwargs)
        pool = worker_pool()
        if pool is not None:
            pool.forget(scheduler_output.finished_req_ids)
            n = self.input_batch.num_reqs
            refs = []
            for rid in self.input_batch.req_ids[:n]:
                sp = getattr(self.requests.get(rid), "sampling_params", None)
                refs.append(pool.refs_for(rid, sp.extra_args if sp is not None else None))
            pool.step(refs, self.query_start_loc.cpu[: n + 1])
        return out

    V1Runner._prepare_inputs = _prepare_inputs


def _hook_v2_runner(V2Runner) -> None:
    orig_add, orig_finish, orig_prepare = V2Runner.add_requests, V2Runner.finish_requests, V2Runner.prepare_inputs

    def add_requests(self, scheduler_output):
        pool = worker_pool()
        if pool is not None:
            for nr in scheduler_output.scheduled_new_reqs:
                pool.forget([nr.req_id])
                sp = nr.sampling_params
                pool.refs_for(nr.req_id, sp.extra_args if sp is not None else None)
        return orig_add(self, scheduler_output)

    def finish_requests(self, scheduler_output):
        pool = worker_pool()
        if pool is not None:
            pool.forget(scheduler_output.finished_req_ids)
        return orig_finish(self, scheduler_output)

    def prepare_inputs(self, scheduler_output, *args, **kwargs):
        ib = orig_prepare(self, scheduler_output, *args, **kwargs)
        pool = worker_pool()
        if pool is not None:
            refs = [pool.refs_for(rid, None) for rid in ib.req_ids]
            pool.step(refs, torch.from_numpy(ib.query_start_loc_np[: len(ib.req_ids) + 1]))
        return ib

    V2Runner.add_requests, V2Runner.finish_requests, V2Runner.prepare_inputs = (
        add_requests, finish_requests, prepare_inputs)
