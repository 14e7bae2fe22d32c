"""wrag-vllm: Weight-Retrieval-Augmented Generation for vLLM.

Low-rank FFN-only shards in a vector-indexed store (store/), composed per request (compose/),
applied in-batch inside vLLM's FFN layers by the `wrag_kernels` ops (serving/).
"""
__version__ = "0.1.0"
