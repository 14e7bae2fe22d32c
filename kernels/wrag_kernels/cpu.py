"""The CPU backend of the multi-shard delta: its work plan (built once per step, shared by all
layers) and the pure-torch op that executes it (vLLM's CPU build has no Triton).

Semantics, per token t and slice i (gate/up = 2 slices, down = 1):
    y_t[i] += Σ_j w_{t,j} · B[i, s(t,j), :, :r_s] · (A[i, s(t,j), :r_s, :] · x_t)
No per-token loops and no Python loop over slots: `CpuPlan.build` turns the step's batch into two
kinds of work items, so that the per-layer calls do no host work beyond launching torch ops.
* dense group — requests with identical (slots, weights) and ≥ DENSE_MIN_TOKENS tokens (prefill,
  or decode where many requests share one shard list), i.e. one rank-Σr adapter:
    H = X · A_catᵀ,  A_cat = [A_1; …; A_k] of every slice   one GEMM             (n, k·ns·r)
    fp32:       y[X] += w_j · H_j · B_jᵀ  for each slot j   one baddbmm_ over the slices, B read
                in place (MKL's small-K fp32 GEMMs are efficient)
    bf16/fp16:  y[X] += (H ⊙ w_col) · B_catᵀ                one baddbmm_ on a copy of B
  Contiguous requests update y's rows in place; split groups accumulate and index_add_ once.
  cplan (max_seqs, 3) = [contiguous_token_begin or −1, ctok_begin, ctok_end],
  cslots (max_seqs, K) int64, cweights (max_seqs, K) float64, ctok (max_tokens,) token ids.
* slot bucket — the remaining (token, j) pairs (decode with per-request shards, small requests),
  grouped by slot; slots with a similar token count c share a bucket (c in (2^(b−1), 2^b]), each
  slot's token list padded to the bucket's largest count M (padding repeats the slot's first
  token with weight 0: an exact 0 added to a row that is written anyway). Each distinct slot's
  factors are read once. plan (max_groups, 5) = one row per distinct slot, in bucket order:
  [slot, pair_begin, pair_end, count, bucket]; pair_tok / pair_w (2·max_tokens·K,) the padded
  (token, weight) lists, slot-major. Per bucket, X_g = x[tokens] (G·M, d_in), and
    fp32, one rank:  H = grouped_mm(X_g, A_poolᵀ) ⊙ w,  out = grouped_mm(H, B_poolᵀ)   per slice
                     (on the pool itself: no factor copies; unused slots are empty groups)
    otherwise:       the G slots' factors copied once (index_select, in ≤ GATHER_CHUNK_BYTES
                     chunks so the copies stay cache-resident), then H = bmm(X_g, A_gᵀ) ⊙ w
                     over slots (all slices at once), out = bmm(H, B_gᵀ) over (slice, slot)
    y[tokens] += out                                 one index_add_ of whole rows
cpu_info (CPU_INFO_LEN + 4·max_buckets,) int64 = [num_groups, num_pairs, num_dense, num_buckets],
then per bucket [row_begin, row_end, pair_begin, M].
Factors are sliced to the largest rank R_eff among the slots an item uses, not the pool's R; when
the ranks differ, the gathered rows/columns past each slot's rank are zeroed (never multiplied),
so padding garbage (even NaN) cannot leak. Rank-0 (empty) slots add nothing. Tokens without a
slot are never written (bit-exact y); padded bucket entries add an exact 0 to a written row.
Precision: torch's CPU GEMMs accumulate in fp32 for bf16/fp16; H is rounded to the input dtype
before the expand (as vLLM's LoRA ops do). The measurements behind these choices are in
docs/decisions.md.
"""
from __future__ import annotations

import numpy as np
import torch


# Columns of CpuPlan.plan (one row per distinct slot of the slot-bucket path).
PLAN_SLOT, PLAN_PAIR_BEGIN, PLAN_PAIR_END, PLAN_COUNT, PLAN_BUCKET = range(5)
# Columns of CpuPlan.cplan (one row per dense group).
CPLAN_TOK_BEGIN, CPLAN_BEGIN, CPLAN_END = range(3)
# Entries of CpuPlan.info; bucket rows (4 entries each) follow from CPU_INFO_LEN.
CPU_GROUPS, CPU_PAIRS, CPU_DENSE, CPU_BUCKETS, CPU_INFO_LEN = range(5)
BUCKET_ROW_BEGIN, BUCKET_ROW_END, BUCKET_PAIR_BEGIN, BUCKET_M = range(4)
# A request group this large runs dense: its one shrink GEMM and K in-place expands cost less than
# copying the K slots' factors for the batched slot path (and touch y's rows in place). The native
# op reads the factors in place, so with it only groups large enough for BLAS GEMMs to win go dense.
DENSE_MIN_TOKENS = 4
NATIVE_DENSE_MIN_TOKENS = 64
# The gathered factor copies of one bmm batch stay within this (L2/L3-resident).
GATHER_CHUNK_BYTES = 4 << 20


