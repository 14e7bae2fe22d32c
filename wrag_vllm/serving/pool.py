"""Worker side: the device shard pool and the per-step metadata (no vLLM imports here).

Every WRAG FFN layer owns fixed buffers (allocated once, so memory is constant and torch.compile
graphs stay valid; contents change in place):

    gate_up_proj:  a_pool (2, S, R, d_model)      b_pool (2, S, d_ff/tp, R)    slices: gate, up
    down_proj:     a_pool (1, S, R, d_ff/tp)      b_pool (1, S, d_model, R)
    slot_ranks     (S,) int32  (rank of the payload in each slot; 0 = empty)
b_pool is stored with d_out contiguous (a transposed view of (n, S, R, d_out)): the native CPU op
streams each rank row of B along d_out.

Tensor parallelism: gate_up is column-parallel (output split) → B is sliced by output rows and A is
whole; down is row-parallel (input split) → A is sliced by input columns and B is whole, and the
partial deltas B·(A_r·x_r) are summed by the layer's own all-reduce, which runs after the delta.

The scale s and nothing else is folded into B when a payload is loaded: slot content = (A, s·B).
One DeltaMeta (token → slots, weights) is shared by all layers and refilled once per step.

Memory hierarchy: device slots (LRU)  ←  host cache of loaded payloads (LRU, bytes)  ←  payload
files written by the engine core (from the store on disk).
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

import torch
from wrag_kernels import DeltaMeta

from ..lru import ByteLRU
from ..shard import load_shard
from .config import WragConfig
from .metrics import EngineStats
from .plan import SLOTS_KEY, SlotRef, slots_from_json
from .rundir import ENV as RUN_DIR_ENV

log = logging.getLogger("vllm.wrag")
_WORKER_POOL: "ShardPool | None" = None   # one per worker process


def worker_pool() -> "ShardPool | None":
    return _WORKER_POOL


def open_worker_pool(cfg: WragConfig, max_tokens: int, max_seqs: int) -> "ShardPool":
    """This worker's pool, made by the first WRAG layer built (the others join it)."""
    global _WORKER_POOL
    if _WORKER_POOL is None:
        _WORKER_POOL = ShardPool(slots=cfg.slots, max_rank=cfg.max_rank, k_max=cfg.k_max,
                                 max_tokens=int(max_tokens), max_seqs=int(max_seqs),
                                 host_cache_bytes=cfg.host_cache_mb << 20, run_dir=os.environ.get(RUN_DIR_ENV),
                                 device=torch.get_default_device(), backend=cfg.kernel_backend)
        log.info("WRAG: shard pool with %d slots of rank %d per FFN layer (kernels: %s%s)", cfg.slots, cfg.max_rank,
                 _WORKER_POOL.meta.backend, ", graph-safe" if _WORKER_POOL.meta.graph_safe else "")
    return _WORKER_POOL


