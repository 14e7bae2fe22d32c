"""wrag_kernels — apply many low-rank FFN shards per token, in-batch, without merging weights.

Math (Punica's y = x·W + x·A·B, generalised to K weighted shards per token): for token t of a
batch that mixes requests, and each FFN linear (gate_up fused = 2 slices, down = 1 slice),
    y_t = base(x_t) + Σ_{j<K} w_{t,j} · B_{s(t,j)} · (A_{s(t,j)} · x_t)
where s(t, j) is a slot of a fixed-size device pool (a_pool (n_slices, S, R, d_in), b_pool
(n_slices, S, d_out, R), slot_ranks (S,)), w the request's shard weights, slot −1 = nothing.
The shard scale is expected folded into B (or into w) when the pool is loaded.

    meta = DeltaMeta(max_tokens, max_seqs, k_max, device)          # once
    meta.fill(query_start_loc, seq_slots, seq_weights)             # per step, in place
    apply_delta(y, x, a_pool, b_pool, slot_ranks, meta)            # per layer/projection, in place

Backends: Triton (CUDA; SGMV for prefill, BGMV for decode; `triton_shrink`, `triton_expand`)
and pure torch (CPU; dense request groups + slot-bucketed grouped/batched GEMMs; `torch_ops`), registered as torch.ops.wrag.* (`ops`).
"""
from .meta import DeltaMeta
from .ops import apply_delta, delta_expand, delta_shrink

__all__ = ["DeltaMeta", "apply_delta", "delta_shrink", "delta_expand"]
