"""Hook 1: the decoder FFN projections, as out-of-tree subclasses of vLLM's linear layers.

`*.mlp.gate_up_proj` (MergedColumnParallelLinear: [gate | up], column-parallel) and
`*.mlp.down_proj` (RowParallelLinear, row-parallel) add the in-batch shard delta to their local
partition, before the layer's all-gather / all-reduce:

    y = base(x) + Σ_j w_j · B_j (A_j x)          (wrag_kernels.apply_delta, in place on y)

Other users of these classes (o_proj, qkv, vision towers) get vLLM's own behaviour: shards never
touch attention. Each WRAG layer owns fixed slot buffers (see pool.py for their shapes), so device
memory does not depend on how many shards the store holds.
"""
from __future__ import annotations

import logging
import re

import torch
from vllm.config import get_current_vllm_config
from vllm.distributed import tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce
from vllm.distributed.utils import split_tensor_along_last_dim
from vllm.model_executor.custom_op import op_registry_oot
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from wrag_kernels import apply_delta

from ..config import WragConfig
from ..pool import open_worker_pool
from .runner import install_runner_hooks

log = logging.getLogger("vllm.wrag")

FFN_PREFIX = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.(gate_up_proj|down_proj)$")
# kind -> (vLLM module name, the shard modules it holds, in slice order)
KINDS = {"gate_up": ("gate_up_proj", ("gate_proj", "up_proj")), "down": ("down_proj", ("down_proj",))}


class WragFFN:
    """What both FFN projections add to vLLM's layer: slot buffers, slot loading, the delta."""
    wrag_kind = ""   # "gate_up" | "down"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.wrag_pool = None
        m = FFN_PREFIX.search(getattr(self, "prefix", "") or "")
        if m and m.group(2) == KINDS[self.wrag_kind][0]:
            self._wrag_attach(int(m.group(1)))

    def _wrag_attach(self, layer_index: int) -> None:
        """Allocate the slot buffers and join the worker's pool, if WRAG is on for this server."""
        vllm_config = get_current_vllm_config()
        cfg = WragConfig.from_vllm_config(vllm_config)
        if not cfg.enabled:
            return
        gate_up = self.wrag_kind == "gate_up"
        if gate_up and (len(self.output_sizes) != 2 or self.output_sizes[0] != self.output_sizes[1]):
            log.warning("WRAG: %s is not a [gate, up] pair; left unmodified", self.prefix)
            return
        sc = vllm_config.scheduler_config
        pool = open_worker_pool(cfg, max_tokens=max(sc.max_num_batched_tokens, sc.max_num_seqs),
                                max_seqs=sc.max_num_seqs)
        install_runner_hooks()
        S, R, dtype = cfg.slots, cfg.max_rank, self.params_dtype
        if gate_up:
            d_in, d_out, n = self.input_size, self.output_sizes[0] // self.tp_size, 2
        else:
            d_in, d_out, n = self.input_size_per_partition, self.output_size, 1
        self.wrag_layer, self.wrag_dims = layer_index, (d_in, d_out)
        self.register_buffer("wrag_a_pool", torch.zeros(n, S, R, d_in, dtype=dtype), persistent=False)   # (n, S, R, d_in)
        # (n, S, d_out, R), stored with d_out contiguous: the CPU op streams B along d_out
        self.register_buffer("wrag_b_pool", torch.zeros(n, S, R, d_out, dtype=dtype).transpose(2, 3), persistent=False)
        self.register_buffer("wrag_slot_ranks", torch.zeros(S, dtype=torch.int32), persistent=False)     # (S,)
        self.wrag_pool = pool
        pool.register(self)

    @torch.no_grad()
    def wrag_load_slot(self, slot: int, factors: dict, R: int) -> None:
        """Write one payload's factors for this layer into `slot` (zero-padded to rank R; TP-sliced)."""
        d_in, d_out = self.wrag_dims
        rank_max = 0
        for si, mod in enumerate(KINDS[self.wrag_kind][1]):
            self.wrag_a_pool[si, slot].zero_()
            self.wrag_b_pool[si, slot].zero_()
            f = factors.get((self.wrag_layer, mod))
            if f is None:
                continue
            r = f.rank
            if r > R:
                raise ValueError(f"payload rank {r} > pool rank {R}")
            A, B = f.A.float(), f.B.float() * f.scale       # A (r, D_in), B (D_out, r)
            if self.wrag_kind == "gate_up":                  # column-parallel: slice B by output rows
                B = B[self.tp_rank * d_out:(self.tp_rank + 1) * d_out]
            else:                                            # row-parallel: slice A by input columns
                A = A[:, self.tp_rank * d_in:(self.tp_rank + 1) * d_in]
            self.wrag_a_pool[si, slot, :r].copy_(A)
            self.wrag_b_pool[si, slot, :, :r].copy_(B)
            rank_max = max(rank_max, r)
        self.wrag_slot_ranks[slot] = rank_max

    def _wrag_delta(self, output_parallel: torch.Tensor, input_parallel: torch.Tensor) -> None:
        apply_delta(output_parallel, input_parallel, self.wrag_a_pool, self.wrag_b_pool, self.wrag_slot_ranks,
                    self.wrag_pool.meta)

    def _wrag_result(self, output):
        if not self.return_bias:
            return output
        return output, (self.bias if self.skip_bias_add else None)


class WragMergedColumnParallelLinear(WragFFN, MergedColumnParallelLinear):
    """gate_up_proj: y[gate|up] += Σ_j w·B_j(A_j x) on this rank's output columns."""
    wrag_kind = "gate_up"

    def forward(self, input_):
        if self.wrag_pool is None:
            return super().forward(input_)
        bias = self.bias if not self.skip_bias_add else None
        output_parallel = self.quant_method.apply(self, input_, bias)   # (T, 2·d_ff/tp)
        self._wrag_delta(output_parallel, input_)
        if self.gather_output and self.tp_size > 1:
            return self._wrag_result(tensor_model_parallel_all_gather(output_parallel))
        return self._wrag_result(output_parallel)


class WragRowParallelLinear(WragFFN, RowParallelLinear):
    """down_proj: the delta of this rank's input columns, added before the all-reduce (partial sums)."""
    wrag_kind = "down"

    def forward(self, input_):
        if self.wrag_pool is None:
            return super().forward(input_)
        if self.input_is_parallel:
            input_parallel = input_
        else:
            input_parallel = split_tensor_along_last_dim(input_, num_partitions=self.tp_size)[
                self.tp_rank].contiguous()
        bias_ = None if (self.tp_rank > 0 or self.skip_bias_add) else self.bias
        output_parallel = self.quant_method.apply(self, input_parallel, bias_)   # (T, d_model)
        self._wrag_delta(output_parallel, input_parallel)
        if self.reduce_results and self.tp_size > 1:
            return self._wrag_result(tensor_model_parallel_all_reduce(output_parallel))
        return self._wrag_result(output_parallel)


LAYER_CLASSES = {"MergedColumnParallelLinear": (MergedColumnParallelLinear, WragMergedColumnParallelLinear),
                 "RowParallelLinear": (RowParallelLinear, WragRowParallelLinear)}


def register_layers() -> None:
    """Idempotent: register the out-of-tree layer classes (before the model is built)."""
    for name, (base, cls) in LAYER_CLASSES.items():
        if op_registry_oot.get(name) is None:
            base.register_oot(cls, name=name)
        if op_registry_oot.get(name) is not cls:
            log.warning("WRAG: another plugin replaced %s (%s); WRAG deltas will not be applied there",
                        name, op_registry_oot.get(name))
