"""Extract a shard from a full fine-tune: ΔW = W_ft − W_base, truncated SVD per FFN projection.

For each layer l and projection p:
    ΔW = U·Σ·Vᵀ  (randomized: torch.svd_lowrank, Halko et al. 2011, q = max_rank, niter power iterations)
    keep k singular triplets, k = `rank`, or the smallest k with Σ_{i<k} σ_i² ≥ energy·‖ΔW‖_F²
    B = U_k·Σ_k^{1/2},  A = Σ_k^{1/2}·V_kᵀ,  scale 1       → ΔW ≈ B·A
The energy kept, Σ_{i<k} σ_i² / ‖ΔW‖_F², is reported per layer and projection (‖ΔW‖_F² is exact,
so the fraction is exact even though the SVD is randomized).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from .errors import ShardError
from .fingerprint import BaseFingerprint, fingerprint_dir
from .shard import FFN_MODULES, Factors, Shard


@dataclass
class LayerReport:
    layer: int
    module: str
    rank: int
    energy_kept: float
    delta_norm: float


class _Weights:
    """Lazy tensor lookup across an HF folder's *.safetensors files (one tensor in memory at a time)."""

    def __init__(self, folder: Path):
        self.where = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    self.where[k] = f
        if not self.where:
            raise ShardError(f"{folder}: no *.safetensors weights found")

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self.where[key]), framework="pt") as fh:
            return fh.get_tensor(key)

    def keys(self):
        return self.where.keys()


def truncate(delta: torch.Tensor, rank: int | None, energy: float | None, max_rank: int = 64,
             niter: int = 4, seed: int = 0) -> tuple[Factors, float]:
    """Low-rank factors of `delta` (d_out × d_in) and the fraction of its energy they keep."""
    delta = delta.float()
    total = float(delta.pow(2).sum())
    if total == 0.0:
        return Factors(torch.zeros(1, delta.shape[1]), torch.zeros(delta.shape[0], 1), 1.0), 1.0
    q = min(rank or max_rank, min(delta.shape))
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # svd_lowrank draws a random test matrix: keep extraction reproducible
    try:
        U, S, V = torch.svd_lowrank(delta, q=q, niter=niter)
    finally:
        torch.random.set_rng_state(gen_state)
    cum = torch.cumsum(S.pow(2), 0) / total
    if rank:
        k = q
    else:
        k = int(torch.searchsorted(cum, torch.tensor(energy)).item()) + 1
        k = min(k, q)
    root = S[:k].sqrt()
    return Factors(root[:, None] * V[:, :k].T, U[:, :k] * root[None, :], 1.0), float(cum[k - 1].clamp(max=1.0))


def extract(base_dir: str | Path, finetuned_dir: str | Path, shard_id: str, rank: int | None = 16,
            energy: float | None = None, max_rank: int = 64, description: str = "",
            samples: list[str] | None = None, progress: bool = True) -> tuple[Shard, list[LayerReport]]:
    """Build a shard from the FFN weight differences between two HF checkpoint folders."""
    if (rank is None) == (energy is None):
        raise ShardError("give exactly one of rank or energy")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ShardError(f"energy must be in (0, 1], got {energy}")
    if rank is not None and rank < 1:
        raise ShardError(f"rank must be ≥ 1, got {rank}")
    base_fp: BaseFingerprint = fingerprint_dir(base_dir)
    ft_fp = fingerprint_dir(finetuned_dir)
    for k in ("architecture", "hidden_size", "intermediate_size", "num_layers"):
        if getattr(base_fp, k) != getattr(ft_fp, k):
            raise ShardError(f"fine-tuned model does not share the base's shape: {k} "
                             f"{getattr(ft_fp, k)} vs {getattr(base_fp, k)}")
    wb, wf = _Weights(Path(base_dir)), _Weights(Path(finetuned_dir))
    jobs = [(l, m) for l in range(base_fp.num_layers) for m in FFN_MODULES]
    factors, report = {}, []
    for layer, mod in tqdm(jobs, desc="extracting", unit="proj", disable=not progress):
        key = f"model.layers.{layer}.mlp.{mod}.weight"
        delta = wf.get(key).float() - wb.get(key).float()
        f, kept = truncate(delta, rank, energy, max_rank=max_rank)
        factors[(layer, mod)] = f
        report.append(LayerReport(layer, mod, f.rank, kept, float(delta.norm())))
    changed_attention = [k for k in wb.keys() if ".self_attn." in k and k in wf.where
                         and not torch.equal(wb.get(k), wf.get(k))]
    shard = Shard(id=shard_id, base=base_fp, factors=factors, description=description,
                  samples=list(samples or []),
                  provenance={"source": "extract", "base": str(base_dir), "finetuned": str(finetuned_dir),
                              "rank": rank, "energy": energy,
                              "mean_energy_kept": sum(r.energy_kept for r in report) / len(report),
                              "dropped_attention_tensors": len(changed_attention)})
    return shard.validate(), report
