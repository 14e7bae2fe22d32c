"""The committed data in wrag_vllm/data/: rebuild the domain corpora (build_domain_data), train the
four domain shards (train_domain_shards), and measure their ΔW against the base weights, which
sets shard.MAX_DELTA_RMS_RATIO (delta_rms_ratios)."""
