"""Per-step batch metadata for the multi-shard delta op, in fixed-size buffers.

Semantics (see `wrag_kernels/__init__.py`): for token t of a flat batch,
    y_t[slice] += Σ_{j<K} w_{t,j} · B[slice, s(t,j)] · (A[slice, s(t,j)] · x_t),   s = −1 → nothing.
Slots and weights are given per *sequence* (a request's tokens form one contiguous segment of the
batch); `fill` expands them into the layouts the backends read, once per step for all layers:

* segment layout (Triton SGMV, prefill):  seq_start (max_seqs+1,), seq_slots / seq_weights (max_seqs, K)
* per-token layout (Triton BGMV, decode):  token_slots / token_weights (max_tokens, K)
* the CPU backends' work plan (`cpu.CpuPlan`), built only when the backend is "native" or "torch"
* host_info (HOST_INFO_LEN,) int64 on the CPU: [active, num_tokens, num_seqs, max_seq_len,
  max_slot], read by the op on the host without a device sync.

The backend (and whether the op runs graph-safe) is chosen once, here — "auto": Triton for CUDA
devices; on the CPU the native op (kernels/csrc/delta_cpu.cpp, built for the host on first use)
or, where it cannot be built, the torch path — and `meta_args()` yields every tensor the op
takes, in the op schema's order (MetaArgs).

Every buffer is allocated once in __init__ and overwritten in place by `fill`, so the tensors
captured by torch.compile / CUDA graphs stay valid across steps (only their contents change).
Padding tokens (t ≥ num_tokens) and padding sequences get slot −1 / weight 0 / empty segments.
`fill` also normalises each request's slot list: zero-weight slots are dropped and a slot listed
twice is merged into one entry with the summed weight (same math, fewer factor reads).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from . import native
from .cpu import DENSE_MIN_TOKENS, NATIVE_DENSE_MIN_TOKENS, CpuPlan

BACKENDS = ("native", "torch", "triton")
# Entries of DeltaMeta.host_info.
INFO_ACTIVE, INFO_TOKENS, INFO_SEQS, INFO_MAX_SEQ_LEN, INFO_MAX_SLOT, HOST_INFO_LEN = range(6)


class MetaArgs(NamedTuple):
    """The metadata tensors of torch.ops.wrag.apply_delta, in schema order (K = k_max)."""
    token_slots: torch.Tensor     # (max_tokens, K) int32, device
    token_weights: torch.Tensor   # (max_tokens, K) float32, device
    seq_start: torch.Tensor       # (max_seqs+1,) int32, device
    seq_slots: torch.Tensor       # (max_seqs, K) int32, device
    seq_weights: torch.Tensor     # (max_seqs, K) float32, device
    host_info: torch.Tensor       # (HOST_INFO_LEN,) int64, CPU
    pair_tok: torch.Tensor        # (max_pairs,) int64, device   } CpuPlan (see cpu.py)
    pair_w: torch.Tensor          # (max_pairs,) float32, device }
    plan: torch.Tensor            # (max_groups, 5) int64, CPU   }
    cplan: torch.Tensor           # (max_seqs, 3) int64, CPU     }
    cslots: torch.Tensor          # (max_seqs, K) int64, CPU     }
    cweights: torch.Tensor        # (max_seqs, K) float64, CPU   }
    ctok: torch.Tensor            # (max_tokens,) int64, device  }
    cpu_info: torch.Tensor        # (CPU_INFO_LEN + 4·max_buckets,) int64, CPU }


def _as_cpu(t, dtype) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.detach().to(device="cpu", dtype=dtype)
    return torch.as_tensor(t, dtype=dtype)


class DeltaMeta:
    """Fixed-size metadata buffers for `apply_delta`, updated in place once per step."""

    def __init__(self, max_tokens: int, max_seqs: int, k_max: int, device, backend: str = "auto",
                 graph_safe: bool | None = None):
        if max_tokens < 1 or max_seqs < 1 or k_max < 1:
            raise ValueError("max_tokens, max_seqs and k_max must be >= 1")
        self.max_tokens, self.max_seqs, self.k_max = int(max_tokens), int(max_seqs), int(k_max)
        self.device = torch.device(device)
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "native" if native.load() else "torch"
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        # Graph-safe (default on CUDA): the op makes no host decision from a step's contents, so a
        # CUDA graph captured with empty metadata replays correctly with any metadata (see ops.py).
        self.graph_safe = self.device.type == "cuda" if graph_safe is None else bool(graph_safe)
        if self.graph_safe and backend != "triton":
            raise ValueError("graph_safe is a mode of the Triton backend")
        dev, T, N, K = self.device, self.max_tokens, self.max_seqs, self.k_max
        self.token_slots = torch.full((T, K), -1, dtype=torch.int32, device=dev)      # (max_tokens, K)
        self.token_weights = torch.zeros((T, K), dtype=torch.float32, device=dev)     # (max_tokens, K)
        self.seq_start = torch.zeros((N + 1,), dtype=torch.int32, device=dev)         # (max_seqs+1,)
        self.seq_slots = torch.full((N, K), -1, dtype=torch.int32, device=dev)        # (max_seqs, K)
        self.seq_weights = torch.zeros((N, K), dtype=torch.float32, device=dev)       # (max_seqs, K)
        self.host_info = torch.zeros((HOST_INFO_LEN,), dtype=torch.int64)             # (HOST_INFO_LEN,), CPU
        # allocated for every backend: the op schema is one
        self.cpu = CpuPlan(T, N, K, dev, NATIVE_DENSE_MIN_TOKENS if backend == "native" else DENSE_MIN_TOKENS)
        if backend == "native" and native.load() is None:
            raise RuntimeError("backend 'native': the native CPU op could not be built (see the warning)")

    def meta_args(self) -> MetaArgs:
        return MetaArgs(self.token_slots, self.token_weights, self.seq_start, self.seq_slots, self.seq_weights,
                        self.host_info, *self.cpu.tensors())

    # ---- views of host_info (host ints; do not read these inside compiled code) ----
    @property
    def active(self) -> bool:
        return bool(self.host_info[INFO_ACTIVE])

    @property
    def num_tokens(self) -> int:
        return int(self.host_info[INFO_TOKENS])

    @property
    def num_seqs(self) -> int:
        return int(self.host_info[INFO_SEQS])

    @property
    def max_seq_len(self) -> int:
        return int(self.host_info[INFO_MAX_SEQ_LEN])

    def fill(self, query_start_loc, seq_slots, seq_weights) -> None:
        """Load one step's batch description into the buffers (in place).

        query_start_loc: (num_seqs+1,) int — token range [qsl[i], qsl[i+1]) of sequence i, qsl[0] = 0
        seq_slots: (num_seqs, k) int, k ≤ k_max, −1 = empty entry
        seq_weights: (num_seqs, k) float — weight of each entry
        """
        qsl = _as_cpu(query_start_loc, torch.int64).reshape(-1)             # (num_seqs+1,)
        slots = _as_cpu(seq_slots, torch.int64)                             # (num_seqs, k)
        weights = _as_cpu(seq_weights, torch.float32)                       # (num_seqs, k)
        ns = qsl.numel() - 1
        if slots.dim() == 1:
            slots, weights = slots.reshape(ns, -1), weights.reshape(ns, -1)
        k = slots.shape[1] if slots.dim() == 2 else 0
        if ns < 0 or slots.shape != (ns, k) or weights.shape != (ns, k):
            raise ValueError(f"seq_slots {tuple(slots.shape)} / seq_weights {tuple(weights.shape)} "
                             f"do not match {ns} sequences")
        if ns > self.max_seqs or k > self.k_max:
            raise ValueError(f"{ns} sequences x {k} slots exceed DeltaMeta({self.max_seqs}, k_max={self.k_max})")
        lens = qsl[1:] - qsl[:-1]                                           # (num_seqs,)
        T = int(qsl[-1]) if ns > 0 else 0
        if ns > 0 and (int(qsl[0]) != 0 or bool((lens < 0).any())):
            raise ValueError("query_start_loc must start at 0 and be non-decreasing")
        if T > self.max_tokens:
            raise ValueError(f"{T} tokens exceed DeltaMeta(max_tokens={self.max_tokens})")
        if bool((slots < -1).any()):
            raise ValueError("slot ids must be >= 0, or -1 for an empty entry")
        if not bool(torch.isfinite(weights).all()):
            raise ValueError("shard weights must be finite")

        slots = torch.where(weights == 0, torch.full_like(slots, -1), slots)
        weights = torch.where(slots < 0, torch.zeros_like(weights), weights)
        slots, weights = self._merge_duplicates(slots, weights)

        K = self.k_max
        h_seq_slots = torch.full((self.max_seqs, K), -1, dtype=torch.int32)
        h_seq_w = torch.zeros((self.max_seqs, K), dtype=torch.float32)
        h_seq_slots[:ns, :k] = slots.to(torch.int32)
        h_seq_w[:ns, :k] = weights
        h_start = torch.full((self.max_seqs + 1,), T, dtype=torch.int32)    # padding seqs: empty at T
        h_start[: ns + 1] = qsl.to(torch.int32)
        reps = lens.numpy()
        tok_slots = torch.from_numpy(np.repeat(h_seq_slots[:ns].numpy(), reps, axis=0))   # (T, K)
        tok_w = torch.from_numpy(np.repeat(h_seq_w[:ns].numpy(), reps, axis=0))           # (T, K)
        h_tok_slots = torch.full((self.max_tokens, K), -1, dtype=torch.int32)
        h_tok_w = torch.zeros((self.max_tokens, K), dtype=torch.float32)
        h_tok_slots[:T] = tok_slots
        h_tok_w[:T] = tok_w

        active_seq = (h_seq_slots[:ns] >= 0).any(dim=1) & (lens > 0)
        any_active = bool(active_seq.any())
        self.token_slots.copy_(h_tok_slots, non_blocking=True)
        self.token_weights.copy_(h_tok_w, non_blocking=True)
        self.seq_start.copy_(h_start, non_blocking=True)
        self.seq_slots.copy_(h_seq_slots, non_blocking=True)
        self.seq_weights.copy_(h_seq_w, non_blocking=True)
        if self.backend != "triton":
            self.cpu.build(qsl, lens, slots, weights, tok_slots, tok_w, any_active)
        max_slot = int(slots.max()) if any_active else -1
        self.host_info.copy_(torch.tensor([int(any_active), T, ns, int(lens.max()) if ns > 0 else 0, max_slot]))

    @staticmethod
    def _merge_duplicates(slots: torch.Tensor, weights: torch.Tensor):
        """A slot listed twice in one request becomes one entry with the summed weight."""
        if slots.shape[1] < 2:
            return slots, weights
        srt = slots.sort(dim=1).values
        dup_rows = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(dim=1).nonzero().flatten()
        for i in dup_rows.tolist():                 # rare: Python per affected row is fine
            acc: dict[int, float] = {}
            for s, w in zip(slots[i].tolist(), weights[i].tolist()):
                if s >= 0:
                    acc[s] = acc.get(s, 0.0) + w
            items = [(s, w) for s, w in acc.items() if w != 0.0]
            slots[i].fill_(-1)
            weights[i].zero_()
            for j, (s, w) in enumerate(items):
                slots[i, j], weights[i, j] = s, w
        return slots, weights
