"""wrag_kernels CPU backends (native and torch) against the dense reference, plus metadata, safety and compile."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from helpers_kernels import assert_matches, make_problem
from wrag_kernels import DeltaMeta, apply_delta
from wrag_kernels.cpu import CPU_BUCKETS, CPU_DENSE, CPU_GROUPS, DENSE_MIN_TOKENS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["prefill", "decode"])
@pytest.mark.parametrize("n_slices", [1, 2])
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_cpu_backends_match_dense(dtype, layout, n_slices, backend):
    p = make_problem(layout, n_slices, dtype, backend=backend)
    out = p.y.clone()
    apply_delta(out, p.x, p.a_pool, p.b_pool, p.slot_ranks, p.meta)
    assert_matches(out, p)


def test_plan_uses_both_paths():
    """The prefill problem exercises dense groups (contiguous and not) and slot buckets."""
    p = make_problem("prefill")
    info = p.meta.cpu.info.tolist()
    # dense: the split [0,1,2] pair of requests, the 17-token 8-shard one, [5,5,8] (4 tokens), [9]
    assert info[CPU_DENSE] == 4 and DENSE_MIN_TOKENS <= 4
    assert sorted(p.meta.cpu.cplan[:4, 0].tolist())[0] == -1          # the split [0,1,2] group
    # buckets: the 3-token requests [4] and [4, 6]: slot 4 has 6 tokens, slot 6 has 3
    assert info[CPU_GROUPS] == 2 and info[CPU_BUCKETS] == 2
    assert sorted(p.meta.cpu.plan[:2, 3].tolist()) == [3, 6]


@pytest.mark.parametrize("shape", [(64, 128, 8), (576, 1536, 16)])
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_model_shapes(shape, backend):
    d_in, d_out, R = shape
    reqs = [(7, [0, 2, 5], [1.0, 0.5, 0.5]), (1, [], []), (30, [1], [1.0]), (2, [3, 4, 5, 6, 7, 0, 1, 2], [0.1] * 8)]
    ranks = [R, R // 2, 1, R, 0, R // 4, R, 3]
    for layout in ("prefill", "decode"):
        p = make_problem(layout, 2, torch.float32, d_in=d_in, d_out=d_out, requests=reqs, ranks=ranks, R=R,
                         backend=backend)
        out = p.y.clone()
        apply_delta(out, p.x, p.a_pool, p.b_pool, p.slot_ranks, p.meta)
        assert_matches(out, p)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_full_pool_no_shard_tokens_bit_exact(backend):
    """vLLM's CPU LoRA bug: 'no adapter' = −1 wraps to the last slot when the pool is full. Here
    every slot is occupied and the last one is NaN-filled; tokens without shards must not move."""
    S, R, d = 4, 8, 24
    g = torch.Generator().manual_seed(3)
    a = torch.randn(1, S, R, d, generator=g)
    b = torch.randn(1, S, d, R, generator=g)
    a[:, -1] = float("nan")
    b[:, -1] = float("nan")
    ranks = torch.full((S,), R, dtype=torch.int32)
    meta = DeltaMeta(32, 8, 2, "cpu", backend=backend)
    qsl = [0, 3, 4, 9, 10]
    slots = [[-1, -1], [0, -1], [-1, -1], [1, 2]]
    meta.fill(qsl, slots, [[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.5, 0.5]])
    x = torch.randn(10, d, generator=g)
    y0 = torch.randn(10, d, generator=g)
    y = y0.clone()
    apply_delta(y, x, a, b, ranks, meta)
    none = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    assert torch.equal(y[none], y0[none])
    assert torch.isfinite(y).all() and not torch.equal(y[~none], y0[~none])


def test_early_exit_reads_nothing():
    """No token has a slot: the op returns before touching the (NaN) pools or y."""
    a = torch.full((2, 3, 4, 8), float("nan"))
    b = torch.full((2, 3, 8, 4), float("nan"))
    meta = DeltaMeta(8, 4, 2, "cpu")
    meta.fill([0, 2, 5], [[-1, -1], [2, -1]], [[0.0, 0.0], [0.0, 0.0]])    # weight 0 = dropped
    assert not meta.active
    y0 = torch.randn(5, 16)
    y = y0.clone()
    apply_delta(y, torch.randn(5, 8), a, b, torch.full((3,), 4, dtype=torch.int32), meta)
    assert torch.equal(y, y0)


def test_meta_fill_in_place_and_padding():
    meta = DeltaMeta(16, 4, 3, "cpu")
    bufs = [meta.token_slots, meta.seq_start, meta.seq_slots, meta.host_info, meta.cpu.plan]
    ptrs = [t.data_ptr() for t in bufs]
    meta.fill(torch.tensor([0, 2, 5]), torch.tensor([[1, 1, -1], [0, -1, -1]]),
              torch.tensor([[0.5, 0.25, 0.0], [1.0, 0.0, 0.0]]))
    assert [t.data_ptr() for t in bufs] == ptrs
    # duplicate slot merged into one entry with the summed weight
    assert meta.seq_slots[0].tolist() == [1, -1, -1]
    assert meta.seq_weights[0, 0].item() == pytest.approx(0.75)
    assert meta.token_slots[:5, 0].tolist() == [1, 1, 0, 0, 0]
    assert (meta.token_slots[5:] == -1).all()                  # padding tokens: no slot
    assert meta.seq_start.tolist() == [0, 2, 5, 5, 5]           # padding seqs: empty segments
    assert (meta.num_tokens, meta.num_seqs, meta.max_seq_len, meta.active) == (5, 2, 3, True)


@pytest.mark.parametrize("bad", [
    dict(query_start_loc=[0, 3, 2], seq_slots=[[0], [1]], seq_weights=[[1.0], [1.0]]),
    dict(query_start_loc=[0, 40], seq_slots=[[0]], seq_weights=[[1.0]]),
    dict(query_start_loc=[0, 1], seq_slots=[[0, 1, 2, 3]], seq_weights=[[1.0] * 4]),
    dict(query_start_loc=[0, 1], seq_slots=[[-2]], seq_weights=[[1.0]]),
    dict(query_start_loc=[0, 1], seq_slots=[[0]], seq_weights=[[float("nan")]]),
])
def test_meta_fill_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        DeltaMeta(16, 4, 3, "cpu").fill(**bad)


def test_op_validates_slots_and_rows():
    meta = DeltaMeta(8, 2, 1, "cpu")
    meta.fill([0, 2], [[5]], [[1.0]])
    a, b = torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 8, 4)
    ranks = torch.full((3,), 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="outside the pool"):
        apply_delta(torch.zeros(2, 8), torch.zeros(2, 8), a, b, ranks, meta)
    meta.fill([0, 2], [[1]], [[1.0]])
    with pytest.raises(ValueError, match="rows"):
        apply_delta(torch.zeros(1, 8), torch.zeros(1, 8), a, b, ranks, meta)


def test_opcheck_custom_op():
    """Schema, fake (meta) impl and functionalization of torch.ops.wrag.apply_delta and of the
    native backend's C++ op torch.ops.wrag.apply_delta_native."""
    p = make_problem("prefill", 2, torch.float32, poison=False)
    m = p.meta
    args = (p.y.clone(), p.x, p.a_pool, p.b_pool, p.slot_ranks, m.backend, m.graph_safe, *m.meta_args())
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(torch.ops.wrag.apply_delta.default, args, test_utils=utils)
    n = make_problem("prefill", 2, torch.float32, poison=False, backend="native")
    torch.library.opcheck(torch.ops.wrag.apply_delta_native.default,
                          (n.y.clone(), n.x, n.a_pool, n.b_pool, n.slot_ranks, *n.meta.meta_args()), test_utils=utils)


