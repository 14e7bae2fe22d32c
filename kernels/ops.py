"""Custom-op registration (`torch.ops.wrag.*`) and backend dispatch for the multi-shard delta.

Math, per token t of a mixed batch and slice i of the projection:
    y_t[i] += Σ_{j<K} w_{t,j} · B[i, s(t,j)] · (A[i, s(t,j)] · x_t)        s = −1 → nothing
`apply_delta` picks Triton for CUDA tensors and the torch path otherwise (vLLM's CPU build has
no Triton). The ops are opaque to torch.compile (fake impls give shapes only), and every input is
a fixed-size buffer of DeltaMeta, so compiled graphs and CUDA graphs see new metadata through
in-place updates without retracing. Host-side decisions (early exit when no token has a slot,
SGMV vs BGMV, validation) read `host_info`, a CPU tensor, so they never sync with the device.
Under CUDA-graph capture those host decisions are frozen at capture time (as in vLLM's LoRA ops,
which use a CPU no-LoRA flag the same way): capture with an active batch of the layout you replay.
"""
from __future__ import annotations

import torch

from .meta import (INFO_ACTIVE, INFO_BUCKETS, INFO_CONCAT, INFO_MAX_SEQ_LEN, INFO_MAX_SLOT, INFO_TOKENS, DeltaMeta)
from .torch_ops import delta_torch

BACKENDS = ("auto", "torch", "triton")


def _triton_interpreting() -> bool:
    from . import triton_shrink
    return type(triton_shrink._sgmv_shrink_kernel).__name__ == "InterpretedFunction"


def _check(y, x, a_pool, b_pool, slot_ranks, token_slots, info) -> None:
    """Host-side validation from shapes and host_info only (no device reads)."""
    if x.dim() != 2 or y.dim() != 2 or a_pool.dim() != 4 or b_pool.dim() != 4:
        raise ValueError("expected y (T, n_slices*d_out), x (T, d_in), a_pool (n, S, R, d_in), b_pool (n, S, d_out, R)")
    n_slices, S, R, d_in = a_pool.shape
    if tuple(b_pool.shape) != (n_slices, S, b_pool.shape[2], R):
        raise ValueError(f"b_pool {tuple(b_pool.shape)} does not match a_pool {tuple(a_pool.shape)}")
    T = x.shape[0]
    if x.shape[1] != d_in or tuple(y.shape) != (T, n_slices * b_pool.shape[2]):
        raise ValueError(f"shapes y {tuple(y.shape)}, x {tuple(x.shape)} do not match the pools")
    if slot_ranks.shape != (S,):
        raise ValueError(f"slot_ranks must have shape ({S},)")
    if not (x.dtype == y.dtype == a_pool.dtype == b_pool.dtype):
        raise ValueError("y, x, a_pool and b_pool must share one dtype")
    if T > token_slots.shape[0] or T < info[INFO_TOKENS]:
        raise ValueError(f"batch has {T} rows but DeltaMeta holds {info[INFO_TOKENS]} tokens "
                         f"(max_tokens={token_slots.shape[0]})")
    if info[INFO_MAX_SLOT] >= S:
        raise ValueError(f"slot {info[INFO_MAX_SLOT]} is outside the pool of {S} slots")


