"""Benchmarks against real `vllm serve` processes: throughput vs plain vLLM and multi-LoRA
(bench_serving), server memory vs registered shards (bench_memory), admission overhead inside TTFT
(bench_admission, reads bench_serving's result). serving_common holds what they share: models,
shard catalogue, server wrapper, streaming load generator, memory/metrics, result writers."""
