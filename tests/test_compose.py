"""Composition: factor-space methods equal their dense references; invariants; bad input."""
from __future__ import annotations

import math
import re

import pytest
import torch

from helpers_shards import random_shard
from wrag_vllm.compose import METHODS, compose, dense_reference, get_method
from wrag_vllm.errors import ComposeError
from wrag_vllm.fingerprint import BaseFingerprint
from wrag_vllm.shard import FFN_MODULES, Factors, Shard, load_shard

BASE = BaseFingerprint("LlamaForCausalLM", 16, 24, 2, "a" * 32)
OTHER = BaseFingerprint("LlamaForCausalLM", 16, 24, 2, "b" * 32)
FACTOR_SPACE = [n for n, c in METHODS.items() if c.factor_space]
TOL = 2e-5   # relative Frobenius error, fp32 factors vs fp64 dense reference


def rel_err(shard: Shard, ref: dict) -> float:
    keys = set(ref) | set(shard.factors)
    num = sum(float((_delta(shard, k) - ref.get(k, 0)).norm() ** 2) for k in keys)
    den = sum(float(r.norm() ** 2) for r in ref.values())
    return math.sqrt(num / max(den, 1e-300))


def _delta(shard: Shard, key) -> torch.Tensor:
    f = shard.factors.get(key)
    if f is None:
        d_in, d_out = (16, 24) if key[1] != "down_proj" else (24, 16)
        return torch.zeros(d_out, d_in, dtype=torch.float64)
    return f.delta().double()


def deficient_shard(sid: str, seed: int) -> Shard:
    """Rank 4 factors of rank ≤ 2: duplicated B columns, a zero A row, one all-zero projection."""
    s = random_shard(BASE, sid, rank=4, seed=seed)
    for key, f in s.factors.items():
        B, A = f.B.clone(), f.A.clone()
        B[:, 1] = B[:, 0]
        B[:, 3] = 2 * B[:, 2]
        A[3] = 0
        s.factors[key] = Factors(A, B, f.scale)
    f = s.factors[(1, "up_proj")]
    s.factors[(1, "up_proj")] = Factors(torch.zeros_like(f.A), f.B, f.scale)
    return s


def mixed_set() -> tuple[list[Shard], list[float]]:
    """Mixed ranks (2, 3, 5, 4), a rank-deficient shard, an exact duplicate under another id,
    and a shard that lacks some projections (missing = zero delta)."""
    a = random_shard(BASE, "alpha", rank=2, seed=1)
    b = random_shard(BASE, "beta", rank=3, seed=2, scale=2.0)
    c = random_shard(BASE, "gamma", rank=5, seed=3, modules=("gate_proj", "down_proj"))
    d = deficient_shard("delta", 4)
    dup = Shard("alpha-copy", BASE, dict(a.factors))
    return [a, b, c, d, dup], [0.4, 0.25, 0.6, 0.3, 0.2]


METHOD_CASES = [
    ("linear", {}),
    ("svd-centered", {}),
    ("svd-centered", {"rho": 2}),
    ("svd-centered", {"rho": 1, "lam": 1.7}),
    ("svd-centered", {"rho_energy": 0.8}),
    ("linear", {"max_rank": 3}),
    ("linear", {"energy": 1.0}),
    ("svd-centered", {"energy": 0.9}),
]


@pytest.mark.parametrize("method,params", METHOD_CASES)
def test_factor_space_equals_dense_reference(method, params):
    shards, weights = mixed_set()
    c = compose(shards, weights, method, **params)
    ref = dense_reference(shards, weights, method, **params)
    assert rel_err(c, ref) < TOL
    for f in c.factors.values():
        assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
        assert f.scale == 1.0


@pytest.mark.parametrize("method", FACTOR_SPACE)
def test_more_columns_than_rows(method):
    """k·r (= 32) exceeds d_in and d_out (16, 24): reduced QR bases, still exact."""
    shards = [random_shard(BASE, f"s{i}", rank=8, seed=10 + i) for i in range(4)]
    w = [0.1, 0.5, 0.3, 0.9]
    assert rel_err(compose(shards, w, method), dense_reference(shards, w, method)) < TOL


