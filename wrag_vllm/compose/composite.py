"""compose(): k shards + weights → one composite Shard, served exactly like a single shard.

Per (layer, projection) present in any input shard, the chosen method combines the deltas
ΔW_i = s_i·B_i·A_i (a shard lacking that projection contributes ΔW_i = 0 there, and still counts
in means such as svd-centered's μ). Factor-space methods run batched in core space
(core_space.py) and never form a d_out×d_in matrix; dense methods (ties, dare) materialise the
deltas one projection at a time and convert back with a truncated SVD.

Canonical input order: shards are sorted by (id, weight) first, so the result (bit for bit, and
its id) does not depend on the order the caller lists them in. Zero weights drop a shard.

General parameters (any method), besides the method's own:
    max_rank  int    cap the composite rank per projection (default: none for factor-space
                     methods, whose rank is ≤ Σ r_i anyway; Σ r_i for dense methods)
    energy    float  in (0, 1]: keep the fewest top directions holding this fraction of ‖ΔW‖_F²
    progress  bool   tqdm bar over projections for dense methods (default False)
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict

import torch

from ..errors import ComposeError
from ..shard import Factors, Shard
from .core_space import bases_and_cores, core_to_factors, dense_to_factors, stack_group
from .registry import DEFAULT_METHOD, Method, get_method

GENERAL_PARAMS = {"max_rank": None, "energy": None, "progress": False}
COMPOSE_VERSION = 1


def split_params(method: str, params: dict) -> tuple[Method, dict]:
    """Instantiate the method with its own params; return it and the general params (validated)."""
    cls = get_method(method)
    general = {k: params.pop(k, v) for k, v in GENERAL_PARAMS.items()}
    m = cls(**params)
    mr, en = general["max_rank"], general["energy"]
    if mr is not None and (isinstance(mr, bool) or not isinstance(mr, (int, float)) or int(mr) != mr or mr < 1):
        raise ComposeError(f"max_rank must be an integer ≥ 1, got {mr!r}")
    if en is not None:
        try:
            ok = 0 < float(en) <= 1 and not isinstance(en, bool)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ComposeError(f"energy must be a fraction in (0, 1], got {en!r}")
        general["energy"] = float(en)
    general["max_rank"] = None if mr is None else int(mr)
    return m, general


def check_weights(weights, n: int, ids=None) -> list[float]:
    """Weights as floats; ComposeError unless len == n, all finite, ≥ 0 and not all zero."""
    if weights is None:
        raise ComposeError("weights are required: one non-negative number per shard")
    try:
        ws = [float(w) for w in weights]
    except (TypeError, ValueError) as e:
        raise ComposeError(f"weights must be numbers ({e})") from None
    if len(ws) != n:
        raise ComposeError(f"got {len(ws)} weight(s) for {n} shard(s): give exactly one weight per shard")
    ids = ids or [f"#{i}" for i in range(n)]
    for sid, w in zip(ids, ws):
        if not math.isfinite(w):
            raise ComposeError(f"weight for shard {sid!r} is {w}: weights must be finite numbers")
        if w < 0:
            raise ComposeError(f"weight for shard {sid!r} is {w}: weights must be ≥ 0 (a composition adds "
                               f"shards; to remove a shard, leave it out or give it weight 0)")
    if not any(w > 0 for w in ws):
        raise ComposeError("all weights are zero: nothing to compose (give at least one shard a positive weight)")
    return ws


def _check_shards(shards) -> None:
    if not shards:
        raise ComposeError("nothing to compose: the shard list is empty")
    for s in shards:
        if not isinstance(s, Shard):
            raise ComposeError(f"compose() takes Shard objects, got {type(s).__name__}")
    base = shards[0].base
    for s in shards[1:]:
        why = base.mismatch(s.base)
        if why:
            raise ComposeError(f"shards {shards[0].id!r} and {s.id!r} were made for different base models "
                               f"and cannot be composed: {why}")
    dims: dict[tuple, tuple] = {}
    for s in shards:
        for key, f in s.factors.items():
            d = (f.B.shape[0], f.A.shape[1])
            if f.A.dim() != 2 or f.B.dim() != 2 or f.A.shape[0] != f.B.shape[1]:
                raise ComposeError(f"shard {s.id!r} layer {key[0]} {key[1]}: malformed factors "
                                   f"A{tuple(f.A.shape)} B{tuple(f.B.shape)}")
            if dims.setdefault(key, d) != d:
                raise ComposeError(f"layer {key[0]} {key[1]}: shard {s.id!r} has shape {d[0]}×{d[1]} but another "
                                   f"shard has {dims[key][0]}×{dims[key][1]}")


def canonical_inputs(shards, weights):
    """Validate; sort by (id, weight); split kept (w > 0) from dropped (w == 0)."""
    _check_shards(shards)
    ws = check_weights(weights, len(shards), [s.id for s in shards])
    order = sorted(range(len(shards)), key=lambda i: (shards[i].id, ws[i], i))
    kept = [(shards[i], ws[i]) for i in order if ws[i] > 0]
    dropped = [(shards[i], ws[i]) for i in order if ws[i] == 0]
    return kept, dropped


def composite_id(base_hash: str, pairs, method: str, params: dict) -> str:
    """'composite-' + 16 hex of sha256 over base, sorted (id, weight) pairs, method and params."""
    doc = {"base": base_hash, "inputs": [[sid, repr(float(w))] for sid, w in sorted(pairs)],
           "method": method, "params": {k: params[k] for k in sorted(params)}}
    return "composite-" + hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def compose(shards: list[Shard], weights: list[float], method: str = DEFAULT_METHOD, **params) -> Shard:
    """Compose `shards` with relevance `weights` into one Shard (scale 1.0 factors, rank ≤ Σ r_i).

    shards: Shards for one base (ComposeError otherwise). weights: one float ≥ 0 per shard, not all 0.
    method: a name in METHODS. params: the method's parameters plus max_rank / energy / progress.
    """
    m, general = split_params(method, dict(params))
    kept, dropped = canonical_inputs(shards, weights)
    sh = [s for s, _ in kept]
    w = torch.tensor([x for _, x in kept], dtype=torch.float64)
    keys = sorted({key for s in sh for key in s.factors})
    first = next(iter(sh[0].factors.values()))
    device = first.A.device
    out_dtype = first.A.dtype
    for s in sh:
        for f in s.factors.values():
            out_dtype = torch.promote_types(out_dtype, torch.promote_types(f.A.dtype, f.B.dtype))

    if m.concatenates and general["max_rank"] is None and general["energy"] is None:
        factors = _concatenate(sh, w, keys)
    elif m.factor_space:
        factors = _compose_cores(sh, w, keys, m, general, device)
    else:
        factors = _compose_dense(sh, w, keys, m, general, device)
    if not factors:
        raise ComposeError("the composition is zero in every layer (the shards' deltas cancel or are zero)")
    factors = {k: Factors(f.A.to(out_dtype), f.B.to(out_dtype), 1.0) for k, f in factors.items()}

    all_params = {**m.params, **{k: v for k, v in general.items() if k != "progress"}}
    cid = composite_id(sh[0].base.weights_hash, [(s.id, x) for s, x in kept], m.name, all_params)
    listing = ", ".join(f"{s.id} ({x:g})" for s, x in kept)
    return Shard(
        id=cid, base=sh[0].base, factors=factors, name=cid,
        description=f"{m.name} composition of {len(kept)} shard(s): {listing}",
        provenance={
            "composed": {
                "version": COMPOSE_VERSION, "method": m.name, "citation": m.citation,
                "factor_space": m.factor_space, "params": all_params,
                "inputs": [{"id": s.id, "weight": x, "rank": s.rank} for s, x in kept],
                "dropped_zero_weight": [s.id for s, _ in dropped],
            }
        },
    )


def _entry_ranks(sh, keys):
    # (G, k) int64: rank of shard i at entry g, 0 where the shard lacks that projection
    return torch.tensor([[s.factors[key].rank if key in s.factors else 0 for s in sh] for key in keys],
                        dtype=torch.int64)


def _concatenate(sh, w, keys) -> dict:
    """Σ_i w_i·s_i·B_i·A_i = B_cat·A_cat, A_cat = [A_1; …; A_k], B_cat = [w_1·s_1·B_1 … w_k·s_k·B_k]."""
    out = {}
    for key in keys:
        fs = [(s.factors[key], float(wi)) for s, wi in zip(sh, w.tolist()) if key in s.factors]
        A = torch.cat([f.A for f, _ in fs], 0)                                  # (Σr, d_in)
        B = torch.cat([f.B * (wi * f.scale) for f, wi in fs], 1)               # (d_out, Σr)
        out[key] = Factors(A, B, 1.0)
    return out


def _compose_cores(sh, w, keys, m: Method, general, device) -> dict:
    groups: dict[tuple, list] = defaultdict(list)
    for key in keys:
        f = next(s.factors[key] for s in sh if key in s.factors)
        groups[(f.B.shape[0], f.A.shape[1])].append(key)
    out = {}
    for (d_out, d_in), gkeys in groups.items():
        parts = [[s.factors.get(key) for s in sh] for key in gkeys]
        ranks = _entry_ranks(sh, gkeys)
        B_cat, A_cat, scale, cols = stack_group(parts, ranks, d_out, d_in, device, len(sh))
        Q_B, Q_A, M = bases_and_cores(B_cat, A_cat, scale, cols)        # M: (k, G, nB, nA)
        Fc = m.cores(M, w.to(M.device), ranks.to(M.device))          # (G, nB, nA)
        B_all, A_all, q = core_to_factors(Fc, Q_B, Q_A, general["max_rank"], general["energy"])
        q_max = max(q, default=0)
        for g, key in enumerate(gkeys):
            if q[g] == 0:
                continue  # zero delta here: leave the projection out
            A, B = A_all[g, :q[g]], B_all[g, :, :q[g]]
            if q[g] < q_max:  # own storage, so cached composites hold only what they use
                A, B = A.clone(), B.contiguous()
            out[key] = Factors(A, B, 1.0)
    return out


def materialize(sh, key, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense deltas (k, d_out, d_in) at one entry (zeros where a shard lacks it) and ranks (k,)."""
    f0 = next(s.factors[key] for s in sh if key in s.factors)
    d_out, d_in = f0.B.shape[0], f0.A.shape[1]
    D = torch.zeros(len(sh), d_out, d_in, dtype=dtype, device=device)
    for i, s in enumerate(sh):
        f = s.factors.get(key)
        if f is not None:
            D[i] = f.scale * (f.B.to(device, dtype) @ f.A.to(device, dtype))
    ranks = torch.tensor([s.factors[key].rank if key in s.factors else 0 for s in sh], dtype=torch.int64)
    return D, ranks


