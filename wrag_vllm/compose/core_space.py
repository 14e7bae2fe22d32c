"""Factor-space linear algebra: compose low-rank deltas without forming a dense d_out×d_in matrix.

For one (layer, projection) and shards i = 1..k with ΔW_i = s_i·B_i·A_i (B_i: d_out×r_i,
A_i: r_i×d_in), stack the factors

    B_cat = [B_1 … B_k]             (d_out × K),  K = Σ r_i
    A_cat = [A_1; …; A_k]           (K × d_in)

and take thin QR decompositions B_cat = Q_B·R_B and A_catᵀ = Q_A·R_A (Q orthonormal, R small).
Then B_i = Q_B·R_B[:, c_i] and A_i = R_A[:, c_i]ᵀ·Q_Aᵀ (c_i = shard i's columns), so

    ΔW_i = Q_B · M_i · Q_Aᵀ,        M_i = R_B[:, c_i] · s_i · R_A[:, c_i]ᵀ     (≤K × ≤K core)

Every ΔW_i lives in span(Q_B) × span(Q_A), and because Q_B, Q_A have orthonormal columns,
sums, scalings and SVDs commute with the change of basis: SVD(Q_B·M·Q_Aᵀ) = (Q_B·U)·Σ·(Q_A·V)ᵀ.
So a composition rule made of those operations runs on the K×K cores, and the composite
F (a K×K core) is rebuilt as factors with one small SVD F = U·Σ·Vᵀ:

    B = Q_B·U[:, :q]        (d_out × q)       A = diag(Σ[:q])·V[:, :q]ᵀ·Q_Aᵀ   (q × d_in)

q = numerical rank of F (≤ K = Σ r_i), optionally lowered by `max_rank` / `energy`.
Cost O((d_in + d_out)·K²) per projection instead of O(d_out·d_in·K) for the dense sum (and far more
for dense SVDs). This is the Core Space construction (mergekit `merge_methods/core_space.py`;
"Accurate and Efficient Low-Rank Model Merging in Core Space", Panariello et al., NeurIPS 2025).

Robustness: Householder QR gives B_cat = Q_B·R_B with orthonormal Q_B even when B_cat is
rank-deficient (duplicate shards, zero padding, shards lacking the module): the extra columns of
Q_B are then arbitrary orthonormal directions with zero coefficients, harmless. Rank is detected
once, on the final core, where directions below RANK_RTOL·σ_max are dropped. Cores are handled
in float64 (they are tiny) so that fp32 noise of the QR is the only error source.

All (layer, projection) entries with the same (d_out, d_in) are processed as one batch (G entries):
one batched QR per side, one batched SVD per step, no per-entry Python loops on the device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Directions of the composite whose singular value is below RANK_RTOL·σ_max are dropped: they are
# fp32 round-off of the QR (~1e-7 relative), with margin. Dropping one changes ΔW by < 1e-5·‖ΔW‖₂.
RANK_RTOL = 1e-5


def keep_mask(S: torch.Tensor, rank=None, energy: float | None = None) -> torch.Tensor:
    """Which singular directions to keep, as a bool mask like S (…, m), S sorted descending.

    rank:   keep the top `rank` (an int, or a tensor broadcastable to S[..., 0]).
    energy: keep the fewest top directions whose squared singular values reach `energy` of the
            total: direction j is kept iff Σ_{i<j} σ_i² < energy·Σ σ_i² (exclusive prefix sum).
    Both given: both limits apply. Neither: keep all.
    """
    keep = torch.ones_like(S, dtype=torch.bool)
    if rank is not None:
        idx = torch.arange(S.shape[-1], device=S.device)
        r = torch.as_tensor(rank, device=S.device)
        keep &= idx < r.unsqueeze(-1) if r.dim() else idx < r
    if energy is not None:
        e = S.double() ** 2
        before = torch.cumsum(e, -1) - e
        keep &= before < energy * e.sum(-1, keepdim=True)
    return keep


def rank_mask(S: torch.Tensor) -> torch.Tensor:
    """Numerical-rank mask: σ_j > RANK_RTOL·σ_max (all False for a zero matrix)."""
    return S > RANK_RTOL * S[..., :1].clamp_min(torch.finfo(S.dtype).tiny)


def svd_truncate(X: torch.Tensor, rank=None, energy: float | None = None) -> torch.Tensor:
    """SVD_ρ(X): the best rank-ρ approximation, batched over leading dims. X: (…, m, n)."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    S = S * keep_mask(S, rank, energy)
    return (U * S.unsqueeze(-2)) @ Vh


