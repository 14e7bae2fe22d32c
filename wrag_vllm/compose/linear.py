"""Linear composition (task arithmetic): ΔW = Σ_i w_i·ΔW_i.

Citation: Ilharco et al. 2023, "Editing Models with Task Arithmetic", ICLR (arXiv 2212.04089).

Math. Σ_i w_i·s_i·B_i·A_i = B_cat·A_cat with A_cat = [A_1; …; A_k] and
B_cat = [w_1·s_1·B_1 … w_k·s_k·B_k]: ONE low-rank delta of rank ≤ Σ r_i, exact for any ranks.
`compose` returns exactly this concatenation (no linear algebra at all: the serving fast path).
With max_rank / energy it goes through core space instead (core_space.py): ΔW_i = Q_B·M_i·Q_Aᵀ,
so Σ w_i·ΔW_i = Q_B·(Σ w_i·M_i)·Q_Aᵀ, the composite core is F = Σ_i w_i·M_i, and the SVD of F
gives the orthogonal, numerically-minimal-rank form (duplicates collapse) to truncate.

Weights are used as given (no normalisation): w = (1, 1) adds both deltas in full, as PRAG does;
pass weights that sum to 1 for an average.

Not LoRAX's "linear" merge: LoRAX forms (Σ w_i·B_i)·(Σ_j w_j·A_j), which contains the cross terms
w_i·w_j·B_i·A_j (i ≠ j) and needs equal ranks; this rule has no cross terms.
"""
from __future__ import annotations

import torch

from .registry import Method, register


@register
class Linear(Method):
    name = "linear"
    citation = "Ilharco et al. 2023, Editing Models with Task Arithmetic (arXiv 2212.04089)"
    defaults = {}
    concatenates = True

    def cores(self, M, w, ranks):
        # M: (k, G, nB, nA)   w: (k,)
        return torch.einsum("k,kgij->gij", w.to(M.dtype), M)

    def dense(self, deltas, w, ranks, key=(0, "")):
        # deltas: (k, d_out, d_in)
        return torch.einsum("k,kij->ij", w.to(deltas.dtype), deltas)