def test_default_method_is_svd_centered_and_registry():
    shards, weights = mixed_set()
    assert compose(shards, weights).provenance["composed"]["method"] == "svd-centered"
    assert {"linear", "svd-centered", "ties", "dare"} <= set(METHODS)
    assert get_method("linear") is METHODS["linear"]
    assert METHODS["svd-centered"].factor_space and not METHODS["ties"].factor_space


@pytest.mark.parametrize("lam", [1.0, 2.5, 0.0])
def test_svd_centered_without_truncation_is_linear(lam):
    shards, weights = mixed_set()
    lin = compose(shards, weights, "linear")
    for params in ({"rho_energy": 1.0}, {"rho": 64}):
        sc = compose(shards, weights, "svd-centered", lam=lam, **params)
        ref = {k: _delta(lin, k) for k in lin.factors}
        assert rel_err(sc, ref) < TOL
    # and truncation really changes something at k ≥ 3 (else the test above proves nothing)
    trunc = compose(shards, weights, "svd-centered", rho=1)
    assert rel_err(trunc, {k: _delta(lin, k) for k in lin.factors}) > 1e-2


def test_svd_centered_k2_equals_linear():
    """k = 2: both centred deviations are ±(ΔW_1 − ΔW_2) scaled, so truncation cancels out."""
    a, b = random_shard(BASE, "a", rank=3, seed=1), random_shard(BASE, "b", rank=3, seed=2)
    lin = compose([a, b], [0.7, 0.2], "linear")
    for params in ({}, {"rho": 1}, {"rho_energy": 0.5}):
        sc = compose([a, b], [0.7, 0.2], "svd-centered", **params)
        assert rel_err(sc, {k: _delta(lin, k) for k in lin.factors}) < TOL


@pytest.mark.parametrize("method", list(METHODS))
def test_k1_returns_the_shard(method):
    s = random_shard(BASE, "solo", rank=3, seed=5)
    params = {"density": 1.0} if not METHODS[method].factor_space else {}   # no trimming/dropping
    for w in (1.0, 0.4):
        c = compose([s], [w], method, **params)
        assert rel_err(c, {k: w * f.delta().double() for k, f in s.factors.items()}) < TOL
        assert c.rank <= s.rank


@pytest.mark.parametrize("method", list(METHODS))
def test_order_does_not_matter(method):
    shards, weights = mixed_set()
    perm = [3, 0, 4, 2, 1]
    c1 = compose(shards, weights, method)
    c2 = compose([shards[i] for i in perm], [weights[i] for i in perm], method)
    assert c1.id == c2.id
    assert c1.factors.keys() == c2.factors.keys()
    for k in c1.factors:   # canonical order → bit-identical factors
        assert torch.equal(c1.factors[k].A, c2.factors[k].A) and torch.equal(c1.factors[k].B, c2.factors[k].B)


@pytest.mark.parametrize("method", FACTOR_SPACE)
def test_zero_weight_drops_a_shard(method):
    shards, weights = mixed_set()
    c = compose(shards, [0.4, 0.0, 0.6, 0.0, 0.2], method)
    without = compose([shards[0], shards[2], shards[4]], [0.4, 0.6, 0.2], method)
    assert c.id == without.id
    assert rel_err(c, {k: _delta(without, k) for k in without.factors}) < TOL
    assert c.provenance["composed"]["dropped_zero_weight"] == ["beta", "delta"]


def test_duplicates_collapse_rank():
    a = random_shard(BASE, "a", rank=4, seed=1)
    pair = [a, Shard("a2", BASE, dict(a.factors))]
    ref = {k: f.delta().double() for k, f in a.factors.items()}
    fast = compose(pair, [0.5, 0.5], "linear")          # plain concatenation: rank Σ r_i
    assert fast.rank == 8 and rel_err(fast, ref) < TOL
    for method, params in (("linear", {"energy": 1.0}), ("svd-centered", {})):
        c = compose(pair, [0.5, 0.5], method, **params)   # core space: numerical rank
        assert c.rank == 4 and rel_err(c, ref) < TOL


