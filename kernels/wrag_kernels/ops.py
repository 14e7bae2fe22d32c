"""The custom ops `torch.ops.wrag.apply_delta` / `apply_delta_native` and their backends.

Semantics, per token t of a mixed batch and slice i of the projection:
    y_t[i] += Σ_{j<K} w_{t,j} · B[i, s(t,j)] · (A[i, s(t,j)] · x_t)        s = −1 → nothing
The backend is the one DeltaMeta chose at construction: "triton" (CUDA; SGMV for prefill, BGMV
for decode), "native" (its own op, `apply_delta_native`, whose CPU kernel is the C++ of
kernels/csrc/delta_cpu.cpp over cpu.py's plan: no Python on the call) or "torch" (cpu.py's plan
run with torch ops: the readable reference of the CPU path). The ops are opaque to torch.compile (their fakes
give no outputs: they mutate y in place), and every metadata input is a fixed-size buffer of
DeltaMeta, so compiled graphs and CUDA graphs see new metadata through in-place updates without
retracing. Outside graph-safe mode, host-side decisions (early exit when no token has a slot,
SGMV vs BGMV, validation) read `host_info`, a CPU tensor, so they never sync with the device. In
graph-safe mode (DeltaMeta's default on CUDA) the op takes no decision from a step's contents: it
always launches the per-token BGMV kernels with grids sized from the batch's shape, and entries
with slot −1 or rank 0 exit on the device — so a CUDA graph vLLM captures with dummy batches (no
token has a slot) replays every later step's deltas, instead of freezing an early exit.
"""
from __future__ import annotations

import torch

from .cpu import delta_cpu
from .meta import INFO_ACTIVE, INFO_MAX_SEQ_LEN, INFO_MAX_SLOT, INFO_TOKENS, DeltaMeta, MetaArgs


def _check(y, x, a_pool, b_pool, slot_ranks, max_tokens: int, info: list[int] | None) -> None:
    """Host-side validation from shapes and host_info (None: from shapes only; no device reads)."""
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
    if T > max_tokens:
        raise ValueError(f"batch has {T} rows but DeltaMeta(max_tokens={max_tokens})")
    if info is None:
        return
    if T < info[INFO_TOKENS]:
        raise ValueError(f"batch has {T} rows but DeltaMeta holds {info[INFO_TOKENS]} tokens")
    if info[INFO_MAX_SLOT] >= S:
        raise ValueError(f"slot {info[INFO_MAX_SLOT]} is outside the pool of {S} slots")


def _apply_delta_impl(
    y: torch.Tensor,              # (T, n_slices*d_out), updated in place
    x: torch.Tensor,              # (T, d_in)
    a_pool: torch.Tensor,         # (n_slices, S, R, d_in)
    b_pool: torch.Tensor,         # (n_slices, S, d_out, R)
    slot_ranks: torch.Tensor,     # (S,) int32
    backend: str,                 # "native" | "torch" | "triton" (DeltaMeta.backend)
    graph_safe: bool,             # DeltaMeta.graph_safe
    *meta_args: torch.Tensor,     # MetaArgs (meta.py), in order
) -> None:
    m = MetaArgs(*meta_args)
    if graph_safe:   # the same launches whatever the metadata holds; slot −1 / rank 0 exit on the device
        _check(y, x, a_pool, b_pool, slot_ranks, m.token_slots.shape[0], None)
        if x.shape[0]:
            h = _shrink_triton(x, a_pool, slot_ranks, m, decode=True)
            _expand_triton(y, h, b_pool, slot_ranks, m, decode=True)
        return
    if backend == "native":                         # validates and exits early in C++
        torch.ops.wrag.apply_delta_native(y, x, a_pool, b_pool, slot_ranks, *meta_args)
        return
    info = m.host_info.tolist()
    _check(y, x, a_pool, b_pool, slot_ranks, m.token_slots.shape[0], info)
    if not info[INFO_ACTIVE] or x.shape[0] == 0:
        return                                      # early exit: no token has a slot
    if backend == "torch":
        delta_cpu(y, x, a_pool, b_pool, slot_ranks, m.pair_tok, m.pair_w, m.plan, m.cplan, m.cslots,
                  m.cweights, m.ctok, m.cpu_info)
        return
    decode = info[INFO_MAX_SEQ_LEN] <= 1
    h = _shrink_triton(x, a_pool, slot_ranks, m, decode)
    _expand_triton(y, h, b_pool, slot_ranks, m, decode)


