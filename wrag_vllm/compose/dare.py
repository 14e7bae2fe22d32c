"""DARE (drop and rescale; dense reference; for offline comparison and `wrag merge` only).

Citation: Yu, Yu, Yu, Huang & Li 2024, "Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch", ICML (arXiv 2311.03099). Same definition as
peft.utils.merge_utils.dare_linear / dare_ties.

Math, element-wise on the dense deltas ΔW_i:
  1. drop:     D_i = ΔW_i ⊙ m_i / density,   m_i ~ Bernoulli(density) per entry (E[D_i] = ΔW_i)
  2. combine:  "linear": ΔW = Σ_i w_i·D_i;   "ties": TIES steps 2–3 (sign election, disjoint mean)

Deterministic: the masks come from a torch.Generator seeded from (seed, layer, projection), so the
same request gives the same composite on every run and in every process, independent of which
other modules exist or in which order entries are processed. Shard i's mask is the i-th draw in
the canonical shard order that `compose` fixes (sorted by id, weight).

No factor-space form: a random entry mask of B_i·A_i is not a function of the cores (and it makes
the delta full-rank). `compose` converts the result back to factors by truncated SVD (rank =
max_rank, default Σ r_i; or an energy fraction): an approximation.
"""
from __future__ import annotations

import zlib

import torch

from .registry import Method, register
from .ties import ties_merge


@register
class Dare(Method):
    name = "dare"
    citation = "Yu et al. 2024, DARE, Language Models are Super Mario (arXiv 2311.03099)"
    factor_space = False
    # density 0.5: a mild drop rate (the paper tolerates up to 0.9 drop); provisional
    defaults = {"density": 0.5, "seed": 0, "combine": "linear", "sign": "total"}

    def check(self):
        self._float("density", lo=0.0, hi=1.0, lo_open=True)
        self._int("seed", lo=0)
        self._choice("combine", ("linear", "ties"))
        self._choice("sign", ("total", "frequency"))

    def generator(self, key, device) -> torch.Generator:
        layer, module = key
        s = zlib.crc32(f"{self.params['seed']}:{layer}:{module}".encode())
        return torch.Generator(device=device).manual_seed(s)

    def dense(self, deltas, w, ranks, key=(0, "")):
        # deltas: (k, d_out, d_in)
        d = self.params["density"]
        g = self.generator(key, deltas.device)
        if d < 1:
            # masks drawn in float32 whatever the deltas' dtype, so fp32 and fp64 runs agree
            D = torch.stack([x * torch.bernoulli(torch.full(x.shape, d, device=x.device), generator=g).to(x.dtype) / d
                             for x in deltas])
        else:
            D = deltas
        if self.params["combine"] == "ties":
            return ties_merge(D, w, self.params["sign"])
        return torch.einsum("k,kij->ij", w.to(D.dtype), D)
