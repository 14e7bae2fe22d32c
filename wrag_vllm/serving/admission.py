"""Admission of requests into vLLM's scheduler (engine-core process; no vLLM imports here).

A request enters vLLM's own scheduler only once
  1. its shard set is prepared (retrieval if needed, composition, payload files) — done in a thread
     pool, so the engine loop keeps stepping the other requests meanwhile, except when every
     payload of a sealed plan is already written (Preparer.prepare_cached: a catalog read per
     shard), which is done on arrival so the request is admitted in the same step; and
  2. the distinct slot payloads of all requests inside vLLM's scheduler, plus its own, fit the
     device pool:   |⋃_r keys(r)| ≤ S.
Requests that do not fit wait here (FIFO; a waiting request needing new keys also holds back
later ones that need new keys, so it cannot starve, while requests needing no new key pass).
Hence no step ever uses more distinct payloads than the pool holds, and a payload in use is never
evicted by the workers.

Isolation. vLLM's prefix cache keys KV blocks by tokens (+ LoRA, + `cache_salt`), but shards change
every layer's FFN output and so the KV of every token. A request that gets slots therefore enters
vLLM's scheduler with

    cache_salt = "wrag:" + sha256(client cache_salt, [(payload key, weight) of its slots])

(payload keys are content keys: same key ⇔ same factors), so cached blocks are shared exactly
between requests that apply the same deltas; requests without shards keep the client's salt and
share blocks with plain base-model requests. A request is refused — finished with an error, never
served half-applied or with the base model in its place — when its extra_args carry server keys
it did not get from this server's front end (`wrag_slots`, an unsealed `wrag_plan`), its
controls are invalid, or its set cannot be prepared.

`hooks/scheduler.py` wires this into a subclass of vLLM's scheduler.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from .config import WragConfig
from .controls import parse_controls
from .plan import PLAN_KEY, SLOTS_KEY, Plan, SlotRef, slots_to_json
from .preparer import Preparer
from .resolver import Resolver

log = logging.getLogger("vllm.wrag")


@dataclass
class _Pending:
    req_id: str
    request: object                      # vLLM Request (opaque here)
    future: Future | None = None
    slots: list[SlotRef] | None = None
    keys: frozenset = field(default_factory=frozenset)
    t0: float = field(default_factory=time.perf_counter)


def cache_salt(client_salt: str | None, slots: list[SlotRef]) -> str:
    """The prefix-cache salt of a request applying `slots` (see the module docstring)."""
    h = hashlib.sha256(json.dumps([client_salt, [[s.key, s.weight] for s in slots]]).encode())
    return "wrag:" + h.hexdigest()[:32]


class Refused(Exception):
    """A request the engine will not serve; it is finished with an error."""


class Admission:
    def __init__(self, cfg: WragConfig, run_dir: str, text_of=None, stats=None, resalt=None):
        self.cfg = cfg
        self.resalt = resalt               # (request, salt) -> None: re-key its prefix-cache blocks
        self.failed: list[object] = []     # refused requests, finished with an error next step
        self.resolver = Resolver(cfg)
        self.preparer = Preparer(cfg, run_dir, self.resolver, stats=stats)
        self.stats = stats
        self.text_of = text_of             # request -> query text (fallback retrieval only)
        self.pool = ThreadPoolExecutor(max_workers=cfg.prepare_threads, thread_name_prefix="wrag-prep")
        self.pending: dict[str, _Pending] = {}   # insertion order = arrival order
        self.inside: dict[str, frozenset] = {}   # req_id -> keys, for requests inside vLLM's scheduler

    # ------------------------------------------------------------------ arrival
    def arrive(self, req_id: str, request, extra_args: dict | None) -> bool:
        """Take a new request. True: it needs no shards and may enter vLLM's scheduler now;
        False: it is held here (being prepared, or refused)."""
        try:
            sealed = self._check_arrival(extra_args or {})
        except Refused as e:
            self.refuse(request, str(e))
            return False
        if sealed is not None and sealed.empty:
            self.inside[req_id] = frozenset()
            return True
        p = _Pending(req_id, request)
        slots = self.preparer.prepare_cached(sealed) if sealed is not None else None
        if slots is not None:          # warm set: ready now, admitted by the next poll (this step)
            self._ready(p, sealed, slots)
        else:
            p.future = self.pool.submit(self._prepare, request, extra_args or {}, sealed)
        self.pending[req_id] = p
        return False

    def _ready(self, p: _Pending, plan: Plan, slots: list[SlotRef]) -> None:
        p.slots = slots
        p.keys = frozenset(s.key for s in slots)
        self._attach(p.request, plan, slots)
        if self.stats is not None:
            self.stats.prepared(time.perf_counter() - p.t0, len(slots))

    def _check_arrival(self, extra_args: dict) -> Plan | None:
        """The sealed plan of the front end, or None (the engine resolves the request itself)."""
        if SLOTS_KEY in extra_args:
            raise Refused(f"{SLOTS_KEY} is written by the engine only")
        if PLAN_KEY not in extra_args:
            return None
        if isinstance(extra_args[PLAN_KEY], list):
            raise Refused(f"{PLAN_KEY}: a per-prompt plan list reached the engine (the API server's "
                          f"prompt hook, hooks/prompts.py, found no prompt index in the request id)")
        try:
            return Plan.from_sealed(extra_args[PLAN_KEY])
        except (ValueError, TypeError) as e:
            raise Refused(f"{PLAN_KEY}: {e}") from None

    def refuse(self, request, why: str) -> None:
        log.error("WRAG: request %s refused: %s", getattr(request, "request_id", "?"), why)
        self.failed.append(request)

    def take_failed(self) -> list[object]:
        out, self.failed = self.failed, []
        return out

    def _plan_for(self, request, extra_args: dict, sealed: Plan | None) -> Plan:
        if sealed is not None:
            return sealed
        # No front end on this route (offline LLM API, or a route WRAG does not watch): resolve
        # here; invalid controls refuse the request.
        controls = parse_controls(extra_args, self.cfg)
        text = self.text_of(request) if (self.text_of and not controls.explicit and not controls.off) else None
        return self.resolver.resolve(text, controls)

    def _prepare(self, request, extra_args: dict, sealed: Plan | None) -> tuple[Plan, list[SlotRef]]:
        plan = self._plan_for(request, extra_args, sealed)
        return plan, self.preparer.prepare(plan)

    # ------------------------------------------------------------------ admission
    def poll(self, idle: bool) -> list[object]:
        """Requests ready to enter vLLM's scheduler, in arrival order. `idle`: vLLM has nothing to
        run, so waiting briefly for a preparation costs nobody anything."""
        if idle and self.pending and not any(p.slots is not None or p.future.done() for p in self.pending.values()):
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
                except Exception as e:  # bad controls, shard removed meanwhile, composition failed, ...
                    del self.pending[req_id]
                    self.refuse(p.request, f"preparing its shard set failed: {e}")
                    continue
                self._ready(p, plan, slots)
            new = p.keys - in_use
            if new and (blocked or len(in_use) + len(new) > self.cfg.slots):
                blocked = True
                continue
            in_use |= new
            del self.pending[req_id]
            self.inside[req_id] = p.keys
            out.append(p.request)
        return out

    def _attach(self, request, plan: Plan, slots: list[SlotRef]) -> None:
        ea = request.sampling_params.extra_args
        if ea is None:
            ea = request.sampling_params.extra_args = {}
        ea[PLAN_KEY] = plan.to_json()
        ea[SLOTS_KEY] = slots_to_json(slots)
        if slots and self.resalt is not None:
            self.resalt(request, cache_salt(getattr(request, "cache_salt", None), slots))
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
        ids = set(req_ids)
        self.failed = [r for r in self.failed if getattr(r, "request_id", None) not in ids]
        return gone

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
