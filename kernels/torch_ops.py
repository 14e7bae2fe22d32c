"""Pure-torch multi-shard delta (the CPU backend; vLLM's CPU build has no Triton).

Math, per token t and slice i (gate/up = 2 slices, down = 1):
    y_t[i] += Σ_j w_{t,j} · B[i, s(t,j), :, :r_s] · (A[i, s(t,j), :r_s, :] · x_t)
No per-token loops and no per-token copies of A: work is grouped (plan built once per step by
DeltaMeta.fill, shared by all layers), two kinds of items:
* concat group — requests with identical (slots, weights) and ≥ CONCAT_MIN_TOKENS tokens (prefill):
    A_cat = [A_1; …; A_k] (Σr, d_in),  B_cat = [B_1 … B_k] (d_out, Σr),  w_col = w_j on block j
    y[X] += ((X · A_catᵀ) ⊙ w_col) · B_catᵀ
  i.e. exactly the single concatenated-adapter computation (2 GEMMs, one pass over y) plus a
  per-call copy of the K factors; used when n·(K−1) ≥ 2·Σr (the saved K−1 passes over the
  group's x/y rows outweigh the copy), otherwise the group runs slot by slot without copies.
* slot group — for each distinct slot s with token set X_s (decode, small requests):
    H = X_s · A_sᵀ (n_s, r_s),   y[X_s] += diag(w) · H · B_sᵀ
  so each slot's factors are read once per call however many requests share it.
Contiguous token sets use views of x and in-place `addmm_` on y (no gather/scatter); others use
index_select + index_add_. Factors are sliced to the slot's rank (views), so a rank-4 slot costs
rank-4 GEMMs even in a rank-64 pool; a rank-0 (empty) slot is skipped. Tokens without a slot
are never written (bit-exact y).
Precision: torch's CPU GEMMs accumulate in fp32 for bf16/fp16; H is rounded to the input dtype
before the expand (as vLLM's LoRA ops do) and each slot's term is added into y separately.
"""
from __future__ import annotations

import torch

from .meta import (CPLAN_BEGIN, CPLAN_END, CPLAN_TOK_BEGIN, PLAN_PAIR_BEGIN, PLAN_PAIR_END, PLAN_SLOT,
                   PLAN_TOK_BEGIN, PLAN_UNIFORM)


def delta_torch(
    y: torch.Tensor,          # (T, n_slices*d_out), updated in place
    x: torch.Tensor,          # (T, d_in)
    a_pool: torch.Tensor,     # (n_slices, S, R, d_in)
    b_pool: torch.Tensor,     # (n_slices, S, d_out, R)
    slot_ranks: torch.Tensor, # (S,) int32
    plan: torch.Tensor,       # (max_groups, 5) int64, host
    plan_w: torch.Tensor,     # (max_groups,) float64, host
    pair_tok: torch.Tensor,   # (max_tokens*K,) int64
    pair_w: torch.Tensor,     # (max_tokens*K,) float32
    num_groups: int,
    cplan: torch.Tensor,      # (max_seqs, 3) int64, host
    cslots: torch.Tensor,     # (max_seqs, K) int64, host
    cweights: torch.Tensor,   # (max_seqs, K) float64, host
    ctok: torch.Tensor,       # (max_tokens,) int64
    num_concat: int,
) -> None:
    n_slices, _, _, _ = a_pool.shape
    d_out = b_pool.shape[2]
    ranks = slot_ranks.tolist()
    # Column views of y, one per slice: the expand writes straight into them.
    y_slices = [y[:, i * d_out:(i + 1) * d_out] for i in range(n_slices)]
    if num_concat:
        _concat_groups(y_slices, x, a_pool, b_pool, ranks, cplan[:num_concat].tolist(),
                       cslots[:num_concat].tolist(), cweights[:num_concat].tolist(), ctok)
    if num_groups:
        _slot_groups(y_slices, x, a_pool, b_pool, ranks, plan[:num_groups].tolist(),
                     plan_w[:num_groups].tolist(), pair_tok, pair_w)


