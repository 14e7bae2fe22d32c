"""The registry of composition methods: one class per rule, looked up by name.

A method composes, for ONE (layer, projection), the deltas ΔW_i = s_i·B_i·A_i of k shards with
weights w_i ≥ 0 (zero weights are dropped before a method sees them). It implements

    dense(deltas, w, ranks, key) -> ΔW            always: the reference math on dense matrices
    cores(M, w, ranks) -> F                       only if `factor_space`: the same math on cores

Factor space (see `core_space.py`): with orthonormal U_B ⊇ span[B_1 … B_k] and
V_A ⊇ span[A_1ᵀ … A_kᵀ], every ΔW_i = U_B·M_i·V_Aᵀ with a small core M_i. A method is exact in
factor space when its result is again U_B·F·V_Aᵀ with F computed from the cores alone: true for
anything built from sums, scalings and SVDs of the ΔW_i (SVD commutes with the orthonormal
change of basis), false for element-wise rules (TIES, DARE), which need the dense matrices.

Adding a rule = one module with one `@register` class; `compose()` does the rest.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..errors import ComposeError

DEFAULT_METHOD = "svd-centered"   # the rule a request gets unless it or the server names another


class Method:
    name: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    factor_space: ClassVar[bool] = True    # exact in factor space (no dense d_out×d_in ever)
    # True if the rule is Σ_i w_i·ΔW_i: compose() then just concatenates the factors (no QR/SVD)
    # unless max_rank / energy ask for a compressed composite.
    concatenates: ClassVar[bool] = False
    defaults: ClassVar[dict] = {}          # parameter name -> default value

    def __init__(self, **params):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise ComposeError(f"method {self.name!r} has no parameter(s) {', '.join(unknown)} "
                               f"(its parameters: {known}; general ones: max_rank, energy)")
        self.params = {**self.defaults, **{k: v for k, v in params.items()}}
        self.check()

    def check(self) -> None:
        """Validate self.params; raise ComposeError with a clear message."""

    # M: (k, G, nB, nA) float64 cores; w: (k,) float64; ranks: (G, k) int64 (0 = shard lacks module)
    def cores(self, M: torch.Tensor, w: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"method {self.name!r} has no factor-space form")

    # deltas: (k, d_out, d_in); w: (k,); ranks: (k,) int64; key: (layer, module) for seeding
    def dense(self, deltas: torch.Tensor, w: torch.Tensor, ranks: torch.Tensor,
              key: tuple[int, str] = (0, "")) -> torch.Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- param helpers
    def _float(self, name, lo=None, hi=None, lo_open=False, allow_none=False):
        v = self.params[name]
        if v is None and allow_none:
            return
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ComposeError(f"method {self.name!r}: parameter {name} must be a number, got {v!r}")
        if isinstance(v, bool) or not math.isfinite(f) or (lo is not None and (f < lo or (lo_open and f == lo))) \
                or (hi is not None and f > hi):
            rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise ComposeError(f"method {self.name!r}: parameter {name}={v!r} is outside {rng}")
        self.params[name] = f

    def _int(self, name, lo=1, allow_none=False):
        v = self.params[name]
        if v is None and allow_none:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or int(v) < lo:
            raise ComposeError(f"method {self.name!r}: parameter {name} must be an integer ≥ {lo}, got {v!r}")
        self.params[name] = int(v)

    def _choice(self, name, choices):
        if self.params[name] not in choices:
            raise ComposeError(f"method {self.name!r}: parameter {name}={self.params[name]!r} must be one of "
                               f"{', '.join(map(repr, choices))}")


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"composition method name {cls.name!r} missing or already registered")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The method class registered under `name` (ComposeError if unknown)."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ComposeError(f"unknown composition method {name!r}; available: {', '.join(sorted(METHODS))}") \
            from None
