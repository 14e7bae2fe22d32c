"""In-process latency benchmarks of single components, no server: the FFN delta kernels
(bench_kernels), composition in factor space vs dense (bench_compose, also --device cuda) and the
shard store up to 10k shards (bench_store)."""
