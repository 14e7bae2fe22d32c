"""wrag_kernels — apply many low-rank FFN shards per token, in-batch, without merging weights.

Math (Punica's y = x·W + x·A·B, generalised to K weighted shards per token): for token t of a
batch that mixes requests, and each FFN linear (gate_up fused = 2 slices, down = 1 slice),
    y_t = base(x_t) + Σ_{j<K} w_{t,j} · B_{s(t,j)} · (A_{s(t,j)} · x_t)
where s(t, j) is a slot of a fixed-size device pool (a_pool (n_slices, S, R, d_in), b_pool
(n_slices, S, d_out, R), slot_ranks (S,)), w the request's shard weights, slot −1 = nothing.
The shard scale is expected folded into B (or into w) when the pool is loaded.

    meta = DeltaMeta(max_tokens, max_seqs, k_max, device)          # once; picks the backend
    meta.fill(query_start_loc, seq_slots, seq_weights)             # per step, in place
    apply_delta(y, x, a_pool, b_pool, slot_ranks, meta)            # per layer/projection, in place

Modules: meta (DeltaMeta, MetaArgs: the op's metadata), ops (the custom op torch.ops.wrag.apply_delta),
cpu (the CPU backend: its work plan and torch implementation), triton_shrink / triton_expand (the
CUDA backend: SGMV for prefill, BGMV for decode), reference (dense math for tests).
"""
from .meta import DeltaMeta, MetaArgs
from .ops import apply_delta

__all__ = ["DeltaMeta", "MetaArgs", "apply_delta"]
