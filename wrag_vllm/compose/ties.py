"""TIES merging (dense reference; for offline comparison and `wrag merge` only).

Citation: Yadav, Tam, Choshen, Raffel & Bansal 2023, "TIES-Merging: Resolving Interference When
Merging Models", NeurIPS (arXiv 2306.01708). Same definition as peft.utils.merge_utils.ties (which
LoRAX also uses), so results are comparable with theirs (a test checks equality).

Math, element-wise on the dense deltas ΔW_i (d_out × d_in):
  1. trim:   T_i = ΔW_i ⊙ 1[|ΔW_i| among the top ⌊density·d_out·d_in⌋ magnitudes of ΔW_i]
  2. elect:  γ = sign(Σ_i T_i)  per entry ("total" mass; "frequency" = Σ_i sign(T_i)); γ = + on ties
  3. merge:  ΔW = Σ_i w_i·T_i·1[sign T_i = γ]  /  max(1, #{i : sign T_i = γ})
(Entries where T_i = 0 count as agreeing only when γ would be 0, i.e. never after step 2; PEFT's rule.)

No factor-space form: trimming and sign election act on individual entries of B_i·A_i, which are
not functions of the cores. The result is generally full-rank; `compose` converts it back to
factors with a truncated SVD (rank = max_rank, default Σ r_i; or an energy fraction): an
approximation, unlike the factor-space rules.
"""
from __future__ import annotations

import torch

from .registry import Method, register


def trim_magnitude(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ⌊density·numel⌋ entries of x by magnitude, zero the rest."""
    if density >= 1:
        return x
    flat = x.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[torch.topk(flat.abs(), k=int(density * flat.numel()), largest=True).indices] = 1
    return x * keep.reshape(x.shape)


def ties_merge(T: torch.Tensor, w: torch.Tensor, sign_method: str = "total") -> torch.Tensor:
    """Steps 2–3 on already-trimmed tensors.  T: (k, d_out, d_in), w: (k,)."""
    s = T.sign()
    mass = T.sum(0) if sign_method == "total" else s.sum(0)
    agree = s == torch.where(mass >= 0, 1, -1)
    weighted = T * w.to(T.dtype).reshape(-1, 1, 1)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


@register
class Ties(Method):
    name = "ties"
    citation = "Yadav et al. 2023, TIES-Merging (arXiv 2306.01708)"
    factor_space = False
    # density 0.2 = the TIES paper's top-20% trim (provisional for LoRA deltas)
    defaults = {"density": 0.2, "sign": "total"}

    def check(self):
        self._float("density", lo=0.0, hi=1.0, lo_open=True)
        self._choice("sign", ("total", "frequency"))

    def dense(self, deltas, w, ranks, key=(0, "")):
        # deltas: (k, d_out, d_in)
        T = torch.stack([trim_magnitude(d, self.params["density"]) for d in deltas])
        return ties_merge(T, w, self.params["sign"])