def test_composite_shard_is_valid_and_roundtrips(tmp_path):
    shards, weights = mixed_set()
    c = compose(shards, weights, "svd-centered", lam=1.5)
    assert re.fullmatch(r"composite-[0-9a-f]{16}", c.id)
    c.validate()
    assert c.rank <= sum(s.rank for s in shards)
    prov = c.provenance["composed"]
    assert prov["params"]["lam"] == 1.5 and prov["params"]["rho"] is None
    assert [d["id"] for d in prov["inputs"]] == sorted(s.id for s in shards)
    assert "2412.12153" in prov["citation"]
    back = load_shard(c.save(tmp_path / "c.safetensors"))
    assert back.id == c.id and back.provenance == c.provenance
    assert rel_err(back, {k: _delta(c, k) for k in c.factors}) < 1e-6
    assert compose(shards, weights, "svd-centered", lam=1.5).id == c.id
    assert compose(shards, weights, "svd-centered", lam=1.4).id != c.id


def test_exact_weighted_sum_unlike_loraxs_merge():
    """LoRAX merges A's and B's separately: (Σ w_i B_i)(Σ w_j A_j) has cross terms B_i·A_j and
    needs equal ranks. Our linear composite is exactly Σ w_i·ΔW_i, for any ranks."""
    a, b = random_shard(BASE, "a", rank=4, seed=1, scale=1.0), random_shard(BASE, "b", rank=4, seed=2, scale=1.0)
    w = [0.6, 0.4]
    ours = compose([a, b], w, "linear")
    key = (0, "gate_proj")
    fa, fb = a.factors[key], b.factors[key]
    exact = w[0] * fa.delta() + w[1] * fb.delta()
    lorax = (w[0] * fa.B + w[1] * fb.B) @ (w[0] * fa.A + w[1] * fb.A)
    cross = w[0] * w[1] * (fa.B @ fb.A + fb.B @ fa.A)
    assert torch.allclose(ours.factors[key].delta(), exact, atol=1e-6)
    # LoRAX's result = w_i² terms + cross terms ≠ the weighted sum
    assert torch.allclose(lorax, w[0] ** 2 * fa.delta() + w[1] ** 2 * fb.delta() + cross, atol=1e-6)
    assert (lorax - exact).norm() > 0.5 * exact.norm()
    # unequal ranks: LoRAX's form is undefined (shapes do not add); ours is exact
    c = random_shard(BASE, "c", rank=2, seed=3, scale=1.0)
    with pytest.raises(RuntimeError):
        _ = fa.A + c.factors[key].A
    mixed = compose([a, c], w, "linear")
    assert rel_err(mixed, dense_reference([a, c], w, "linear")) < TOL


def test_dense_methods_match_peft():
    from peft.utils import merge_utils

    shards, weights = mixed_set()
    key = (0, "down_proj")
    deltas = torch.stack([s.factors[key].delta() for s in sorted(shards, key=lambda s: s.id)
                          if key in s.factors])
    ww = torch.tensor([x for _, x in sorted(zip([s.id for s in shards], weights))])
    ties = METHODS["ties"](density=0.3)
    assert torch.allclose(ties.dense(deltas, ww, None, key),
                          merge_utils.ties(list(deltas), ww, density=0.3), atol=1e-7)
    dare = METHODS["dare"](density=0.6, seed=7)
    ours = dare.dense(deltas, ww, None, key)
    g_seed = dare.generator(key, "cpu").initial_seed()
    with torch.random.fork_rng():
        torch.manual_seed(g_seed)
        theirs = merge_utils.dare_linear(list(deltas), ww, density=0.6)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.equal(ours, dare.dense(deltas, ww, None, key))           # deterministic
    assert not torch.equal(ours, METHODS["dare"](density=0.6, seed=8).dense(deltas, ww, None, key))


@pytest.mark.parametrize("method,params", [("ties", {}), ("dare", {"seed": 3}), ("dare", {"combine": "ties"}),
                                           ("ties", {"max_rank": 2}), ("dare", {"energy": 0.7})])
def test_dense_methods_return_truncated_svd_of_reference(method, params):
    shards, weights = mixed_set()
    c = compose(shards, weights, method, **params)
    ref = dense_reference(shards, weights, method, **params)   # exact truncated SVD, same rank rule
    assert rel_err(c, ref) < 1e-4
    cap = params.get("max_rank") or sum(s.rank for s in shards)
    assert c.rank <= cap