def _concat_groups(y_slices, x, a_pool, b_pool, ranks, rows, slot_rows, weight_rows, ctok) -> None:
    for row, srow, wrow in zip(rows, slot_rows, weight_rows):
        used = [(s, ranks[s], w) for s, w in zip(srow, wrow) if s >= 0 and ranks[s] > 0]
        if not used:
            continue
        tb, cb, ce = row[CPLAN_TOK_BEGIN], row[CPLAN_BEGIN], row[CPLAN_END]
        n = ce - cb
        if tb >= 0:
            xs = x[tb:tb + n]                                                   # (n, d_in) view
        else:
            idx = ctok[cb:ce]                                                   # (n,)
            xs = x.index_select(0, idx)
        sum_r = sum(r for _, r, _ in used)
        # Concatenating copies Σr·(d_in+d_out) factor elements; it saves K−1 passes over the
        # group's x and y rows (≈ n·(d_in+d_out) each). Only worth it when the group is large.
        if n * (len(used) - 1) < 2 * sum_r:
            for i in range(len(y_slices)):
                for s, r, w in used:
                    h = torch.mm(xs, a_pool[i, s, :r].t())                      # (n, r)
                    if tb >= 0:
                        y_slices[i][tb:tb + n].addmm_(h, b_pool[i, s, :, :r].t(), alpha=w)
                    else:
                        y_slices[i].index_add_(0, idx, torch.mm(h, b_pool[i, s, :, :r].t()), alpha=w)
            continue
        a_cat = torch.cat([a_pool[:, s, :r] for s, r, _ in used], dim=1)       # (n_slices, Σr, d_in)
        b_cat = torch.cat([b_pool[:, s, :, :r] for s, r, _ in used], dim=2)    # (n_slices, d_out, Σr)
        w_col = torch.cat([torch.full((r,), w, dtype=x.dtype) for _, r, w in used])  # (Σr,)
        for i in range(len(y_slices)):
            h = torch.mm(xs, a_cat[i].t()).mul_(w_col)                          # (n, Σr)
            if tb >= 0:
                y_slices[i][tb:tb + n].addmm_(h, b_cat[i].t())
            else:
                y_slices[i].index_add_(0, idx, torch.mm(h, b_cat[i].t()))


def _slot_groups(y_slices, x, a_pool, b_pool, ranks, rows, uniform_w, pair_tok, pair_w) -> None:
    n_slices, _, R, _ = a_pool.shape
    # Per-slice pool views hoisted out of the loop: the per-slot cost here is Python dispatch.
    a_sl = a_pool.unbind(0)                                   # n_slices × (S, R, d_in)
    b_sl = b_pool.transpose(2, 3).unbind(0)                   # n_slices × (S, R, d_out)
    for row, w in zip(rows, uniform_w):
        slot, pb, pe, tb = row[PLAN_SLOT], row[PLAN_PAIR_BEGIN], row[PLAN_PAIR_END], row[PLAN_TOK_BEGIN]
        r = ranks[slot]
        if r <= 0:
            continue                            # empty slot: nothing to read
        n = pe - pb
        contiguous = tb >= 0
        if contiguous:
            xs = x[tb:tb + n]                   # (n, d_in) view
        else:
            idx = pair_tok[pb:pe]               # (n,)
            xs = x.index_select(0, idx)         # (n, d_in)
        if row[PLAN_UNIFORM]:
            alpha, row_w = w, None
        else:
            alpha, row_w = 1.0, pair_w[pb:pe].to(x.dtype).unsqueeze(1)   # (n, 1)
        for i in range(n_slices):
            a, bt = a_sl[i][slot], b_sl[i][slot]   # (R, d_in), (R, d_out) views
            if r < R:
                a, bt = a[:r], bt[:r]               # rank-sliced: pay r_s, not R
            h = torch.mm(xs, a.t())                 # (n, r)
            if row_w is not None:
                h.mul_(row_w)
            if contiguous:
                y_slices[i][tb:tb + n].addmm_(h, bt, alpha=alpha)
            else:
                y_slices[i].index_add_(0, idx, torch.mm(h, bt), alpha=alpha)