def _apply_delta_fake(*args) -> None:
    return None


# Registered like vLLM's direct_register_custom_op (Library.define + impl per dispatch key), not with
# torch.library.custom_op, whose Python wrapper layers cost more per call (docs/decisions.md). The
# schema spells MetaArgs' fields once, from the NamedTuple.
_SCHEMA = ("(Tensor(a!) y, Tensor x, Tensor a_pool, Tensor b_pool, Tensor slot_ranks, str backend, bool graph_safe, "
           + ", ".join(f"Tensor {f}" for f in MetaArgs._fields) + ") -> ()")
_LIB = torch.library.Library("wrag", "FRAGMENT")
_LIB.define("apply_delta" + _SCHEMA)
for _key in ("CPU", "CUDA"):
    _LIB.impl("apply_delta", _apply_delta_impl, _key)
torch.library.register_fake("wrag::apply_delta", _apply_delta_fake, lib=_LIB)
# The native backend's op: its CPU kernel is C++ (apply_delta_native in kernels/csrc/delta_cpu.cpp,
# registered when native.load() loads the library), so a call from eager code or from a compiled
# graph runs no Python past the dispatcher: validation, the early exit, the dense groups (ATen
# GEMMs) and the slot rows are all in the kernel.
_LIB.define("apply_delta_native(Tensor(a!) y, Tensor x, Tensor a_pool, Tensor b_pool, Tensor slot_ranks, "
            + ", ".join(f"Tensor {f}" for f in MetaArgs._fields) + ") -> ()")
torch.library.register_fake("wrag::apply_delta_native", _apply_delta_fake, lib=_LIB)


def _triton_interpreting() -> bool:
    from . import triton_shrink
    return type(triton_shrink._sgmv_shrink_kernel).__name__ == "InterpretedFunction"


def _shrink_triton(x, a_pool, slot_ranks, m: MetaArgs, decode: bool) -> torch.Tensor:
    """H (n_slices, T, K, R) fp32 = A·x per entry; rows ≥ r_s and slot −1 entries unset."""
    from . import triton_shrink
    n_slices, _, R, _ = a_pool.shape
    if n_slices not in (1, 2):
        raise ValueError("the Triton path supports n_slices 1 (down) or 2 (gate_up)")
    h = torch.empty((n_slices, x.shape[0], m.seq_slots.shape[1], R), dtype=torch.float32, device=x.device)
    if decode:
        triton_shrink.bgmv_shrink(x, a_pool, h, m.token_slots, slot_ranks)
    else:
        triton_shrink.sgmv_shrink(x, a_pool, h, m.seq_start, m.seq_slots, slot_ranks,
                                  interpret=_triton_interpreting())
    return h


def _expand_triton(y, h, b_pool, slot_ranks, m: MetaArgs, decode: bool) -> None:
    """y += Σ_j w_j B_j H_j, fp32 accumulation, in place."""
    from . import triton_expand
    if decode:
        triton_expand.bgmv_expand(h, b_pool, y, m.token_slots, m.token_weights, slot_ranks)
    else:
        triton_expand.sgmv_expand(h, b_pool, y, m.seq_start, m.seq_slots, m.seq_weights, slot_ranks,
                                  interpret=_triton_interpreting())


def apply_delta(
    y: torch.Tensor,           # (T, n_slices*d_out), updated in place
    x: torch.Tensor,           # (T, d_in)
    a_pool: torch.Tensor,      # (n_slices, S, R, d_in)
    b_pool: torch.Tensor,      # (n_slices, S, d_out, R)
    slot_ranks: torch.Tensor,  # (S,) int32
    meta: DeltaMeta,
) -> None:
    """y += Σ_j w_j · B_j · (A_j · x) per token, in place, on meta's backend.

    The native backend calls its C++ op. The others go through torch.ops.wrag.apply_delta under
    torch.compile (opaque, fake impl); in eager mode its implementation is called directly,
    skipping the dispatcher's Python layers."""
    if meta.backend == "native":
        torch.ops.wrag.apply_delta_native(y, x, a_pool, b_pool, slot_ranks, *meta.meta_args())
        return
    op = _apply_delta_impl if not torch.compiler.is_compiling() else torch.ops.wrag.apply_delta
    op(y, x, a_pool, b_pool, slot_ranks, meta.backend, meta.graph_safe, *meta.meta_args())
