"""Hook 2: a plain `vllm serve` gets a scheduler with WRAG admission.

SchedulerConfig.get_scheduler_cls is wrapped so that vLLM's own choice (Scheduler or
AsyncScheduler) comes back as a subclass with admission.Admission in front of it — the effect of
--scheduler-cls, without making the user pass it and without losing async scheduling. The
subclass holds a request back until its shard set is prepared and fits the pool, re-keys its
prefix-cache blocks (`resalt`), and finishes refused requests with an error (`_emit_errors`).
"""
from __future__ import annotations

from vllm.config.scheduler import SchedulerConfig
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

from ..admission import Admission
from ..config import WragConfig
from ..metrics import EngineStats
from ..rundir import ensure_run_dir

_SUBCLASSES: dict = {}


def make_scheduler_cls(base):
    """A subclass of `base` (vLLM's Scheduler or AsyncScheduler) with WRAG admission."""
    if getattr(base, "_wrag", False):
        return base
    if base not in _SUBCLASSES:
        _SUBCLASSES[base] = _subclass(base)
    return _SUBCLASSES[base]


def _subclass(base):
    class WragScheduler(base):
        _wrag = True

        def __init__(self, vllm_config, *args, **kwargs):
            super().__init__(vllm_config, *args, **kwargs)
            cfg = WragConfig.from_vllm_config(vllm_config)
            self.wrag = None
            if cfg.enabled:
                run_dir = ensure_run_dir()
                self.wrag = Admission(cfg, run_dir, text_of=_prompt_text_fn(vllm_config.model_config.tokenizer),
                                      stats=EngineStats(run_dir, "engine"), resalt=resalt)

        def add_request(self, request) -> None:
            w = self.wrag
            if w is None or request.request_id in self.requests or request.sampling_params is None:
                return super().add_request(request)
            if w.arrive(request.request_id, request, request.sampling_params.extra_args):
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
    for r in requests:
        eco = outputs.get(r.client_index)
        if eco is None:
            eco = outputs[r.client_index] = EngineCoreOutputs()
        eco.outputs.append(EngineCoreOutput(r.request_id, [], finish_reason=FinishReason.ERROR))
        eco.finished_requests = set(eco.finished_requests or ()) | {r.request_id}


def _prompt_text_fn(tokenizer_name):
    """Query text when the front end did not resolve the request (offline API): the decoded prompt."""
    state = {}

    def text_of(request):
        tok = state.get("tok")
        if tok is None:
            from transformers import AutoTokenizer
            tok = state["tok"] = AutoTokenizer.from_pretrained(tokenizer_name)
        return tok.decode(getattr(request, "prompt_token_ids", None) or [], skip_special_tokens=True)

    return text_of


def install_scheduler_selection() -> None:
    """Idempotent: wrap SchedulerConfig.get_scheduler_cls."""
    if getattr(SchedulerConfig.get_scheduler_cls, "_wrag_orig", None) is not None:
        return
    orig = SchedulerConfig.get_scheduler_cls

    def get_scheduler_cls(self):
        return make_scheduler_cls(orig(self))

    get_scheduler_cls._wrag_orig = orig
    SchedulerConfig.get_scheduler_cls = get_scheduler_cls
