"""wrag_kernels Triton kernels under Triton's interpreter (CPU tensors) against the dense reference.

TRITON_INTERPRET is read when a @triton.jit function is *decorated* — including triton's own
library functions (tl.zeros, tl.sum...), decorated when triton is first imported. So:
* if triton is not imported yet, this module sets TRITON_INTERPRET=1 before importing it and runs
  the tests in process (the kernel modules are reloaded, in case they were imported earlier);
* if another test already imported triton without the interpreter (e.g. via vllm), the in-process
  tests skip and `test_triton_suite_in_subprocess` reruns this file in a fresh interpreter with
  TRITON_INTERPRET=1 — so the kernels are checked either way when the whole suite runs.
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

_PREV = os.environ.get("TRITON_INTERPRET")
_NEEDS_SUBPROCESS = "triton" in sys.modules and _PREV != "1"
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from helpers_kernels import assert_matches, make_problem  # noqa: E402
from wrag_kernels import DeltaMeta, apply_delta  # noqa: E402
from wrag_kernels import triton_expand, triton_shrink  # noqa: E402


@pytest.mark.skipif(not _NEEDS_SUBPROCESS, reason="triton was imported in interpreter mode: tests run in process")
def test_triton_suite_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    # Everything but this very test (skipped in the child) must have run and passed.
    m = re.search(r"(\d+) passed", summary)
    assert m and int(m.group(1)) >= 10 and "1 skipped" in summary and "failed" not in summary, summary


# Small shapes: the interpreter runs every program in Python.
SMALL = dict(d_in=24, d_out=20)
REQS = [
    (3, [0, 1, 2], [0.5, 1.0, -0.75]),
    (1, [], []),
    (5, [0, 1, 2, 3, 4, 5, 6, 7], [1.0, 0.5, 0.25, 1.0, -1.0, 0.3, 0.7, 2.0]),
    (2, [4], [1.0]),
    (0, [1], [1.0]),
    (2, [-1, 7, -1], [1.0, 1.0, 1.0]),
]
RANKS = [16, 4, 8, 0, 1, 20, 12, 7]   # R = 20 > 16: two rank tiles for slot 5; slot 3 empty


@pytest.fixture(autouse=True)
def _in_process_only(request):
    if _NEEDS_SUBPROCESS and request.node.name != "test_triton_suite_in_subprocess":
        pytest.skip("triton was imported without the interpreter; see test_triton_suite_in_subprocess")


@pytest.fixture(scope="module", autouse=True)
def interpreted_kernels():
    if _NEEDS_SUBPROCESS:
        yield
        return
    os.environ["TRITON_INTERPRET"] = "1"
    importlib.reload(triton_shrink)
    importlib.reload(triton_expand)
    assert type(triton_shrink._sgmv_shrink_kernel).__name__ == "InterpretedFunction"
    yield
    if _PREV is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["prefill", "decode"])
@pytest.mark.parametrize("n_slices", [1, 2])
def test_triton_matches_dense(dtype, layout, n_slices):
    p = make_problem(layout, n_slices, dtype, requests=REQS, ranks=RANKS, R=20, backend="triton", **SMALL)
    out = p.y.clone()
    apply_delta(out, p.x, p.a_pool, p.b_pool, p.slot_ranks, p.meta)
    assert_matches(out, p)
    # Same numbers as the CPU torch path (different summation order, so not bit-exact).
    q = make_problem(layout, n_slices, dtype, requests=REQS, ranks=RANKS, R=20, backend="torch", **SMALL)
    ref_torch = q.y.clone()
    apply_delta(ref_torch, q.x, q.a_pool, q.b_pool, q.slot_ranks, q.meta)
    assert torch.allclose(out.float(), ref_torch.float(), rtol=5e-2, atol=5e-2)


def test_triton_full_pool_no_shard_bit_exact():
    S, R, d = 3, 16, 16
    a = torch.randn(2, S, R, d)
    b = torch.randn(2, S, d, R)
    a[:, -1] = float("nan")            # the slot a wrapped −1 would hit
    b[:, -1] = float("nan")
    ranks = torch.full((S,), R, dtype=torch.int32)
    meta = DeltaMeta(16, 4, 2, "cpu", backend="triton")
    meta.fill([0, 2, 3, 6], [[-1, -1], [0, 1], [-1, -1]], [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    x, y0 = torch.randn(6, d), torch.randn(6, 2 * d)
    for qsl in ([0, 2, 3, 6], [0, 1, 2, 3]):          # SGMV layout, then BGMV (decode) layout
        T = qsl[-1]
        meta.fill(qsl, [[-1, -1], [0, 1], [-1, -1]], [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
        y = y0[:T].clone()
        apply_delta(y, x[:T], a, b, ranks, meta)
        none = torch.ones(T, dtype=torch.bool)
        none[qsl[1]:qsl[2]] = False
        assert torch.equal(y[none], y0[:T][none])
        assert torch.isfinite(y).all() and not torch.equal(y[~none], y0[:T][~none])


def test_interpreter_selected_kernel_layouts():
    """The decode layout really runs BGMV (max_seq_len 1) and prefill SGMV."""
    calls = []
    orig = (triton_shrink.bgmv_shrink, triton_shrink.sgmv_shrink)
    try:
        triton_shrink.bgmv_shrink = lambda *a, **k: (calls.append("bgmv"), orig[0](*a, **k))
        triton_shrink.sgmv_shrink = lambda *a, **k: (calls.append("sgmv"), orig[1](*a, **k))
        for layout in ("decode", "prefill"):
            p = make_problem(layout, 1, torch.float32, requests=REQS[:3], ranks=RANKS, R=20, backend="triton", **SMALL)
            out = p.y.clone()
            apply_delta(out, p.x, p.a_pool, p.b_pool, p.slot_ranks, p.meta)
            assert_matches(out, p)
    finally:
        triton_shrink.bgmv_shrink, triton_shrink.sgmv_shrink = orig
    assert calls == ["bgmv", "sgmv"]


def test_graph_safe_launches_do_not_depend_on_metadata():
    """Graph-safe mode (the default on CUDA): the same kernels with the same grids whatever the
    metadata holds — empty (as in vLLM's CUDA-graph capture), decode or prefill — and the deltas
    still match the dense reference, so a graph captured empty replays any step correctly."""
    launches = []
    orig = {name: getattr(mod, name) for mod, name in ((triton_shrink, "bgmv_shrink"), (triton_shrink, "sgmv_shrink"),
                                                       (triton_expand, "bgmv_expand"), (triton_expand, "sgmv_expand"))}

    def spy(mod, name):
        def f(*a, **k):
            launches[-1].append((name, tuple(t.shape for t in a if isinstance(t, torch.Tensor))))
            return orig[name](*a, **k)
        setattr(mod, name, f)

    try:
        for mod, name in ((triton_shrink, "bgmv_shrink"), (triton_shrink, "sgmv_shrink"),
                          (triton_expand, "bgmv_expand"), (triton_expand, "sgmv_expand")):
            spy(mod, name)
        T = sum(ln for ln, _, _ in REQS)
        empty = [(ln, [], []) for ln, _, _ in REQS]
        for reqs, layout in ((empty, "prefill"), (REQS, "prefill"), (REQS, "decode")):
            g = make_problem(layout, 2, torch.float32, requests=reqs, ranks=RANKS, R=20, backend="triton", **SMALL)
            g_meta = DeltaMeta(g.meta.max_tokens, g.meta.max_seqs, g.meta.k_max, "cpu", backend="triton",
                               graph_safe=True)
            g_meta.fill(g.qsl, g.slots, g.weights)
            launches.append([])
            out = g.y.clone()
            apply_delta(out, g.x, g.a_pool, g.b_pool, g.slot_ranks, g_meta)
            if reqs is empty:
                assert torch.equal(out, g.y)
            else:
                assert_matches(out, g)
        names = [[n for n, _ in call] for call in launches]
        assert names == [["bgmv_shrink", "bgmv_expand"]] * 3
        # same grids for the same batch size: the two prefill-layout calls (empty and real)
        assert launches[0] == launches[1] and T > 0
    finally:
        for mod, name in ((triton_shrink, "bgmv_shrink"), (triton_shrink, "sgmv_shrink"),
                          (triton_expand, "bgmv_expand"), (triton_expand, "sgmv_expand")):
            setattr(mod, name, orig[name])