def _compiled_module_case(backend: str, kernels: str):
    torch.manual_seed(0)
    S, R, d, f = 4, 8, 16, 32
    a, b = torch.randn(2, S, R, d) * 0.3, torch.randn(2, S, f, R) * 0.3
    ranks = torch.tensor([8, 4, 8, 2], dtype=torch.int32)
    meta = DeltaMeta(16, 4, 2, "cpu", backend=kernels)

    class GateUp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up = torch.nn.Linear(d, 2 * f, bias=False)

        def forward(self, x):
            y = self.gate_up(x)
            apply_delta(y, x, a, b, ranks, meta)
            return torch.nn.functional.silu(y[:, :f]) * y[:, f:]

    mod = GateUp().eval()
    x = torch.randn(10, d)
    cnt = CompileCounterWithBackend(backend)
    compiled = torch.compile(mod, fullgraph=True, backend=cnt)
    with torch.no_grad():
        meta.fill([0, 4, 10], [[0, 1], [2, -1]], [[1.0, 0.5], [2.0, 0.0]])
        out1 = compiled(x)
        assert torch.allclose(out1, mod(x), atol=1e-6)
        meta.fill([0, 4, 10], [[3, -1], [0, 1]], [[1.0, 0.0], [1.0, 1.0]])     # same shapes, new contents
        out2 = compiled(x)
        assert torch.allclose(out2, mod(x), atol=1e-6)
        assert not torch.allclose(out1, out2)
        meta.fill([0, 10], [[-1, -1]], [[0.0, 0.0]])                           # no shard at all
        out3 = compiled(x)
        plain = mod.gate_up(x)
        assert torch.equal(out3, torch.nn.functional.silu(plain[:, :f]) * plain[:, f:])
    assert cnt.frame_count == 1, "in-place metadata updates must not recompile"


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_compile_fullgraph_aot_eager(kernels):
    _compiled_module_case("aot_eager", kernels)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_compile_fullgraph_inductor(kernels):
    _compiled_module_case("inductor", kernels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_dense_groups_large_requests(dtype, backend):
    """Long requests sharing a shard list run as one dense rank-Σr adapter (contiguous and split
    groups); a small request goes to the slot buckets. All must match the reference."""
    reqs = [(40, [0, 1, 2], [0.5, 1.0, -0.75]), (3, [], []), (30, [0, 1, 2], [0.5, 1.0, -0.75]),
            (70, [3, 4], [1.0, 0.25]), (2, [3, 4], [1.0, 0.5])]
    ranks = [4, 2, 4, 8, 3, 8]
    p = make_problem("prefill", 2, dtype, requests=reqs, ranks=ranks, R=8, d_in=32, d_out=24, backend=backend)
    info = p.meta.cpu.info.tolist()
    assert info[CPU_DENSE] == 2 and info[CPU_GROUPS] == 2      # two dense groups; slots 3, 4
    out = p.y.clone()
    apply_delta(out, p.x, p.a_pool, p.b_pool, p.slot_ranks, p.meta)
    assert_matches(out, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_decode_buckets_mixed_sharing(dtype, backend):
    """Decode where a common shard is shared by every request and the others are per request, with
    mixed ranks (masked past each slot's rank) and a chunk of prefill in the same batch: buckets
    of 1, 2 and many tokens per slot, and a dense group."""
    reqs = [(1, [0, 1 + q, 9 + q % 3], [1.0, 0.5, -0.25]) for q in range(8)]
    reqs += [(1, [-1], [0.0]), (9, [0, 12], [0.5, 2.0]), (1, [12], [1.0])]
    ranks = [8, 2, 8, 5, 0, 8, 1, 8, 3, 8, 4, 8, 6]
    for layout in ("prefill", "decode"):
        p = make_problem(layout, 2, dtype, requests=reqs, ranks=ranks, R=8, d_in=32, d_out=24, k_max=3,
                         backend=backend)
        out = p.y.clone()
        apply_delta(out, p.x, p.a_pool, p.b_pool, p.slot_ranks, p.meta)
        assert_matches(out, p)
        assert p.meta.cpu.info[CPU_BUCKETS].item() >= 2


def test_native_build_failure_falls_back_with_one_warning(tmp_path):
    """Where the native op cannot be built (no working compiler), "auto" serves the torch path and
    says so once."""
    import subprocess
    import sys

    code = ("import warnings; warnings.simplefilter('always')\n"
            "from wrag_kernels import DeltaMeta\n"
            "print(DeltaMeta(4, 2, 1, 'cpu').backend, DeltaMeta(4, 2, 1, 'cpu').backend)\n")
    env = {**__import__("os").environ, "WRAG_KERNELS_CACHE": str(tmp_path), "CXX": "/bin/false"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["torch", "torch"]
    assert out.stderr.count("the native CPU op could not be built") == 1, out.stderr[-2000:]
