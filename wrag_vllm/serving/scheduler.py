"""Admission of requests into vLLM's scheduler (engine-core process; no vLLM imports here).

A request enters vLLM's own scheduler only once
  1. its shard set is prepared (retrieval if needed, composition, payload files) — done in a thread
     pool, so the engine loop keeps stepping the other requests meanwhile; and
  2. the distinct slot payloads of all requests inside vLLM's scheduler, plus its own, fit the
     device pool:   |⋃_r keys(r)| ≤ S.
Requests that do not fit wait here (FIFO; a waiting request needing new keys also holds back
later ones that need new keys, so it cannot starve, while requests needing no new key pass).
Hence no step ever uses more distinct payloads than the pool holds, and a payload in use is never
evicted by the workers.

`vllm_hooks.make_scheduler_cls` wires this into a subclass of vLLM's scheduler.
"""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from .config import WragConfig
from .preparer import Preparer, SlotRef, slots_to_json
from .resolver import Plan, Resolver
from .xargs import PLAN_KEY, SLOTS_KEY, RequestError, parse_controls

log = logging.getLogger("vllm.wrag")


@dataclass
class _Pending:
    req_id: str
    request: object                      # vLLM Request (opaque here)
    future: Future | None = None
    slots: list[SlotRef] | None = None
    keys: frozenset = field(default_factory=frozenset)
    t0: float = field(default_factory=time.perf_counter)


class Admission:
    def __init__(self, cfg: WragConfig, run_dir: str, text_of=None, stats=None):
        self.cfg = cfg
        self.resolver = Resolver(cfg)
        self.preparer = Preparer(cfg, run_dir, self.resolver, stats=stats)
        self.stats = stats
        self.text_of = text_of             # request -> query text (fallback retrieval only)
        self.pool = ThreadPoolExecutor(max_workers=cfg.prepare_threads, thread_name_prefix="wrag-prep")
        self.pending: dict[str, _Pending] = {}   # insertion order = arrival order
        self.inside: dict[str, frozenset] = {}   # req_id -> keys, for requests inside vLLM's scheduler

    # ------------------------------------------------------------------ arrival
    def needs_preparation(self, extra_args: dict | None) -> bool:
        if not extra_args:
            return True  # no plan from the front end: fallback retrieval (unless there is no store)
        raw = extra_args.get(PLAN_KEY)
        if raw is None:
            return True
        try:
            return not Plan.from_json(raw).empty
        except Exception:
            return False

    def submit(self, req_id: str, request, extra_args: dict) -> None:
        p = _Pending(req_id, request)
        p.future = self.pool.submit(self._prepare, request, extra_args)
        self.pending[req_id] = p

    def _plan_for(self, request, extra_args: dict) -> Plan:
        raw = (extra_args or {}).get(PLAN_KEY)
        if raw is not None:
            return Plan.from_json(raw)
        # Fallback (endpoint plugin not enabled, or offline LLM API): retrieve here.
        try:
            controls = parse_controls(extra_args, self.cfg)
        except RequestError as e:
            log.error("WRAG: request %s: %s; serving it with the base model (enable the endpoint "
                      "plugin with VLLM_PLUGINS=wrag to get HTTP 400 instead)", getattr(request, "request_id", "?"), e)
            return Plan(source="off")
        text = self.text_of(request) if (self.text_of and not controls.explicit and not controls.off) else None
        return self.resolver.resolve(text, controls)

    def _prepare(self, request, extra_args: dict) -> tuple[Plan, list[SlotRef]]:
        plan = self._plan_for(request, extra_args)
        return plan, self.preparer.prepare(plan)

    # ------------------------------------------------------------------ admission
    def poll(self, idle: bool) -> list[object]:
        """Requests ready to enter vLLM's scheduler, in arrival order. `idle`: vLLM has nothing to
        run, so waiting briefly for a preparation costs nobody anything."""
        if idle and self.pending and not any(p.future.done() for p in self.pending.values()):
            wait([p.future for p in self.pending.values()], timeout=0.01, return_when=FIRST_COMPLETED)
        out = []
        in_use = set().union(*self.inside.values()) if self.inside else set()
        blocked = False
        for req_id, p in list(self.pending.items()):
            if p.slots is None:
                if not p.future.done():
                    continue
                try:
                    plan, slots = p.future.result()
                except Exception as e:  # shard removed meanwhile, composition failed, ...
                    log.error("WRAG: request %s: preparing its shard set failed (%s); serving it with "
                              "the base model", req_id, e)
                    plan, slots = Plan(source="failed"), []
                p.slots = slots
                p.keys = frozenset(s.key for s in slots)
                self._attach(p.request, plan, slots)
                if self.stats is not None:
                    self.stats.prepared(time.perf_counter() - p.t0, len(slots))
            new = p.keys - in_use
            if new and (blocked or len(in_use) + len(new) > self.cfg.slots):
                blocked = True
                continue
            in_use |= new
            del self.pending[req_id]
            self.inside[req_id] = p.keys
            out.append(p.request)
        return out

    def admit_now(self, req_id: str, request, extra_args: dict) -> None:
        """A request without shards: straight in."""
        self.inside[req_id] = frozenset()

    def _attach(self, request, plan: Plan, slots: list[SlotRef]) -> None:
        ea = request.sampling_params.extra_args
        if ea is None:
            ea = request.sampling_params.extra_args = {}
        ea[PLAN_KEY] = plan.to_json()
        ea[SLOTS_KEY] = slots_to_json(slots)
        log.info("WRAG: request %s -> %s (%s)", getattr(request, "request_id", "?"), plan.header(), plan.source)

    # ------------------------------------------------------------------ leaving
    def finished(self, req_id: str) -> None:
        self.inside.pop(req_id, None)

    def abort_pending(self, req_ids) -> list[str]:
        gone = [r for r in req_ids if r in self.pending]
        for r in gone:
            p = self.pending.pop(r)
            if p.future is not None:
                p.future.cancel()
        return gone

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