class ShardPool:
    """One per worker process. Layers register at construction; the runner hook calls `step`."""

    def __init__(self, slots: int, max_rank: int, k_max: int, max_tokens: int, max_seqs: int,
                 host_cache_bytes: int, run_dir: str | None, device, backend: str = "auto"):
        self.S, self.R, self.k_max = slots, max_rank, k_max
        self.run_dir = run_dir
        self.device = device
        self.meta = DeltaMeta(max_tokens, max_seqs, k_max, device, backend=backend)
        self.layers: list = []                 # WRAG linear modules, in construction order
        self.slot_of: OrderedDict[str, int] = OrderedDict()   # payload key -> slot (LRU order)
        self.free = list(range(slots))
        self.host = ByteLRU(host_cache_bytes)  # payload key -> loaded Shard
        self.evictions = 0
        self.loads = 0
        self.failures = 0                      # payloads that could not be loaded (see step)
        self._plans: dict[str, list[SlotRef]] = {}   # req_id -> slots (parsed once)
        self.seq_slots = torch.full((max_seqs, k_max), -1, dtype=torch.int32)
        self.seq_weights = torch.zeros((max_seqs, k_max), dtype=torch.float32)
        self.lock = threading.Lock()
        self.stats = EngineStats(run_dir, "worker") if run_dir else None

    def register(self, layer) -> None:
        self.layers.append(layer)

    # ------------------------------------------------------------------ payloads
    def _payload(self, ref: SlotRef):
        shard = self.host.get(ref.key)
        if shard is None:
            shard = load_shard(ref.path)
            self.host.put(ref.key, shard, shard.nbytes())
        return shard

    def _load_into(self, slot: int, shard) -> None:
        for layer in self.layers:
            layer.wrag_load_slot(slot, shard.factors, self.R)
        self.loads += 1

    def _ensure(self, refs: list[SlotRef], pinned: set[str]) -> None:
        """Every payload of `refs` in a slot; ValueError/OSError (then no slot changed owner) if
        one cannot be loaded, RuntimeError if the step needs more payloads than slots."""
        for ref in refs:
            if ref.key in self.slot_of:
                self.slot_of.move_to_end(ref.key)
                continue
            shard = self._payload(ref)  # before taking a slot: a bad file leaves the pool as it was
            if self.free:
                slot = self.free.pop()
            else:
                victim = next((k for k in self.slot_of if k not in pinned), None)
                if victim is None:
                    raise RuntimeError(f"WRAG pool: more than {self.S} distinct shard payloads in one "
                                       f"step (the scheduler should have prevented this)")
                slot = self.slot_of.pop(victim)
                self.evictions += 1
            try:
                self._load_into(slot, shard)
            except Exception:
                self.free.append(slot)  # half-written: nobody may use it
                raise
            self.slot_of[ref.key] = slot

    # ------------------------------------------------------------------ per step
    def refs_for(self, req_id: str, extra_args: dict | None) -> list[SlotRef]:
        """The slots the engine core assigned to a request (parsed once). The engine admits only
        payloads it wrote and checked; anything else here is a bug, and it costs that request its
        shards (logged), never the worker."""
        refs = self._plans.get(req_id)
        if refs is None:
            raw = (extra_args or {}).get(SLOTS_KEY)
            try:
                refs = slots_from_json(raw, self.run_dir) if raw else []
                if len(refs) > self.k_max:
                    raise ValueError(f"{len(refs)} slots > k_max {self.k_max}")
            except (ValueError, TypeError) as e:
                log.error("WRAG: request %s: unusable slot list (%s); it gets no shards", req_id, e)
                refs = []
            self._plans[req_id] = refs
        return refs

    def forget(self, req_ids) -> None:
        for r in req_ids:
            self._plans.pop(r, None)

    def step(self, req_refs: list[list[SlotRef]], query_start_loc: torch.Tensor) -> None:
        """req_refs[i]: slot payloads of the i-th sequence of the flat batch;
        query_start_loc: (num_seqs+1,) token offsets of the sequences."""
        n = len(req_refs)
        with self.lock:
            pinned = {r.key for refs in req_refs for r in refs}
            self.seq_slots[:n].fill_(-1)
            self.seq_weights[:n].zero_()
            if pinned:
                for i, refs in enumerate(req_refs):
                    try:
                        self._ensure(refs, pinned)
                    except Exception as e:  # noqa: BLE001 - one request's payload, never the worker
                        log.error("WRAG: a payload of sequence %d cannot be loaded (%s); it gets no "
                                  "shards this step", i, e)
                        self.failures += 1
                        continue
                    for j, r in enumerate(refs):
                        self.seq_slots[i, j] = self.slot_of[r.key]
                        self.seq_weights[i, j] = r.weight
            if self.stats is not None and self.stats.c["pool_loads"] != self.loads:
                self.stats.c.update(pool_evictions=self.evictions, pool_loads=self.loads)
                self.stats.flush(force=True)
            self.meta.fill(query_start_loc[: n + 1].to(self.device), self.seq_slots[:n].to(self.device),
                           self.seq_weights[:n].to(self.device))
