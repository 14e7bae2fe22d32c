"""Random shards and tiny models for tests (no model hub: everything is built here)."""
from __future__ import annotations

import torch

from wrag_vllm.fingerprint import BaseFingerprint
from wrag_vllm.shard import FFN_MODULES, Factors, Shard

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY, **overrides})
    return LlamaForCausalLM(cfg).eval()


def tiny_base(seed: int = 0) -> BaseFingerprint:
    from wrag_vllm.fingerprint import fingerprint_model

    return fingerprint_model(tiny_llama(seed))


def random_shard(base: BaseFingerprint, shard_id: str, rank: int = 4, seed: int = 0,
                 modules=FFN_MODULES, description: str = "", samples=None, scale: float = 0.5,
                 queries=None) -> Shard:
    g = torch.Generator().manual_seed(seed)
    dims = {"gate_proj": (base.hidden_size, base.intermediate_size),
            "up_proj": (base.hidden_size, base.intermediate_size),
            "down_proj": (base.intermediate_size, base.hidden_size),
            "q_proj": (base.hidden_size, base.hidden_size)}
    factors = {}
    for layer in range(base.num_layers):
        for m in modules:
            d_in, d_out = dims[m]
            factors[(layer, m)] = Factors(torch.randn(rank, d_in, generator=g) * 0.1,
                                          torch.randn(d_out, rank, generator=g) * 0.1, scale)
    return Shard(id=shard_id, base=base, factors=factors, description=description or f"shard {shard_id}",
                 samples=list(samples or []), queries=list(queries or []))
