"""Prepared one-shot GPU runs: gpu_kernels (Triton path correctness + decode-step timing vs the
memory-bound limit; its logic also runs on CPU) and gpu_serving.sh (the serving benchmarks sized
for one GPU, < 10 minutes)."""