def _compose_dense(sh, w, keys, m: Method, general, device) -> dict:
    it = keys
    if general["progress"]:
        from tqdm import tqdm
        it = tqdm(keys, desc=f"{m.name} (dense)", unit="proj")
    out = {}
    for key in it:
        D, ranks = materialize(sh, key, device)
        X = m.dense(D, w.to(device), ranks.to(device), key)
        del D
        cap = general["max_rank"] or int(ranks.sum())
        r = dense_to_factors(X, cap, general["energy"], seed=0)
        if r is not None:
            out[key] = Factors(r[0], r[1], 1.0)
    return out


def dense_reference(shards: list[Shard], weights: list[float], method: str = DEFAULT_METHOD,
                    dtype: torch.dtype = torch.float64, keys=None, **params) -> dict:
    """The method's math on materialised dense deltas: {(layer, module): ΔW (d_out, d_in)}.

    For tests and benchmarks only (O(d_out·d_in) memory per projection, dense SVDs). General
    max_rank / energy are applied as an exact truncated SVD of each result. `keys` restricts the
    projections computed (default: all).
    """
    m, general = split_params(method, dict(params))
    kept, _ = canonical_inputs(shards, weights)
    sh = [s for s, _ in kept]
    w = torch.tensor([x for _, x in kept], dtype=torch.float64)
    device = next(iter(sh[0].factors.values())).A.device
    out = {}
    for key in keys if keys is not None else sorted({k for s in sh for k in s.factors}):
        D, ranks = materialize(sh, key, device, dtype)
        X = m.dense(D, w.to(device), ranks.to(device), key)
        if general["max_rank"] is not None or general["energy"] is not None or not m.factor_space:
            from .core_space import keep_mask
            cap = general["max_rank"] if (general["max_rank"] or m.factor_space) else int(ranks.sum())
            U, S, Vh = torch.linalg.svd(X, full_matrices=False)
            X = (U * (S * keep_mask(S, cap, general["energy"])).unsqueeze(-2)) @ Vh
        out[key] = X
    return out