def test_no_nans_on_degenerate_input():
    z = random_shard(BASE, "z", rank=2, seed=1)
    for key, f in z.factors.items():
        z.factors[key] = Factors(f.A, torch.zeros_like(f.B), f.scale)
    with pytest.raises(ComposeError, match="zero in every layer"):
        compose([z], [1.0])
    a = random_shard(BASE, "a", rank=3, seed=2)
    for method in FACTOR_SPACE:
        c = compose([z, a, a, z], [1, 1, 1, 1], method)
        assert all(torch.isfinite(f.A).all() and torch.isfinite(f.B).all() for f in c.factors.values())
        assert rel_err(c, dense_reference([z, a, a, z], [1, 1, 1, 1], method)) < TOL


def test_bad_input():
    a, b = random_shard(BASE, "a", seed=1), random_shard(BASE, "b", seed=2)
    cases = [
        (dict(shards=[], weights=[]), "empty"),
        (dict(shards=[a, b], weights=[0.5]), "1 weight(s) for 2 shard"),
        (dict(shards=[a, b], weights=[0.5, float("nan")]), "'b' is nan"),
        (dict(shards=[a, b], weights=[0.5, float("inf")]), "finite"),
        (dict(shards=[a, b], weights=[0.5, -0.1]), "≥ 0"),
        (dict(shards=[a, b], weights=[0, 0.0]), "all weights are zero"),
        (dict(shards=[a, random_shard(OTHER, "o", seed=3)], weights=[1, 1]), "different base models"),
        (dict(shards=[a, b], weights=[1, 1], method="slerp"), "unknown composition method 'slerp'"),
        (dict(shards=[a, b], weights=[1, 1], rank=3), "no parameter(s) rank"),
        (dict(shards=[a, b], weights=[1, 1], rho=0), "rho must be an integer"),
        (dict(shards=[a, b], weights=[1, 1], rho=2, rho_energy=0.5), "not both"),
        (dict(shards=[a, b], weights=[1, 1], rho_energy=1.5), "outside"),
        (dict(shards=[a, b], weights=[1, 1], lam=float("nan")), "lam"),
        (dict(shards=[a, b], weights=[1, 1], max_rank=0), "max_rank"),
        (dict(shards=[a, b], weights=[1, 1], energy=0), "energy"),
        (dict(shards=[a, b], weights=[1, 1], method="ties", density=0), "density"),
        (dict(shards=[a, "b"], weights=[1, 1]), "Shard objects"),
        (dict(shards=[a, b], weights=["x", 1]), "numbers"),
    ]
    for kw, msg in cases:
        with pytest.raises(ComposeError) as ei:
            compose(**kw)
        assert msg in str(ei.value), (kw, str(ei.value))
    bad = random_shard(BASE, "bad", seed=4)
    bad.factors[(0, "gate_proj")] = Factors(torch.zeros(2, 20), torch.zeros(24, 2))
    with pytest.raises(ComposeError, match="shape"):
        compose([a, bad], [1, 1])


def test_output_dtype_follows_inputs():
    a = random_shard(BASE, "a", rank=3, seed=1)
    a.factors = {k: Factors(f.A.bfloat16(), f.B.bfloat16(), f.scale) for k, f in a.factors.items()}
    b = random_shard(BASE, "b", rank=3, seed=2)
    assert next(iter(compose([a], [1.0]).factors.values())).A.dtype == torch.bfloat16
    assert next(iter(compose([a, b], [1, 1]).factors.values())).A.dtype == torch.float32


def test_modules_present_in_some_shards_only():
    a = random_shard(BASE, "a", rank=2, seed=1, modules=("gate_proj",))
    b = random_shard(BASE, "b", rank=3, seed=2, modules=("down_proj",))
    c = compose([a, b], [1.0, 0.5], "linear")
    assert sorted({m for _, m in c.factors}) == ["down_proj", "gate_proj"]
    assert rel_err(c, {**{k: f.delta().double() for k, f in a.factors.items()},
                       **{k: 0.5 * f.delta().double() for k, f in b.factors.items()}}) < TOL
    assert set(FFN_MODULES) >= set(c.target_modules)
