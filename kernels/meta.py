"""Per-step batch metadata for the multi-shard delta ops, in fixed-size buffers.

Math served by the ops (see `wrag_kernels/__init__.py`): for token t of a flat batch,
    y_t[slice] += Σ_{j<K} w_{t,j} · B[slice, s(t,j)] · (A[slice, s(t,j)] · x_t),   s = −1 → nothing.
Slots and weights are given per *sequence* (a request's tokens form one contiguous segment of the
batch); this module expands them to the layouts the backends read:

* segment layout (SGMV, prefill):  seq_start (max_seqs+1,), seq_slots / seq_weights (max_seqs, K)
* per-token layout (BGMV, decode):  token_slots / token_weights (max_tokens, K)
* plan for the CPU torch path (`torch_ops`), built here once per step so that the per-layer calls
  do no host work beyond launching torch ops; two kinds of work items:
  - dense groups: requests with the same (slots, weights) list and ≥ DENSE_MIN_TOKENS tokens in
    all (prefill, or decode where many requests share one shard list) run as one rank-Σr adapter:
    one GEMM for the shrink of every slot and slice, then the expands in place on y's rows.
    cplan (max_seqs, 3) = [contiguous_token_begin or −1, ctok_begin, ctok_end],
    cslots (max_seqs, K) int64, cweights (max_seqs, K) float64, ctok (max_tokens,) token ids.
  - slot buckets (everything else, e.g. decode with per-request shards): the (token, j) pairs
    grouped by slot; slots with a similar token count c share a bucket (c in (2^(b−1), 2^b]) and
    each bucket runs as batched GEMMs over its slots, every slot's token list padded to the
    bucket's largest count M (padding repeats the slot's first token with weight 0, so it adds
    an exact 0 to a row that is written anyway). Each distinct slot's factors are read once.
    plan (max_groups, 5) = one row per distinct slot, in bucket order: [slot, pair_begin,
    pair_end, count, bucket]; pair_tok / pair_w (2·max_tokens·K,) the padded (token, weight)
    lists, slot-major; plan_w is not read (kept for the op schema).
* host_info (9 + 4·max_buckets,) int64 on the CPU: [active, num_tokens, num_seqs, max_seq_len,
  max_slot, num_groups, num_pairs, num_concat, num_buckets] then per bucket [row_begin, row_end,
  pair_begin, M] — read by the ops on the host without a device sync.

Every buffer is allocated once in __init__ and overwritten in place by `fill`, so the tensors
captured by torch.compile / CUDA graphs stay valid across steps (only their contents change).
Padding tokens (t ≥ num_tokens) and padding sequences get slot −1 / weight 0 / empty segments.
`fill` also normalises each request's slot list: zero-weight slots are dropped and a slot listed
twice is merged into one entry with the summed weight (same math, fewer factor reads).
"""
from __future__ import annotations

import torch

# Columns of DeltaMeta.plan (one row per distinct slot of the slot-bucket path).
PLAN_SLOT, PLAN_PAIR_BEGIN, PLAN_PAIR_END, PLAN_COUNT, PLAN_BUCKET = range(5)
# Columns of DeltaMeta.cplan (one row per dense group).
CPLAN_TOK_BEGIN, CPLAN_BEGIN, CPLAN_END = range(3)
# Entries of DeltaMeta.host_info; bucket rows (4 entries each) follow from INFO_BUCKET_ROWS.
(INFO_ACTIVE, INFO_TOKENS, INFO_SEQS, INFO_MAX_SEQ_LEN, INFO_MAX_SLOT, INFO_GROUPS, INFO_PAIRS, INFO_CONCAT,
 INFO_BUCKETS, INFO_BUCKET_ROWS) = range(10)
BUCKET_ROW_BEGIN, BUCKET_ROW_END, BUCKET_PAIR_BEGIN, BUCKET_M = range(4)
# A request group this large runs dense: its one shrink GEMM and K in-place expands cost less than
# copying the K slots' factors for the batched slot path (and touch y's rows in place).
DENSE_MIN_TOKENS = 4


def _as_cpu(t, dtype) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.detach().to(device="cpu", dtype=dtype)
    return torch.as_tensor(t, dtype=dtype)