class CpuPlan:
    """The CPU backend's per-step work plan, in fixed-size buffers (see the module docstring)."""

    def __init__(self, max_tokens: int, max_seqs: int, k_max: int, device, dense_min_tokens: int = DENSE_MIN_TOKENS):
        T, N, K, dev = max_tokens, max_seqs, k_max, device
        self.dense_min_tokens = dense_min_tokens
        self.max_groups = min(N * K, T * K)
        self.max_pairs = 2 * T * K                # padding keeps each slot's list < 2x its length
        self.max_buckets = T.bit_length() + 1     # token counts 1, 2, 3-4, 5-8, ...
        self.pair_tok = torch.zeros((self.max_pairs,), dtype=torch.int64, device=dev)   # (max_pairs,)
        self.pair_w = torch.zeros((self.max_pairs,), dtype=torch.float32, device=dev)   # (max_pairs,)
        # Host-side tables: the op reads them on the host, so they stay off the device.
        self.plan = torch.zeros((self.max_groups, 5), dtype=torch.int64)                # (max_groups, 5)
        self.cplan = torch.zeros((N, 3), dtype=torch.int64)                             # (max_seqs, 3)
        self.cslots = torch.full((N, K), -1, dtype=torch.int64)                         # (max_seqs, K)
        self.cweights = torch.zeros((N, K), dtype=torch.float64)                        # (max_seqs, K)
        self.ctok = torch.zeros((T,), dtype=torch.int64, device=dev)                    # (max_tokens,)
        self.info = torch.zeros((CPU_INFO_LEN + 4 * self.max_buckets,), dtype=torch.int64)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """In MetaArgs order (meta.py), which is also delta_cpu's."""
        return (self.pair_tok, self.pair_w, self.plan, self.cplan, self.cslots, self.cweights, self.ctok, self.info)

    def build(self, qsl, lens, slots, weights, tok_slots, tok_w, active: bool) -> None:
        """qsl (ns+1,), lens (ns,), slots/weights (ns, k) normalised, tok_slots/tok_w (T, K)."""
        info = [0] * self.info.numel()
        if active:
            left_seq, info[CPU_DENSE] = self._build_dense(qsl, lens, slots, weights)
            left_tok = torch.from_numpy(np.repeat(left_seq.numpy(), lens.numpy()))   # (T,)
            left = (tok_slots >= 0) & left_tok.unsqueeze(1)                         # (T, K)
            if bool(left.any()):
                self._build_buckets(tok_slots, tok_w, left, info)
        self.info.copy_(torch.tensor(info, dtype=torch.int64))

    def _build_dense(self, qsl, lens, slots, weights) -> tuple[torch.Tensor, int]:
        """Group requests by identical (slots, weights); groups of ≥ DENSE_MIN_TOKENS tokens become
        dense items. Returns the (num_seqs,) bool mask of the sequences left for the slot buckets, and
        the number of dense items."""
        ns = lens.numel()
        left = torch.ones((ns,), dtype=torch.bool)
        groups: dict[tuple, list[int]] = {}
        lens_l, qsl_l = lens.tolist(), qsl.tolist()
        for q, (srow, wrow) in enumerate(zip(slots.tolist(), weights.tolist())):
            key = tuple(sorted((s, w) for s, w in zip(srow, wrow) if s >= 0))
            if key and lens_l[q] > 0:
                groups.setdefault(key, []).append(q)
        n_items, tok_at = 0, 0
        for key, qs in groups.items():
            n = sum(lens_l[q] for q in qs)
            if n < self.dense_min_tokens:
                continue
            contiguous = all(qsl_l[a + 1] == qsl_l[b] for a, b in zip(qs, qs[1:]))
            self.cplan[n_items] = torch.tensor([qsl_l[qs[0]] if contiguous else -1, tok_at, tok_at + n])
            self.cslots[n_items].fill_(-1)
            self.cweights[n_items].zero_()
            self.cslots[n_items, :len(key)] = torch.tensor([s for s, _ in key])
            self.cweights[n_items, :len(key)] = torch.tensor([w for _, w in key], dtype=torch.float64)
            if not contiguous:
                toks = torch.cat([torch.arange(qsl_l[q], qsl_l[q + 1]) for q in qs])
                self.ctok[tok_at:tok_at + n].copy_(toks, non_blocking=True)
                tok_at += n
            n_items += 1
            left[qs] = False
        return left, n_items

    def _build_buckets(self, tok_slots, tok_w, valid, info: list) -> None:
        """Sort the (token, j) pairs by slot, bucket the slots by token count, pad each slot's
        token list to its bucket's M; one plan row per distinct slot, bucket rows into info.
        In numpy: on arrays of a step's size its calls cost ~1 µs where torch's cost ~10."""
        T, K = tok_slots.shape
        v = valid.numpy()
        tok = np.broadcast_to(np.arange(T, dtype=np.int64)[:, None], (T, K))[v]     # (P,)
        slot = tok_slots.numpy().astype(np.int64)[v]                                # (P,)
        w = tok_w.numpy()[v]                                                         # (P,)
        order = np.argsort(slot * T + tok, kind="stable")   # tokens of one slot are unique after merging
        tok, slot, w = tok[order], slot[order], w[order]
        uniq, pair_at, counts = np.unique(slot, return_index=True, return_counts=True)   # (G,)
        bucket = np.ceil(np.log2(counts)).astype(np.int64)                          # c in (2^(b-1), 2^b]
        by_bucket = np.argsort(bucket, kind="stable")                                # slot rows, bucket order
        uniq, counts, bucket, pair_at = uniq[by_bucket], counts[by_bucket], bucket[by_bucket], pair_at[by_bucket]
        G = uniq.size
        _, bk_sizes = np.unique(bucket, return_counts=True)                          # bucket is sorted
        M = np.zeros_like(counts)                                                    # (G,) padded length
        rows, r0, p0 = [], 0, 0
        for n_slots in bk_sizes.tolist():
            m = int(counts[r0:r0 + n_slots].max())
            M[r0:r0 + n_slots] = m
            rows.append((r0, r0 + n_slots, p0, m))
            r0, p0 = r0 + n_slots, p0 + n_slots * m
        begin = np.cumsum(M) - M                                                     # (G,) padded offsets
        # Padded layout: every position first takes its slot's first token with weight 0, then the
        # real pairs overwrite the first `count` positions.
        n_pad = p0
        pad_tok = np.repeat(tok[pair_at], M)                                         # (n_pad,)
        pad_w = np.zeros((n_pad,), dtype=np.float32)
        row_of_pair = np.repeat(np.arange(G), counts)                               # (P,) pairs, new row order
        j = np.arange(row_of_pair.size) - (np.cumsum(counts) - counts)[row_of_pair]   # index within its slot
        src, dst = pair_at[row_of_pair] + j, begin[row_of_pair] + j
        pad_tok[dst] = tok[src]
        pad_w[dst] = w[src]
        self.plan[:G].copy_(torch.from_numpy(np.stack([uniq, begin, begin + M, counts, bucket], axis=1)))
        self.pair_tok[:n_pad].copy_(torch.from_numpy(pad_tok), non_blocking=True)
        self.pair_w[:n_pad].copy_(torch.from_numpy(pad_w), non_blocking=True)
        info[CPU_GROUPS], info[CPU_PAIRS], info[CPU_BUCKETS] = G, n_pad, len(rows)
        for b, row in enumerate(rows):
            info[CPU_INFO_LEN + 4 * b: CPU_INFO_LEN + 4 * b + 4] = row


