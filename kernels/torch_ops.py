"""Pure-torch multi-shard delta (the CPU backend; vLLM's CPU build has no Triton).

Math, per token t and slice i (gate/up = 2 slices, down = 1):
    y_t[i] += Σ_j w_{t,j} · B[i, s(t,j), :, :r_s] · (A[i, s(t,j), :r_s, :] · x_t)
No per-token loops and no Python loop over slots: the plan (built once per step by DeltaMeta.fill,
shared by all layers) has two kinds of items.
* dense group — requests with identical (slots, weights) and ≥ DENSE_MIN_TOKENS tokens (prefill,
  or decode where many requests share one shard list), i.e. one rank-Σr adapter:
    H = X · A_catᵀ,  A_cat = [A_1; …; A_k] of every slice   one GEMM             (n, k·ns·r)
    fp32:       y[X] += w_j · H_j · B_jᵀ  for each slot j   one baddbmm_ over the slices, B read
                in place (copying B costs more than MKL's small-K fp32 GEMMs lose)
    bf16/fp16:  y[X] += (H ⊙ w_col) · B_catᵀ                one baddbmm_ on a copy of B (oneDNN's
                small-K half-precision GEMMs cost ~2× one K = Σr GEMM)
  Contiguous requests update y's rows in place; split groups accumulate and index_add_ once.
* slot bucket — the remaining (token, j) pairs (decode with per-request shards, small requests),
  grouped by slot; slots whose token counts are alike share a bucket, token lists padded to the
  bucket's M. Per bucket, X_g = x[tokens] (G·M, d_in), slot-major, and
    fp32, one rank:  H = grouped_mm(X_g, A_poolᵀ) ⊙ w,  out = grouped_mm(H, B_poolᵀ)   per slice
                     (grouped_mm on the pool itself: no factor copies, unused slots are
                     empty groups and never read)
    otherwise:       the G slots' factors copied once (index_select, in ≤ GATHER_CHUNK_BYTES
                     chunks so the copies stay cache-resident), then
                     H = bmm(X_g, A_gᵀ) ⊙ w over slots (all slices at once), out = bmm(H, B_gᵀ)
                     over (slice, slot); the M rows are the bmm row dimension (MKL's fp32
                     batched matvec is ~10× slower in the column-vector form), and bf16's
                     grouped_mm runs one slow small oneDNN GEMM per group
    y[tokens] += out                                 one index_add_ of whole rows
Factors are sliced to the largest rank R_eff among the slots an item uses, not the pool's R; when
the ranks differ, the gathered rows/columns past each slot's rank are zeroed (never multiplied),
so padding garbage (even NaN) cannot leak. Rank-0 (empty) slots add nothing. Tokens without a
slot are never written (bit-exact y); padded bucket entries add an exact 0 to a written row.
Precision: torch's CPU GEMMs accumulate in fp32 for bf16/fp16; H is rounded to the input dtype
before the expand (as vLLM's LoRA ops do).
"""
from __future__ import annotations

import torch

from .meta import (BUCKET_M, BUCKET_PAIR_BEGIN, BUCKET_ROW_BEGIN, BUCKET_ROW_END, CPLAN_BEGIN, CPLAN_END,
                   CPLAN_TOK_BEGIN, INFO_BUCKET_ROWS, INFO_BUCKETS, INFO_CONCAT, PLAN_SLOT)

# The gathered factor copies of one bmm batch stay within this (L2/L3-resident): one huge copy
# that spills to DRAM costs ~4x more than reading the factors in place.
GATHER_CHUNK_BYTES = 4 << 20


