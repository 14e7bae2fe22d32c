"""Triton expand: y += Σ_j w_j · B_j · H_j, accumulated in fp32 and added into y in place.

Math, per token t and slice i (H from the shrink, fp32):
    y_t[i] += Σ_{j<K} w_{t,j} · B[i, s, :, :r_s] · H[i, t, j, :r_s]       s = s(t, j)
All K shards of a token are summed in an fp32 register tile and y is read-modified-written once
(one rounding to y's dtype). H·w is cast to B's dtype for the tensor-core dot (as vLLM's expand
does) except in fp32, where the dot runs in IEEE fp32.

Layouts: SGMV (prefill) — one program per (m-split × d_out tile, slice, sequence), walking the
segment's tokens in BLOCK_M tiles; BGMV (decode) — one program per (token, d_out tile, slice).
Heterogeneous ranks: the inner loop over rank tiles stops at r_s (loop bound read from
slot_ranks), masked to rows < r_s. A sequence/token with no slot returns before reading y, so its
output is bit-exact; slot −1 is skipped before any factor load.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sgmv_expand_kernel(
    h_ptr, b_ptr, y_ptr, seq_start_ptr, seq_slots_ptr, seq_weights_ptr, ranks_ptr,
    d_out,
    stride_hi, stride_hm, stride_hj, stride_hr,
    stride_bi, stride_bs, stride_bn, stride_br,
    stride_ym, stride_yn,
    K_MAX: tl.constexpr, K_POW2: tl.constexpr, M_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % M_SPLIT
    pid_n = pid // M_SPLIT
    i = tl.program_id(1)                           # slice
    seq = tl.program_id(2)
    offs_j = tl.arange(0, K_POW2)
    row_slots = tl.load(seq_slots_ptr + seq * K_MAX + offs_j, mask=offs_j < K_MAX, other=-1)
    if tl.sum((row_slots >= 0).to(tl.int32), axis=0) == 0:
        return                                     # no shard: y stays bit-exact
    start = tl.load(seq_start_ptr + seq).to(tl.int64)
    seg_len = tl.load(seq_start_ptr + seq + 1).to(tl.int64) - start
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < d_out
    offs_k = tl.arange(0, BLOCK_K)
    for m0 in range(pid_m * BLOCK_M, seg_len, M_SPLIT * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < seg_len
        rows = start + offs_m
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j in range(K_MAX):
            slot = tl.load(seq_slots_ptr + seq * K_MAX + j).to(tl.int64)
            if slot >= 0:
                w = tl.load(seq_weights_ptr + seq * K_MAX + j)
                rank = tl.load(ranks_ptr + slot)
                b_base = b_ptr + i * stride_bi + slot * stride_bs + offs_n[None, :] * stride_bn
                for r0 in range(0, rank, BLOCK_K):       # stops at this slot's rank
                    rr = r0 + offs_k
                    r_mask = rr < rank
                    ht = tl.load(h_ptr + i * stride_hi + rows[:, None] * stride_hm + j * stride_hj
                                 + rr[None, :] * stride_hr,
                                 mask=m_mask[:, None] & r_mask[None, :], other=0.0) * w   # (BM, BK)
                    bt = tl.load(b_base + rr[:, None] * stride_br,
                                 mask=r_mask[:, None] & n_mask[None, :], other=0.0)        # (BK, BN)
                    if UPCAST:
                        acc = tl.dot(ht, bt.to(tl.float32), acc, input_precision="ieee")
                    elif IEEE:
                        acc = tl.dot(ht, bt, acc, input_precision="ieee")
                    else:
                        acc = tl.dot(ht.to(bt.dtype), bt, acc)
        y_ptrs = y_ptr + rows[:, None] * stride_ym + (i * d_out + offs_n[None, :]) * stride_yn
        y_mask = m_mask[:, None] & n_mask[None, :]
        yt = tl.load(y_ptrs, mask=y_mask, other=0.0)
        tl.store(y_ptrs, (yt.to(tl.float32) + acc).to(yt.dtype), mask=y_mask)


@triton.jit
def _bgmv_expand_kernel(
    h_ptr, b_ptr, y_ptr, token_slots_ptr, token_weights_ptr, ranks_ptr,
    d_out,
    stride_hi, stride_hm, stride_hj, stride_hr,
    stride_bi, stride_bs, stride_bn, stride_br,
    stride_ym, stride_yn,
    K_MAX: tl.constexpr, K_POW2: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    i = tl.program_id(2)
    offs_j = tl.arange(0, K_POW2)
    row_slots = tl.load(token_slots_ptr + t * K_MAX + offs_j, mask=offs_j < K_MAX, other=-1)
    if tl.sum((row_slots >= 0).to(tl.int32), axis=0) == 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < d_out
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(K_MAX):
        slot = tl.load(token_slots_ptr + t * K_MAX + j).to(tl.int64)
        if slot >= 0:
            w = tl.load(token_weights_ptr + t * K_MAX + j)
            rank = tl.load(ranks_ptr + slot)
            b_base = b_ptr + i * stride_bi + slot * stride_bs + offs_n[:, None] * stride_bn
            for r0 in range(0, rank, BLOCK_K):
                rr = r0 + offs_k
                r_mask = rr < rank
                hv = tl.load(h_ptr + i * stride_hi + t * stride_hm + j * stride_hj + rr * stride_hr,
                             mask=r_mask, other=0.0) * w                                   # (BK,)
                bt = tl.load(b_base + rr[None, :] * stride_br,
                             mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)  # (BN, BK)
                acc += tl.sum(bt * hv[None, :], axis=1)
    y_ptrs = y_ptr + t * stride_ym + (i * d_out + offs_n) * stride_yn
    yv = tl.load(y_ptrs, mask=n_mask, other=0.0)
    tl.store(y_ptrs, (yv.to(tl.float32) + acc).to(yv.dtype), mask=n_mask)


def sgmv_expand(
    h: torch.Tensor,            # (n_slices, T, K, R) fp32
    b_pool: torch.Tensor,       # (n_slices, S, d_out, R)
    y: torch.Tensor,            # (T, n_slices*d_out), updated in place
    seq_start: torch.Tensor,    # (max_seqs+1,) int32
    seq_slots: torch.Tensor,    # (max_seqs, K) int32, contiguous
    seq_weights: torch.Tensor,  # (max_seqs, K) float32, contiguous
    slot_ranks: torch.Tensor,   # (S,) int32
    *, interpret: bool = False,
) -> None:
    n_slices, _, d_out, R = b_pool.shape
    T = y.shape[0]
    max_seqs, K = seq_slots.shape
    BLOCK_M = 16 if T <= 256 else 64
    BLOCK_N = 64 if d_out <= 1024 else 128
    M_SPLIT = max(1, min(32, triton.cdiv(T, BLOCK_M)))
    grid = (M_SPLIT * triton.cdiv(d_out, BLOCK_N), n_slices, max_seqs)
    _sgmv_expand_kernel[grid](
        h, b_pool, y, seq_start, seq_slots, seq_weights, slot_ranks, d_out,
        *h.stride(), *b_pool.stride(), y.stride(0), y.stride(1),
        K_MAX=K, K_POW2=triton.next_power_of_2(K), M_SPLIT=M_SPLIT,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=16,
        UPCAST=interpret, IEEE=y.dtype == torch.float32,
    )


def bgmv_expand(
    h: torch.Tensor,              # (n_slices, T, K, R) fp32
    b_pool: torch.Tensor,         # (n_slices, S, d_out, R)
    y: torch.Tensor,              # (T, n_slices*d_out), updated in place
    token_slots: torch.Tensor,    # (max_tokens, K) int32, contiguous
    token_weights: torch.Tensor,  # (max_tokens, K) float32, contiguous
    slot_ranks: torch.Tensor,     # (S,) int32
) -> None:
    n_slices, _, d_out, R = b_pool.shape
    T = y.shape[0]
    K = token_slots.shape[1]
    BLOCK_N = 128 if d_out >= 128 else 64
    grid = (T, triton.cdiv(d_out, BLOCK_N), n_slices)
    _bgmv_expand_kernel[grid](
        h, b_pool, y, token_slots, token_weights, slot_ranks, d_out,
        *h.stride(), *b_pool.stride(), y.stride(0), y.stride(1),
        K_MAX=K, K_POW2=triton.next_power_of_2(K),
        BLOCK_N=BLOCK_N, BLOCK_K=min(64, max(16, triton.next_power_of_2(R))),
    )