def _apply_delta_impl(
    y: torch.Tensor,              # (T, n_slices*d_out)
    x: torch.Tensor,              # (T, d_in)
    a_pool: torch.Tensor,         # (n_slices, S, R, d_in)
    b_pool: torch.Tensor,         # (n_slices, S, d_out, R)
    slot_ranks: torch.Tensor,     # (S,) int32
    token_slots: torch.Tensor,    # (max_tokens, K) int32
    token_weights: torch.Tensor,  # (max_tokens, K) float32
    seq_start: torch.Tensor,      # (max_seqs+1,) int32
    seq_slots: torch.Tensor,      # (max_seqs, K) int32
    seq_weights: torch.Tensor,    # (max_seqs, K) float32
    pair_tok: torch.Tensor,       # (max_pairs,) int64
    pair_w: torch.Tensor,         # (max_pairs,) float32
    plan: torch.Tensor,           # (max_groups, 5) int64, CPU
    plan_w: torch.Tensor,         # (max_groups,) float64, CPU (not read; kept for the schema)
    cplan: torch.Tensor,          # (max_seqs, 3) int64, CPU
    cslots: torch.Tensor,         # (max_seqs, K) int64, CPU
    cweights: torch.Tensor,       # (max_seqs, K) float64, CPU
    ctok: torch.Tensor,           # (max_tokens,) int64
    host_info: torch.Tensor,      # (8,) int64, CPU
    backend: str,
) -> None:
    info = host_info.tolist()
    _check(y, x, a_pool, b_pool, slot_ranks, token_slots, info)
    if not info[INFO_ACTIVE] or x.shape[0] == 0:
        return                                      # early exit: no token has a slot
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}")
    use_triton = backend == "triton" or (backend == "auto" and y.is_cuda)
    if not use_triton:
        if info[INFO_BUCKETS] == 0 and info[INFO_CONCAT] == 0:
            raise RuntimeError("the torch path needs DeltaMeta(..., build_plan=True)")
        delta_torch(y, x, a_pool, b_pool, slot_ranks, plan, pair_tok, pair_w, cplan, cslots, cweights, ctok, info)
        return
    h = _shrink_triton(x, a_pool, slot_ranks, token_slots, seq_start, seq_slots, info[INFO_MAX_SEQ_LEN] <= 1)
    _expand_triton(y, h, b_pool, slot_ranks, token_slots, token_weights, seq_start, seq_slots,
                   seq_weights, info[INFO_MAX_SEQ_LEN] <= 1)


# Registered like vLLM's direct_register_custom_op (Library.define + impl per dispatch key), not with
# torch.library.custom_op: the latter's Python wrapper layers cost 80-180 µs per call on CPU, and a
# compiled decoder calls this op twice per layer per step (measured: -19% server throughput).
def _apply_delta_fake(y, x, a_pool, b_pool, slot_ranks, token_slots, token_weights, seq_start, seq_slots,
                      seq_weights, pair_tok, pair_w, plan, plan_w, cplan, cslots, cweights, ctok, host_info,
                      backend) -> None:
    return None


# Defined once per process: the same files can be imported twice under two names (`wrag_kernels`,
# and `kernels` when the repo root is on sys.path and a library probes for the PyPI `kernels`).
if not hasattr(torch.ops.wrag, "apply_delta"):
    _LIB = torch.library.Library("wrag", "FRAGMENT")
    _LIB.define("apply_delta" + torch.library.infer_schema(_apply_delta_impl, mutates_args=("y",)))
    for _key in ("CPU", "CUDA"):
        _LIB.impl("apply_delta", _apply_delta_impl, _key)
    torch.library.register_fake("wrag::apply_delta", _apply_delta_fake, lib=_LIB)


def _shrink_triton(x, a_pool, slot_ranks, token_slots, seq_start, seq_slots, decode: bool) -> torch.Tensor:
    from . import triton_shrink
    n_slices, _, R, _ = a_pool.shape
    if n_slices not in (1, 2):
        raise ValueError("the Triton path supports n_slices 1 (down) or 2 (gate_up)")
    K = seq_slots.shape[1]
    h = torch.empty((n_slices, x.shape[0], K, R), dtype=torch.float32, device=x.device)
    if decode:
        triton_shrink.bgmv_shrink(x, a_pool, h, token_slots, slot_ranks)
    else:
        triton_shrink.sgmv_shrink(x, a_pool, h, seq_start, seq_slots, slot_ranks,
                                  interpret=_triton_interpreting())
    return h


