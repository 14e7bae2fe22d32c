"""Triton shrink: H = A · x per (token, shard entry), for every slice of a (fused) projection.

Math (Punica's y = x·W + x·A·B, here with K weighted shards per token and A stored (r, d_in)):
    H[i, t, j, :r_s] = A[i, s, :r_s, :] · x_t        s = s(t, j),  r_s = slot_ranks[s]
in fp32 (fp32 accumulation, stored to an fp32 scratch). Weights are applied in the expand.

Two launch layouts:
* SGMV (prefill, segments): one program per (m-split, rank tile, sequence·j); the program walks
  its sequence's tokens in BLOCK_M tiles (`tl.dot` over d_in in BLOCK_K steps), so A's tile is
  reused across the whole segment.
* BGMV (decode, one token per sequence): one program per (token, j, rank tile), a GEMV via
  broadcast-multiply and `tl.sum`.
Both read x once for gate and up: with N_SLICES = 2 the same x tile feeds both slices' A tiles.
Heterogeneous ranks: a program whose rank tile starts at or above r_s exits before any load, and
loads inside a tile are masked to rows < r_s, so a slot never pays for the pool's maximum rank
beyond one tile of padding (compute only, no memory traffic). Slot −1 exits before reading.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, h_ptr, seq_start_ptr, seq_slots_ptr, ranks_ptr,
    d_in,
    stride_xm, stride_xk,
    stride_ai, stride_as, stride_ar, stride_ak,
    stride_hi, stride_hm, stride_hj, stride_hr,
    K_MAX: tl.constexpr, N_SLICES: tl.constexpr, M_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_sj = tl.program_id(2)                     # seq * K_MAX + j
    slot = tl.load(seq_slots_ptr + pid_sj).to(tl.int64)
    if slot < 0:
        return                                     # no shard: never touch another slot's factors
    rank = tl.load(ranks_ptr + slot)
    n0 = pid_n * BLOCK_N
    if n0 >= rank:
        return                                     # rank tile above this slot's rank
    seq = pid_sj // K_MAX
    j = pid_sj % K_MAX
    start = tl.load(seq_start_ptr + seq).to(tl.int64)
    seg_len = tl.load(seq_start_ptr + seq + 1).to(tl.int64) - start
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < rank
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + slot * stride_as + offs_n[None, :] * stride_ar      # (1, BLOCK_N): Aᵀ tile
    for m0 in range(pid_m * BLOCK_M, seg_len, M_SPLIT * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < seg_len
        rows = start + offs_m
        acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            kk = k0 + offs_k
            k_mask = kk < d_in
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)       # (BM, BK)
            a_mask = k_mask[:, None] & n_mask[None, :]
            at0 = tl.load(a_base + kk[:, None] * stride_ak, mask=a_mask, other=0.0)  # (BK, BN)
            if UPCAST:      # interpreter: its bf16 dot is wrong, do the product in fp32
                acc0 = tl.dot(xt.to(tl.float32), at0.to(tl.float32), acc0, input_precision="ieee")
            elif IEEE:
                acc0 = tl.dot(xt, at0, acc0, input_precision="ieee")
            else:
                acc0 = tl.dot(xt, at0, acc0)
            if N_SLICES == 2:   # fused gate/up: same x tile, second slice's A
                at1 = tl.load(a_base + stride_ai + kk[:, None] * stride_ak, mask=a_mask, other=0.0)
                if UPCAST:
                    acc1 = tl.dot(xt.to(tl.float32), at1.to(tl.float32), acc1, input_precision="ieee")
                elif IEEE:
                    acc1 = tl.dot(xt, at1, acc1, input_precision="ieee")
                else:
                    acc1 = tl.dot(xt, at1, acc1)
        h_off = rows[:, None] * stride_hm + j * stride_hj + offs_n[None, :] * stride_hr
        h_mask = m_mask[:, None] & n_mask[None, :]
        tl.store(h_ptr + h_off, acc0, mask=h_mask)
        if N_SLICES == 2:
            tl.store(h_ptr + stride_hi + h_off, acc1, mask=h_mask)


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, h_ptr, token_slots_ptr, ranks_ptr,
    d_in,
    stride_xm, stride_xk,
    stride_ai, stride_as, stride_ar, stride_ak,
    stride_hi, stride_hm, stride_hj, stride_hr,
    K_MAX: tl.constexpr, N_SLICES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    pid_n = tl.program_id(2)
    slot = tl.load(token_slots_ptr + t * K_MAX + j).to(tl.int64)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    n0 = pid_n * BLOCK_N
    if n0 >= rank:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < rank
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + slot * stride_as + offs_n[:, None] * stride_ar       # (BN, 1)
    acc0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < d_in
        xv = tl.load(x_ptr + t * stride_xm + kk * stride_xk, mask=k_mask, other=0.0).to(tl.float32)
        a_mask = n_mask[:, None] & k_mask[None, :]
        a0 = tl.load(a_base + kk[None, :] * stride_ak, mask=a_mask, other=0.0).to(tl.float32)
        acc0 += tl.sum(a0 * xv[None, :], axis=1)
        if N_SLICES == 2:
            a1 = tl.load(a_base + stride_ai + kk[None, :] * stride_ak, mask=a_mask, other=0.0).to(tl.float32)
            acc1 += tl.sum(a1 * xv[None, :], axis=1)
    h_off = t * stride_hm + j * stride_hj + offs_n * stride_hr
    tl.store(h_ptr + h_off, acc0, mask=n_mask)
    if N_SLICES == 2:
        tl.store(h_ptr + stride_hi + h_off, acc1, mask=n_mask)


def _rank_block(R: int) -> int:
    return 16 if R <= 16 else 32   # tl.dot needs >= 16; small tiles keep rank padding cheap


def sgmv_shrink(
    x: torch.Tensor,          # (T, d_in)
    a_pool: torch.Tensor,     # (n_slices, S, R, d_in)
    h: torch.Tensor,          # (n_slices, T, K, R) fp32, written for rows < r_s
    seq_start: torch.Tensor,  # (max_seqs+1,) int32
    seq_slots: torch.Tensor,  # (max_seqs, K) int32, contiguous
    slot_ranks: torch.Tensor, # (S,) int32
    *, interpret: bool = False,
) -> None:
    n_slices, _, R, d_in = a_pool.shape
    T = x.shape[0]
    max_seqs, K = seq_slots.shape
    BLOCK_N = _rank_block(R)
    BLOCK_M = 16 if T <= 256 else 64
    # m-tiles are walked inside the program (stride M_SPLIT), so the grid depends only on shapes
    # (CUDA-graph safe); programs of padding sequences / empty entries exit after one load.
    M_SPLIT = max(1, min(32, triton.cdiv(T, BLOCK_M)))
    grid = (M_SPLIT, triton.cdiv(R, BLOCK_N), max_seqs * K)
    _sgmv_shrink_kernel[grid](
        x, a_pool, h, seq_start, seq_slots, slot_ranks, d_in,
        x.stride(0), x.stride(1), *a_pool.stride(), *h.stride(),
        K_MAX=K, N_SLICES=n_slices, M_SPLIT=M_SPLIT,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=64 if d_in >= 64 else 16,
        UPCAST=interpret, IEEE=x.dtype == torch.float32,
    )


def bgmv_shrink(
    x: torch.Tensor,            # (T, d_in)
    a_pool: torch.Tensor,       # (n_slices, S, R, d_in)
    h: torch.Tensor,            # (n_slices, T, K, R) fp32
    token_slots: torch.Tensor,  # (max_tokens, K) int32, contiguous
    slot_ranks: torch.Tensor,   # (S,) int32
) -> None:
    n_slices, _, R, d_in = a_pool.shape
    T = x.shape[0]
    K = token_slots.shape[1]
    BLOCK_N = max(16, min(64, triton.next_power_of_2(R)))
    grid = (T, K, triton.cdiv(R, BLOCK_N))
    _bgmv_shrink_kernel[grid](
        x, a_pool, h, token_slots, slot_ranks, d_in,
        x.stride(0), x.stride(1), *a_pool.stride(), *h.stride(),
        K_MAX=K, N_SLICES=n_slices, BLOCK_N=BLOCK_N, BLOCK_K=128 if d_in >= 128 else 16,
    )