def delta_torch(
    y: torch.Tensor,          # (T, n_slices*d_out), updated in place
    x: torch.Tensor,          # (T, d_in)
    a_pool: torch.Tensor,     # (n_slices, S, R, d_in)
    b_pool: torch.Tensor,     # (n_slices, S, d_out, R)
    slot_ranks: torch.Tensor, # (S,) int32
    plan: torch.Tensor,       # (max_groups, 5) int64, host
    pair_tok: torch.Tensor,   # (max_pairs,) int64
    pair_w: torch.Tensor,     # (max_pairs,) float32
    cplan: torch.Tensor,      # (max_seqs, 3) int64, host
    cslots: torch.Tensor,     # (max_seqs, K) int64, host
    cweights: torch.Tensor,   # (max_seqs, K) float64, host
    ctok: torch.Tensor,       # (max_tokens,) int64
    info: list[int],          # host_info as a list
) -> None:
    n_slices = a_pool.shape[0]
    yv = y.unflatten(1, (n_slices, b_pool.shape[2]))          # (T, n_slices, d_out) view
    if info[INFO_CONCAT]:
        n = info[INFO_CONCAT]
        _dense_groups(y, yv, x, a_pool, b_pool, slot_ranks.tolist(), cplan[:n].tolist(), cslots,
                      cslots[:n].tolist(), cweights[:n].tolist(), ctok)
    for b in range(info[INFO_BUCKETS]):
        row = info[INFO_BUCKET_ROWS + 4 * b: INFO_BUCKET_ROWS + 4 * b + 4]
        r0, r1, p0, m = row[BUCKET_ROW_BEGIN], row[BUCKET_ROW_END], row[BUCKET_PAIR_BEGIN], row[BUCKET_M]
        _slot_bucket(y, x, a_pool, b_pool, slot_ranks, plan[r0:r1, PLAN_SLOT],
                     pair_tok[p0:p0 + (r1 - r0) * m], pair_w[p0:p0 + (r1 - r0) * m], m)


def _dense_groups(y, yv, x, a_pool, b_pool, ranks, rows, cslots, slot_rows, weight_rows, ctok) -> None:
    for g, (row, srow, wrow) in enumerate(zip(rows, slot_rows, weight_rows)):
        k = sum(1 for s in srow if s >= 0)                   # entries are packed at the front
        used = [(j, s, ranks[s], w) for j, (s, w) in enumerate(zip(srow[:k], wrow)) if ranks[s] > 0]
        if not used:
            continue
        tb, cb, ce = row[CPLAN_TOK_BEGIN], row[CPLAN_BEGIN], row[CPLAN_END]
        n = ce - cb
        if tb >= 0:
            xs, ys = x[tb:tb + n], yv[tb:tb + n]             # (n, d_in), (n, ns, d_out) views
        else:
            idx = ctok[cb:ce]                                # (n,)
            xs = x.index_select(0, idx)
            ys = yv.new_zeros((n,) + yv.shape[1:])           # accumulated, then added to y's rows
        if x.dtype == torch.float32:
            _dense_per_slot_expand(ys, xs, a_pool, b_pool, cslots[g, :k], used)
        else:
            _dense_concat(ys, xs, a_pool, b_pool, used)
        if tb < 0:
            y.index_add_(0, idx, ys.view(n, -1))


def _dense_per_slot_expand(ys, xs, a_pool, b_pool, slots, used) -> None:
    """fp32: one shrink GEMM over a copy of the A rows (rank R_eff), then per slot one batched
    expand over the slices reading B in place (MKL's small-K fp32 GEMMs are efficient)."""
    n_slices, _, _, d_in = a_pool.shape
    n, k = xs.shape[0], slots.numel()
    r_eff = max(r for _, _, r, _ in used)
    a_cat = a_pool[:, :, :r_eff].transpose(0, 1).index_select(0, slots)     # (k, ns, R_eff, d_in)
    h = torch.mm(xs, a_cat.view(-1, d_in).t()).view(n, k, n_slices, r_eff)   # (n, k, ns, R_eff)
    yt = ys.transpose(0, 1)                                  # (ns, n, d_out) view
    for j, s, r, w in used:                                  # columns past r (garbage) are never used
        yt.baddbmm_(h[:, j, :, :r].transpose(0, 1), b_pool[:, s, :, :r].transpose(1, 2), alpha=w)


def _dense_concat(ys, xs, a_pool, b_pool, used) -> None:
    """bf16/fp16: the concatenated adapter itself (copies of the rank-sliced factors, weights on
    H's columns): 2 GEMMs; oneDNN's small-K half-precision GEMMs cost ~2x a K·r one."""
    n_slices, _, _, d_in = a_pool.shape
    n = xs.shape[0]
    a_cat = torch.cat([a_pool[:, s, :r] for _, s, r, _ in used], dim=1)       # (ns, Σr, d_in)
    b_cat = torch.cat([b_pool[:, s, :, :r] for _, s, r, _ in used], dim=2)    # (ns, d_out, Σr)
    w_col = torch.cat([torch.full((r,), w, dtype=xs.dtype) for _, _, r, w in used])   # (Σr,)
    sum_r = w_col.numel()
    h = torch.mm(xs, a_cat.view(-1, d_in).t()).view(n, n_slices, sum_r).mul_(w_col)  # (n, ns, Σr)
    ys.transpose(0, 1).baddbmm_(h.transpose(0, 1), b_cat.transpose(1, 2))