def delta_cpu(
    y: torch.Tensor,          # (T, n_slices*d_out), updated in place
    x: torch.Tensor,          # (T, d_in)
    a_pool: torch.Tensor,     # (n_slices, S, R, d_in)
    b_pool: torch.Tensor,     # (n_slices, S, d_out, R)
    slot_ranks: torch.Tensor, # (S,) int32
    pair_tok: torch.Tensor,   # (max_pairs,) int64
    pair_w: torch.Tensor,     # (max_pairs,) float32
    plan: torch.Tensor,       # (max_groups, 5) int64, host
    cplan: torch.Tensor,      # (max_seqs, 3) int64, host
    cslots: torch.Tensor,     # (max_seqs, K) int64, host
    cweights: torch.Tensor,   # (max_seqs, K) float64, host
    ctok: torch.Tensor,       # (max_tokens,) int64
    cpu_info: torch.Tensor,   # (CPU_INFO_LEN + 4·max_buckets,) int64, host
) -> None:
    info = cpu_info.tolist()
    dense_groups(y, x, a_pool, b_pool, slot_ranks, cplan, cslots, cweights, ctok, info)
    for b in range(info[CPU_BUCKETS]):
        row = info[CPU_INFO_LEN + 4 * b: CPU_INFO_LEN + 4 * b + 4]
        r0, r1, p0, m = row[BUCKET_ROW_BEGIN], row[BUCKET_ROW_END], row[BUCKET_PAIR_BEGIN], row[BUCKET_M]
        _slot_bucket(y, x, a_pool, b_pool, slot_ranks, plan[r0:r1, PLAN_SLOT],
                     pair_tok[p0:p0 + (r1 - r0) * m], pair_w[p0:p0 + (r1 - r0) * m], m)


def dense_groups(y, x, a_pool, b_pool, slot_ranks, cplan, cslots, cweights, ctok, info: list[int]) -> None:
    """The plan's dense groups (GEMMs over many tokens: torch's BLAS is the right tool for them)."""
    n = info[CPU_DENSE]
    if n:
        yv = y.unflatten(1, (a_pool.shape[0], b_pool.shape[2]))   # (T, n_slices, d_out) view
        _dense_groups(y, yv, x, a_pool, b_pool, slot_ranks.tolist(), cplan[:n].tolist(), cslots,
                      cslots[:n].tolist(), cweights[:n].tolist(), ctok)


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
