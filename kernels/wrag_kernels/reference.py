"""Dense reference for the delta ops (tests and benchmarks only; never used for serving).

    ΔW[i, s] = B[i, s, :, :r_s] · A[i, s, :r_s, :]                     (d_out, d_in), materialised
    y_t[i]  += Σ_j w_{t,j} · ΔW[i, s(t,j)] · x_t                        plain matmul, fp64 accumulate
"""
from __future__ import annotations

import torch


def dense_delta_reference(
    y: torch.Tensor,            # (T, n_slices*d_out)
    x: torch.Tensor,            # (T, d_in)
    a_pool: torch.Tensor,       # (n_slices, S, R, d_in)
    b_pool: torch.Tensor,       # (n_slices, S, d_out, R)
    slot_ranks,                 # (S,) ints
    query_start_loc,            # (num_seqs+1,) ints
    seq_slots,                  # (num_seqs, k) ints, -1 empty
    seq_weights,                # (num_seqs, k) floats
) -> torch.Tensor:
    """Return y + delta in float64 (y itself is not modified)."""
    n_slices, _, _, _ = a_pool.shape
    d_out = b_pool.shape[2]
    ranks = [int(r) for r in torch.as_tensor(slot_ranks).tolist()]
    qsl = [int(v) for v in torch.as_tensor(query_start_loc).tolist()]
    slots = torch.as_tensor(seq_slots).tolist()
    weights = torch.as_tensor(seq_weights, dtype=torch.float64).tolist()
    out = y.detach().to("cpu", torch.float64).clone()
    xd = x.detach().to("cpu", torch.float64)
    dense: dict[tuple[int, int], torch.Tensor] = {}
    for q in range(len(qsl) - 1):
        rows = slice(qsl[q], qsl[q + 1])
        for s, w in zip(slots[q], weights[q]):
            if s < 0 or w == 0.0:
                continue
            r = ranks[s]
            for i in range(n_slices):
                if (i, s) not in dense:
                    a = a_pool[i, s, :r].detach().to("cpu", torch.float64)
                    b = b_pool[i, s, :, :r].detach().to("cpu", torch.float64)
                    dense[(i, s)] = b @ a                                  # (d_out, d_in)
                out[rows, i * d_out:(i + 1) * d_out] += w * (xd[rows] @ dense[(i, s)].t())
    return out
