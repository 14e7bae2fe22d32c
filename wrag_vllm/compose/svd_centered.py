"""SVD-centered merging (the WRAG default): centre on the weighted mean, keep each deviation's top
singular directions, drop the tail.

Citation: the published form is CART — Choi, Kim, Lee & Hong 2024, "Revisiting Weight Averaging for
Model Merging" (arXiv 2412.12153): θ = θ_0 + μ + λ·Σ_t SVD_ρ(τ_t − μ). WRAG applies it per request
to the retrieved shards, with relevance weights.

Math. Weights w_i ≥ 0 (zero weights already dropped). Split them into a total mass and a
distribution:   W = Σ_i w_i,   p_i = w_i / W   (Σ p_i = 1).

    μ   = Σ_i p_i·ΔW_i                              weighted mean (centre)
    D_i = ΔW_i − μ                                  centred deviation;  Σ_i p_i·D_i = 0
    ΔW  = W·( μ + λ·Σ_i p_i·SVD_ρ(D_i) )            SVD_ρ = best rank-ρ approximation

Normalisation (decided here): the mean uses p (weights normalised to sum 1), so it is a true
centre and Σ p_i·D_i = 0 holds exactly; the result is scaled back by the mass W, so the rule is
homogeneous of degree 1 in w exactly like `linear`. Consequence — without truncation (ρ ≥ rank of
every D_i) SVD_ρ(D_i) = D_i and
    ΔW = W·(μ + λ·Σ p_i·D_i) = W·μ = Σ_i w_i·ΔW_i = linear,   for every λ.
For weights that already sum to 1 (e.g. a softmax over retrieval scores) W = 1 and this is the
issue's formula μ + λ·Σ w_i·SVD_ρ(ΔW_i − μ) verbatim. Relation to CART (uniform weights over T
tasks, no p_i in its sum): λ_CART = λ / T.

What truncation does: Σ p_i·SVD_ρ(D_i) = −Σ p_i·tail_ρ(D_i), so the rule is
μ − λ·Σ p_i·tail_ρ(D_i): for near-orthogonal shards the top-ρ part of D_i is ≈ (1 − p_i)·ΔW_i (the
shard's own signal) and the tail is the other shards' leakage through μ; the net effect restores
each shard's own directions that plain averaging dilutes (e.g. uniform k = 3, λ = 1: each shard's
own directions get weight ≈ 1/3 + 2/9 instead of 1/3, before the mass W).

Small k, where the mean is a weak estimate:
  k = 1: μ = ΔW_1, D_1 = 0, so ΔW = w_1·ΔW_1 — the shard itself, scaled by its weight.
  k = 2: D_1 = p_2·(ΔW_1 − ΔW_2) and D_2 = −p_1·(ΔW_1 − ΔW_2) are the same matrix up to sign and
         scale. SVD_ρ is scale-covariant and ρ is shared (or energy-based, which is scale-free), so
         p_1·SVD_ρ(D_1) + p_2·SVD_ρ(D_2) = p_1·p_2·(SVD_ρ(Δ) − SVD_ρ(Δ)) = 0: the result is
         exactly linear. Centering needs k ≥ 3 to differ from task arithmetic.

Parameters (the defaults and the sweep behind them: docs/decisions.md):
  lam        λ = 1.0   (CART's λ/T at T tasks; 1.0 = add the kept deviations back in full)
  rho        ρ as a rank: default None → ρ = max_i r_i at that (layer, projection), the rank a single
             shard carries (CART's best ρ is ~8% of full rank; a rank-r shard is already that small)
  rho_energy ρ as an energy fraction in (0, 1]: per deviation, the fewest top directions holding that
             fraction of ‖D_i‖_F². Exclusive with rho. 1.0 = no truncation (= linear).

Factor space: all ΔW_i = Q_B·M_i·Q_Aᵀ (core_space.py), and μ, D_i, SVD_ρ(D_i) carry over to cores
(SVD commutes with orthonormal bases), so the rule runs on (≤Σr)×(≤Σr) cores: k small batched SVDs.
"""
from __future__ import annotations

from ..errors import ComposeError
from .core_space import svd_truncate
from .registry import Method, register


@register
class SVDCentered(Method):
    name = "svd-centered"
    citation = ("Choi, Kim, Lee & Hong 2024, Revisiting Weight Averaging for Model Merging (CART), "
                "arXiv 2412.12153")
    defaults = {"lam": 1.0, "rho": None, "rho_energy": None}

    def check(self):
        self._float("lam", lo=0.0, hi=4.0)  # < 0 would subtract the deviations; > 4 only overshoots
        self._int("rho", lo=1, allow_none=True)
        self._float("rho_energy", lo=0.0, hi=1.0, lo_open=True, allow_none=True)
        if self.params["rho"] is not None and self.params["rho_energy"] is not None:
            raise ComposeError("method 'svd-centered': give rho (a rank) or rho_energy (a fraction), not both")

    def _rho(self, ranks):
        """rank limit: the rho param, or max_i r_i per entry (ranks: (..., k)) when neither is set."""
        if self.params["rho"] is not None:
            return self.params["rho"]
        if self.params["rho_energy"] is not None:
            return None
        return ranks.max(-1).values

    def _combine(self, X, w, rho):
        # X: (k, *batch, m, n) deltas or cores; w: (k,); rho: None, int or (*batch,) tensor
        W = w.sum()
        p = (w / W).to(X.dtype).reshape(-1, *([1] * (X.dim() - 1)))
        mu = (p * X).sum(0)
        kept = svd_truncate(X - mu, rho, self.params["rho_energy"])
        return W.to(X.dtype) * (mu + self.params["lam"] * (p * kept).sum(0))

    def cores(self, M, w, ranks):
        # M: (k, G, nB, nA); ranks: (G, k) -> rho per entry g, broadcast over k
        return self._combine(M, w, self._rho(ranks))

    def dense(self, deltas, w, ranks, key=(0, "")):
        # deltas: (k, d_out, d_in); ranks: (k,)
        return self._combine(deltas, w, self._rho(ranks))