def stack_group(parts: list[list], ranks: torch.Tensor, d_out: int, d_in: int, device, k: int):
    """Stack the factors of G entries × k shards into zero-padded batches.

    parts[g][i]: Factors of shard i at entry g, or None (missing module = zero delta).
    ranks: (G, k) int64, the rank of each (entry, shard), 0 where missing.
    Returns B_cat (G, d_out, K) f32, A_cat (G, K, d_in) f32, scale (G, K) f32, cols list[slice].
    Shard i gets R_i = max_g ranks[g, i] columns; shorter factors are zero-padded (their extra
    columns add nothing: zero coefficient in the core).
    """
    G = len(parts)
    R = ranks.max(0).values.tolist()
    Bs, As, Ss, cols, c0 = [], [], [], [], 0
    for i in range(k):
        cols.append(slice(c0, c0 + R[i]))
        c0 += R[i]
        if R[i] == 0:
            continue
        b_list, a_list, s_list = [], [], []
        for g in range(G):
            f = parts[g][i]
            if f is None:
                b_list.append(torch.zeros(d_out, R[i], device=device))
                a_list.append(torch.zeros(R[i], d_in, device=device))
                s_list.append(0.0)
                continue
            pad = R[i] - f.rank
            b, a = f.B.to(device=device, dtype=torch.float32), f.A.to(device=device, dtype=torch.float32)
            b_list.append(F.pad(b, (0, pad)) if pad else b)        # (d_out, R_i)
            a_list.append(F.pad(a, (0, 0, 0, pad)) if pad else a)  # (R_i, d_in)
            s_list.append(float(f.scale))
        Bs.append(torch.stack(b_list))
        As.append(torch.stack(a_list))
        Ss.append(torch.tensor(s_list, dtype=torch.float32, device=device)[:, None].expand(G, R[i]))
    B_cat = torch.cat(Bs, 2)   # (G, d_out, K)
    A_cat = torch.cat(As, 1)   # (G, K, d_in)
    scale = torch.cat(Ss, 1)   # (G, K)
    return B_cat, A_cat, scale, cols


def bases_and_cores(B_cat: torch.Tensor, A_cat: torch.Tensor, scale: torch.Tensor, cols: list[slice]):
    """Q_B (G, d_out, nB), Q_A (G, d_in, nA) and cores M (k, G, nB, nA) float64.

    B_cat: (G, d_out, K)   A_cat: (G, K, d_in)   scale: (G, K)
    nB = min(d_out, K), nA = min(d_in, K) (reduced QR). ΔW_i[g] = Q_B[g]·M[i, g]·Q_A[g]ᵀ.
    """
    Q_B, R_B = torch.linalg.qr(B_cat)              # (G, d_out, nB), (G, nB, K)
    Q_A, R_A = torch.linalg.qr(A_cat.mT)           # (G, d_in, nA), (G, nA, K)
    RBs = R_B.double() * scale.double().unsqueeze(1)   # s_i folded into shard i's columns
    RA = R_A.double()
    M = torch.stack([RBs[..., c] @ RA[..., c].mT for c in cols])   # (k, G, nB, nA)
    return Q_B, Q_A, M


def core_to_factors(Fc: torch.Tensor, Q_B: torch.Tensor, Q_A: torch.Tensor, max_rank=None,
                    energy: float | None = None):
    """Rebuild factors from composite cores.  Fc: (G, nB, nA) float64.

    Returns (B_all (G, d_out, q_max) f32, A_all (G, q_max, d_in) f32, q: list[int] per entry);
    entry g's factors are B_all[g, :, :q[g]], A_all[g, :q[g]] with singular values folded into A.
    """
    U, S, Vh = torch.linalg.svd(Fc, full_matrices=False)   # (G,nB,m) (G,m) (G,m,nA)
    keep = rank_mask(S) & keep_mask(S, max_rank, energy)
    q = keep.sum(-1).tolist()                                # one host sync per group
    q_max = max(q, default=0)
    if q_max == 0:
        return None, None, q
    B_all = Q_B @ U[..., :q_max].to(Q_B.dtype)                                    # (G, d_out, q_max)
    A_all = (S[:, :q_max, None] * Vh[:, :q_max]).to(Q_A.dtype) @ Q_A.mT          # (G, q_max, d_in)
    return B_all, A_all, q


def dense_to_factors(X: torch.Tensor, rank: int | None, energy: float | None, seed: int = 0,
                     oversample: int = 10, power_iters: int = 4):
    """Truncated SVD of a dense matrix X (d_out, d_in) as factors (A (q, d_in), B (d_out, q)), Σ in A.

    Exact SVD when the kept rank is a sizable part of min(d_out, d_in); otherwise a seeded
    randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.4: `power_iters` subspace
    iterations, `oversample` extra columns), deterministic for a given seed. With `energy`, the
    fraction is measured against ‖X‖_F² (exact), over the directions the range finder returns.
    Returns None for a (numerically) zero X.
    """
    m, n = X.shape
    X = X.float()
    cap = min(m, n) if rank is None else min(rank, m, n)
    width = cap + oversample
    if 3 * width >= min(m, n):
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
        total = None
    else:
        g = torch.Generator(device=X.device).manual_seed(seed)
        Y = X @ torch.randn(n, width, generator=g, device=X.device)
        for _ in range(power_iters):   # re-orthonormalise between products for stability
            Y = X @ (X.mT @ torch.linalg.qr(Y).Q)
        Q = torch.linalg.qr(Y).Q                       # (m, width) basis of X's top range
        Ub, S, Vh = torch.linalg.svd(Q.mT @ X, full_matrices=False)
        U = Q @ Ub
        total = (X.double() ** 2).sum()
    keep = keep_mask(S, cap, None) & rank_mask(S)
    if energy is not None:
        e = S.double() ** 2
        tot = e.sum() if total is None else total
        keep &= (torch.cumsum(e, 0) - e) < energy * tot
    q = int(keep.sum())
    if q == 0:
        return None
    return (S[:q, None] * Vh[:q]).contiguous(), U[:, :q].contiguous()