def _slot_bucket(y, x, a_pool, b_pool, slot_ranks, slots, tok, w, m: int) -> None:
    """One bucket: G slots (slots (G,), ascending), each with M padded entries (tok, w (G*M,))."""
    rks = slot_ranks.index_select(0, slots)                  # (G,)
    r_min, r_eff = [int(v) for v in torch.aminmax(rks)]
    if r_eff <= 0:
        return
    if r_min == r_eff and x.dtype == torch.float32 and x.device.type == "cpu":
        _bucket_grouped(y, x, a_pool, b_pool, slots, tok, w, m, r_eff)
        return
    per_slot = a_pool.shape[0] * r_eff * (a_pool.shape[3] + b_pool.shape[2]) * x.element_size()
    step = max(1, GATHER_CHUNK_BYTES // per_slot)
    for c0 in range(0, slots.numel(), step):
        c1 = min(slots.numel(), c0 + step)
        _bucket_gathered(y, x, a_pool, b_pool, slots[c0:c1], rks[c0:c1], tok[c0 * m:c1 * m],
                         w[c0 * m:c1 * m], m, r_min < r_eff, r_eff)


def _bucket_grouped(y, x, a_pool, b_pool, slots, tok, w, m: int, r: int) -> None:
    """All slots of rank r: grouped GEMMs straight on the pool (no factor copies; slots without
    entries in this bucket are empty groups, never read). fp32 only: the bf16 grouped kernel runs
    one small oneDNN GEMM per group and is slower than the gathered bmm's."""
    n_used = int(slots[-1]) + 1                              # groups 0..max slot of the pool
    counts = torch.zeros((n_used,), dtype=torch.int32).index_fill_(0, slots, m)
    offs = counts.cumsum(0, dtype=torch.int32)               # (n_used,) end row of each group
    xg = x.index_select(0, tok)                              # (G*M, d_in), slot-major
    gmm = torch.nn.functional.grouped_mm
    outs = []
    for i in range(a_pool.shape[0]):
        h = gmm(xg, a_pool[i, :n_used, :r].transpose(1, 2), offs=offs).mul_(w.unsqueeze(1))    # (G*M, r)
        outs.append(gmm(h, b_pool[i, :n_used, :, :r].transpose(1, 2), offs=offs))           # (G*M, d_out)
    # One index_add_ of whole contiguous rows: into a column slice of y it is ~6x slower.
    y.index_add_(0, tok, outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))


def _bucket_gathered(y, x, a_pool, b_pool, slots, rks, tok, w, m: int, mask: bool, r_eff: int) -> None:
    """G slots' factors copied once (index_select), then two bmm's over (slot[, slice])."""
    n_slices, _, _, d_in = a_pool.shape
    d_out = b_pool.shape[2]
    G = slots.numel()
    a_g = a_pool[:, :, :r_eff].transpose(0, 1).index_select(0, slots)        # (G, ns, R_eff, d_in)
    # Gather whole slots, then slice the rank: gathering from the rank-sliced (strided) view is
    # 6-15x slower. Merging dims 0 and 1 in the view below stays valid for the slice.
    b_g = b_pool.index_select(1, slots)[..., :r_eff]                         # (ns, G, d_out, R_eff)
    if mask:                                                 # zero what lies past each slot's rank
        past = torch.arange(r_eff, device=rks.device) >= rks.unsqueeze(1)      # (G, R_eff)
        a_g.masked_fill_(past[:, None, :, None], 0)
        b_g.masked_fill_(past[None, :, None, :], 0)
    xg = x.index_select(0, tok).view(G, m, d_in)                               # (G, M, d_in)
    h = torch.bmm(xg, a_g.view(G, n_slices * r_eff, d_in).transpose(1, 2))    # (G, M, ns·R_eff)
    h.mul_(w.view(G, m, 1))
    if n_slices > 1:
        h = h.view(G, m, n_slices, r_eff).permute(2, 0, 1, 3).reshape(n_slices * G, m, r_eff)
    out = torch.bmm(h.view(n_slices * G, m, r_eff),
                    b_g.view(n_slices * G, d_out, r_eff).transpose(1, 2))     # (ns·G, M, d_out)
    # (ns, G·M, d_out) → whole rows (G·M, ns·d_out): index_add_ into y's column slices is ~6x slower.
    out = out.view(n_slices, G * m, d_out).transpose(0, 1).reshape(G * m, n_slices * d_out)
    y.index_add_(0, tok, out)