class DeltaMeta:
    """Fixed-size metadata buffers for `apply_delta`, updated in place once per step."""

    def __init__(self, max_tokens: int, max_seqs: int, k_max: int, device, build_plan: bool | None = None):
        if max_tokens < 1 or max_seqs < 1 or k_max < 1:
            raise ValueError("max_tokens, max_seqs and k_max must be >= 1")
        self.max_tokens, self.max_seqs, self.k_max = int(max_tokens), int(max_seqs), int(k_max)
        self.device = torch.device(device)
        # The slot-grouped plan only serves the torch path; Triton reads the segment/token layouts.
        self.build_plan = (self.device.type != "cuda") if build_plan is None else bool(build_plan)
        dev, T, N, K = self.device, self.max_tokens, self.max_seqs, self.k_max
        self.max_groups = min(N * K, T * K)
        self.token_slots = torch.full((T, K), -1, dtype=torch.int32, device=dev)      # (max_tokens, K)
        self.token_weights = torch.zeros((T, K), dtype=torch.float32, device=dev)     # (max_tokens, K)
        self.seq_start = torch.zeros((N + 1,), dtype=torch.int32, device=dev)         # (max_seqs+1,)
        self.seq_slots = torch.full((N, K), -1, dtype=torch.int32, device=dev)        # (max_seqs, K)
        self.seq_weights = torch.zeros((N, K), dtype=torch.float32, device=dev)       # (max_seqs, K)
        # Slot buckets pad each slot's token list to < 2x its length: 2·T·K padded pairs at most.
        self.max_pairs = 2 * T * K
        self.max_buckets = T.bit_length() + 1                  # token counts 1, 2, 3-4, 5-8, ...
        self.pair_tok = torch.zeros((self.max_pairs,), dtype=torch.int64, device=dev)  # (2*max_tokens*K,)
        self.pair_w = torch.zeros((self.max_pairs,), dtype=torch.float32, device=dev)  # (2*max_tokens*K,)
        # Host-side tables: the torch path reads them on the host, so keep them off the device.
        self.plan = torch.zeros((self.max_groups, 5), dtype=torch.int64)               # (max_groups, 5)
        self.plan_w = torch.zeros((self.max_groups,), dtype=torch.float64)             # (max_groups,)
        self.cplan = torch.zeros((N, 3), dtype=torch.int64)                            # (max_seqs, 3)
        self.cslots = torch.full((N, K), -1, dtype=torch.int64)                        # (max_seqs, K)
        self.cweights = torch.zeros((N, K), dtype=torch.float64)                       # (max_seqs, K)
        self.ctok = torch.zeros((T,), dtype=torch.int64, device=dev)                   # (max_tokens,)
        self.host_info = torch.zeros((INFO_BUCKET_ROWS + 4 * self.max_buckets,), dtype=torch.int64)

    # ---- convenience views of host_info (host ints; do not read these inside compiled code) ----
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
        tok_slots = h_seq_slots[:ns].repeat_interleave(lens, dim=0)        # (T, K)
        tok_w = h_seq_w[:ns].repeat_interleave(lens, dim=0)                # (T, K)
        h_tok_slots = torch.full((self.max_tokens, K), -1, dtype=torch.int32)
        h_tok_w = torch.zeros((self.max_tokens, K), dtype=torch.float32)
        h_tok_slots[:T] = tok_slots
        h_tok_w[:T] = tok_w

        valid = tok_slots >= 0                                              # (T, K)
        n_valid = int(valid.sum())
        active_seq = (h_seq_slots[:ns] >= 0).any(dim=1) & (lens > 0)
        info = [0] * self.host_info.numel()
        info[:INFO_BUCKETS] = [int(n_valid > 0), T, ns, int(lens.max()) if ns > 0 else 0,
                               int(slots.max()) if slots.numel() else -1, 0, 0, 0]
        if not bool(active_seq.any()):
            info[INFO_MAX_SLOT] = -1

        self.token_slots.copy_(h_tok_slots, non_blocking=True)
        self.token_weights.copy_(h_tok_w, non_blocking=True)
        self.seq_start.copy_(h_start, non_blocking=True)
        self.seq_slots.copy_(h_seq_slots, non_blocking=True)
        self.seq_weights.copy_(h_seq_w, non_blocking=True)
        if self.build_plan and n_valid > 0:
            seq_of_tok = torch.arange(ns).repeat_interleave(lens)                  # (T,)
            left_seq = self._build_dense(qsl, lens, slots, weights)                 # (ns,) bool
            info[INFO_CONCAT] = self._n_dense
            left = valid & left_seq[seq_of_tok].unsqueeze(1)                        # (T, K)
            if bool(left.any()):
                self._build_buckets(tok_slots, tok_w, left, info)
        self.host_info.copy_(torch.tensor(info, dtype=torch.int64))

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

    def _build_dense(self, qsl, lens, slots, weights) -> torch.Tensor:
        """Group requests by identical (slots, weights); groups of ≥ DENSE_MIN_TOKENS tokens become
        dense items. Returns a (num_seqs,) bool mask of the sequences left for the slot buckets."""
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
            if n < DENSE_MIN_TOKENS:
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
        self._n_dense = n_items
        return left

    def _build_buckets(self, tok_slots, tok_w, valid, info: list) -> None:
        """Sort the (token, j) pairs by slot, bucket the slots by token count, pad each slot's
        token list to its bucket's M; one plan row per distinct slot, bucket rows into info."""
        T, K = tok_slots.shape
        tok = torch.arange(T, dtype=torch.int64).unsqueeze(1).expand(T, K)[valid]   # (P,)
        slot = tok_slots.to(torch.int64)[valid]                                    # (P,)
        w = tok_w[valid]                                                            # (P,)
        order = torch.argsort(slot * T + tok)      # tokens of one slot are unique after merging
        tok, slot, w = tok[order], slot[order], w[order]
        uniq, counts = torch.unique_consecutive(slot, return_counts=True)           # (G,)
        bucket = torch.ceil(torch.log2(counts.double())).long()                     # (G,) c in (2^(b-1), 2^b]
        by_bucket = torch.argsort(bucket, stable=True)                              # slot rows, bucket order
        pair_at = counts.cumsum(0) - counts                                          # first pair of each slot
        uniq, counts, bucket, pair_at = uniq[by_bucket], counts[by_bucket], bucket[by_bucket], pair_at[by_bucket]
        G = uniq.numel()
        _, bk_sizes = torch.unique_consecutive(bucket, return_counts=True)
        M = torch.zeros_like(counts)                                                 # (G,) padded length
        rows, r0, p0 = [], 0, 0
        for n_slots in bk_sizes.tolist():
            m = int(counts[r0:r0 + n_slots].max())
            M[r0:r0 + n_slots] = m
            rows.append((r0, r0 + n_slots, p0, m))
            r0, p0 = r0 + n_slots, p0 + n_slots * m
        begin = M.cumsum(0) - M                                                      # (G,) padded offsets
        # Padded layout: every position first takes its slot's first token with weight 0, then the
        # real pairs overwrite the first `count` positions.
        n_pad = p0
        pad_tok = tok[pair_at].repeat_interleave(M)                                  # (n_pad,)
        pad_w = torch.zeros((n_pad,), dtype=torch.float32)
        row_of_pair = torch.repeat_interleave(torch.arange(G), counts)              # (P,) pairs, new row order
        j = torch.arange(row_of_pair.numel()) - (counts.cumsum(0) - counts)[row_of_pair]   # index within its slot
        src, dst = pair_at[row_of_pair] + j, begin[row_of_pair] + j
        pad_tok[dst] = tok[src]
        pad_w[dst] = w[src]
        self.plan[:G].copy_(torch.stack([uniq, begin, begin + M, counts, bucket], dim=1))
        self.pair_tok[:n_pad].copy_(pad_tok, non_blocking=True)
        self.pair_w[:n_pad].copy_(pad_w, non_blocking=True)
        info[INFO_GROUPS], info[INFO_PAIRS], info[INFO_BUCKETS] = G, n_pad, len(rows)
        for b, row in enumerate(rows):
            info[INFO_BUCKET_ROWS + 4 * b: INFO_BUCKET_ROWS + 4 * b + 4] = row