def _expand_triton(y, h, b_pool, slot_ranks, token_slots, token_weights, seq_start, seq_slots,
                   seq_weights, decode: bool) -> None:
    from . import triton_expand
    if decode:
        triton_expand.bgmv_expand(h, b_pool, y, token_slots, token_weights, slot_ranks)
    else:
        triton_expand.sgmv_expand(h, b_pool, y, seq_start, seq_slots, seq_weights, slot_ranks,
                                  interpret=_triton_interpreting())


@torch.library.custom_op("wrag::delta_shrink", mutates_args=())
def delta_shrink(
    x: torch.Tensor,            # (T, d_in)
    a_pool: torch.Tensor,       # (n_slices, S, R, d_in)
    slot_ranks: torch.Tensor,   # (S,) int32
    token_slots: torch.Tensor,  # (max_tokens, K) int32
    seq_start: torch.Tensor,    # (max_seqs+1,) int32
    seq_slots: torch.Tensor,    # (max_seqs, K) int32
    decode: bool,
) -> torch.Tensor:              # (n_slices, T, K, R) fp32; rows ≥ r_s and slot −1 entries unset
    """Triton shrink alone (H = A·x per entry), for callers that schedule shrink/expand apart."""
    return _shrink_triton(x, a_pool, slot_ranks, token_slots, seq_start, seq_slots, decode)


@delta_shrink.register_fake
def _(x, a_pool, slot_ranks, token_slots, seq_start, seq_slots, decode):
    return x.new_empty((a_pool.shape[0], x.shape[0], seq_slots.shape[1], a_pool.shape[2]),
                       dtype=torch.float32)


@torch.library.custom_op("wrag::delta_expand", mutates_args=("y",))
def delta_expand(
    y: torch.Tensor,              # (T, n_slices*d_out)
    h: torch.Tensor,              # (n_slices, T, K, R) fp32
    b_pool: torch.Tensor,         # (n_slices, S, d_out, R)
    slot_ranks: torch.Tensor,     # (S,) int32
    token_slots: torch.Tensor,    # (max_tokens, K) int32
    token_weights: torch.Tensor,  # (max_tokens, K) float32
    seq_start: torch.Tensor,      # (max_seqs+1,) int32
    seq_slots: torch.Tensor,      # (max_seqs, K) int32
    seq_weights: torch.Tensor,    # (max_seqs, K) float32
    decode: bool,
) -> None:
    """Triton expand alone (y += Σ_j w_j B_j H_j, fp32 accumulation, in place)."""
    _expand_triton(y, h, b_pool, slot_ranks, token_slots, token_weights, seq_start, seq_slots,
                   seq_weights, decode)


@delta_expand.register_fake
def _(y, h, b_pool, slot_ranks, token_slots, token_weights, seq_start, seq_slots, seq_weights, decode):
    return None


def apply_delta(
    y: torch.Tensor,           # (T, n_slices*d_out), updated in place
    x: torch.Tensor,           # (T, d_in)
    a_pool: torch.Tensor,      # (n_slices, S, R, d_in)
    b_pool: torch.Tensor,      # (n_slices, S, d_out, R)
    slot_ranks: torch.Tensor,  # (S,) int32
    meta: DeltaMeta,
    backend: str = "auto",
) -> None:
    """y += Σ_j w_j · B_j · (A_j · x) per token, in place. backend: "auto" (Triton on CUDA, torch
    otherwise), "torch", or "triton" (CPU tensors work only under TRITON_INTERPRET=1).

    Under torch.compile this goes through torch.ops.wrag.apply_delta (opaque, fake impl); in eager
    mode the implementation is called directly — the custom-op dispatcher's Python layers cost
    ~50 µs per call, which matters on CPU where a layer's delta can take less."""
    op = _apply_delta_impl if not torch.compiler.is_compiling() else torch.ops.wrag.apply_delta
    op(
        y, x, a_pool, b_pool, slot_ranks,
        meta.token_slots, meta.token_weights, meta.seq_start, meta.seq_slots, meta.seq_weights,
        meta.pair_tok, meta.pair_w, meta.plan, meta.plan_w, meta.cplan, meta.cslots, meta.cweights,
        meta.ctok, meta.host_info, backend,
    )
