"""Benchmarks, evaluations and prepared GPU checks of wrag-vllm (not installed; run from the repo root).

Every script runs as a module from the repository root, e.g.
    .venv/bin/python -m benchmarks.micro.bench_kernels --help

    data/      regenerate and measure the committed data in wrag_vllm/data/ (corpora, domain shards)
    quality/   quality of WRAG on the domain shards (perplexity, retrieval, PubMedQA, ablation, sweep)
    micro/     in-process latency benchmarks: kernels, composition, shard store
    serving/   benchmarks against real `vllm serve` processes: throughput, memory, admission
    gpu/       prepared one-shot GPU runs (kernel check, the serving benchmarks on one GPU)
    machine.py the machine description every benchmark writes next to its results
    results/   what they write (JSON + markdown + PNG); the paths below are the defaults
"""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
