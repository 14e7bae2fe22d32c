"""Shared builders for the wrag_kernels tests: a mixed batch with 0/1/3/8 shards per request,
heterogeneous ranks, and factor rows beyond each slot's rank poisoned with NaN (so any read past
r_s, of an empty slot, or of another slot for a "no shard" token shows up as NaN)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from wrag_kernels import DeltaMeta
from wrag_kernels.reference import dense_delta_reference

# Relative tolerance (to max |reference|) per dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}

# Per request: (length in prefill layout, slot list, weights). Covers 0, 1, 3 and 8 shards, a
# duplicate slot, a zero weight, an empty (rank-0) slot, two requests with the same 3 shards (one
# non-contiguous concat group), a 17-token 8-shard request (contiguous concat group), an empty
# sequence, and slot-grouped requests sharing slots with different weights.
REQUESTS = [
    (5, [0, 1, 2], [0.5, 1.0, -0.75]),
    (1, [], []),
    (17, [0, 1, 2, 3, 4, 5, 6, 7], [1.0, 0.5, 0.25, 1.0, -1.0, 0.3, 0.7, 2.0]),
    (3, [4], [1.0]),
    (20, [0, 1, 2], [0.5, 1.0, -0.75]),
    (2, [], []),
    (0, [1], [1.0]),
    (4, [5, 5, 8], [0.5, 0.25, 1.5]),
    (3, [4, 9, 6], [2.0, 0.0, 1.0]),
    (6, [-1, 9, -1], [1.0, 1.0, 1.0]),
]
RANKS = [16, 4, 8, 0, 1, 16, 12, 7, 3, 16]     # slot 3 is empty; pool R = 16, fully occupied


@dataclass
class Problem:
    y: torch.Tensor          # (T, n_slices*d_out)
    x: torch.Tensor          # (T, d_in)
    a_pool: torch.Tensor     # (n_slices, S, R, d_in)
    b_pool: torch.Tensor     # (n_slices, S, d_out, R)
    slot_ranks: torch.Tensor  # (S,) int32
    qsl: torch.Tensor        # (num_seqs+1,)
    slots: torch.Tensor      # (num_seqs, k)
    weights: torch.Tensor    # (num_seqs, k)
    meta: DeltaMeta
    no_shard_rows: torch.Tensor  # (T,) bool — tokens whose request has no (non-zero) shard

    def reference(self) -> torch.Tensor:
        return dense_delta_reference(self.y, self.x, self.a_pool, self.b_pool, self.slot_ranks,
                                     self.qsl, self.slots, self.weights)


def make_problem(layout: str = "prefill", n_slices: int = 2, dtype=torch.float32, seed: int = 0,
                 d_in: int = 40, d_out: int = 36, requests=REQUESTS, ranks=RANKS, R: int = 16,
                 k_max: int = 8, poison: bool = True, backend: str = "torch") -> Problem:
    """layout: "prefill" (request lengths as listed) or "decode" (every request 1 token)."""
    g = torch.Generator().manual_seed(seed)
    S = len(ranks)
    a = torch.randn(n_slices, S, R, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(n_slices, S, R, d_out, generator=g).transpose(2, 3) / R ** 0.5   # the serving layout
    if poison:
        for s, r in enumerate(ranks):
            a[:, s, r:] = float("nan")
            b[:, s, :, r:] = float("nan")
    lens = [ln if layout == "prefill" else 1 for ln, _, _ in requests]
    qsl = torch.tensor([0] + lens).cumsum(0)
    slots = torch.full((len(requests), k_max), -1, dtype=torch.int32)
    weights = torch.zeros((len(requests), k_max))
    no_shard = []
    for q, (_, s_list, w_list) in enumerate(requests):
        slots[q, :len(s_list)] = torch.tensor(s_list, dtype=torch.int32)
        weights[q, :len(w_list)] = torch.tensor(w_list)
        has = any(s >= 0 and w != 0 for s, w in zip(s_list, w_list))
        no_shard += [not has] * lens[q]
    T = int(qsl[-1])
    x = torch.randn(T, d_in, generator=g).to(dtype)
    y = torch.randn(T, n_slices * d_out, generator=g).to(dtype)
    meta = DeltaMeta(max_tokens=T + 3, max_seqs=len(requests) + 2, k_max=k_max, device="cpu", backend=backend)
    meta.fill(qsl, slots, weights)
    return Problem(y, x, a.to(dtype), b.to(dtype), torch.tensor(ranks, dtype=torch.int32), qsl, slots,
                   weights, meta, torch.tensor(no_shard, dtype=torch.bool))


def assert_matches(out: torch.Tensor, p: Problem) -> None:
    """out ≈ dense reference; no-shard rows bit-exact; no NaN leaked from poisoned rows."""
    ref = p.reference()
    assert torch.isfinite(out).all(), "a poisoned factor row (beyond rank / empty slot) was read"
    assert torch.equal(out[p.no_shard_rows], p.y[p.no_shard_rows]), "no-shard rows changed"
    scale = ref.abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL[out.dtype] * scale, f"max error {err:.3g} > {TOL[out.dtype]} x {scale:.3g}"
    # The delta is not negligible, so this comparison is meaningful.
    assert (ref - p.y.double()).abs().max().item() > 0.1 * scale
