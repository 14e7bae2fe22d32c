"""Per-request controls, carried in the OpenAI body's `vllm_xargs` (→ SamplingParams.extra_args).

    wrag_shards   list of shard ids (skips retrieval). A JSON list, or a string: "a,b" or '["a","b"]'
    wrag_weights  floats in [0, max_weight], same length as wrag_shards (list, "0.5,0.5" or
                  "[0.5,0.5]"); default equal
    wrag_top_k    int in 1..max_top_k              wrag_threshold  float in [0, 1]
    wrag_method   one of the server's request_methods (default: linear, svd-centered)
    wrag_params   JSON object of the method's params (ranks capped at the server's max_rank)
    wrag_off      true/1 → the base model alone

vLLM 0.32 validates vllm_xargs values as str | int | float | list[str | int | float], so lists pass
as real JSON lists; strings are accepted too for clients that can only send scalars.

Keys the server itself writes into extra_args (plan.INTERNAL_KEYS) are refused from clients.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ..compose import METHODS
from ..compose.composite import check_weights, split_params
from ..errors import ComposeError, WragError
from .config import WragConfig, parse_bool
from .plan import INTERNAL_KEYS, PUBLIC_KEYS, wrag_keys


class RequestError(WragError):
    """A bad per-request control: the API answers HTTP 400 with this message."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class RequestControls:
    shards: list[str] | None = None
    weights: list[float] | None = None
    top_k: int | None = None
    threshold: float | None = None
    method: str | None = None
    params: dict | None = None
    off: bool = False

    @property
    def explicit(self) -> bool:
        return self.shards is not None


def request_methods(cfg: WragConfig) -> tuple[str, ...]:
    """Methods a request may ask for: the operator's list, plus the server's own default."""
    return tuple(dict.fromkeys([*cfg.request_methods, cfg.method]))


def check_method_params(method: str, params: dict, cfg: WragConfig) -> None:
    """RequestError unless `params` are valid for `method` and within the server's limits."""
    try:
        m, general = split_params(method, dict(params))
    except WragError as e:
        raise RequestError(f"wrag_method/wrag_params: {e}", "wrag_params") from None
    for name, v in (("rho", m.params.get("rho")), ("max_rank", general["max_rank"])):
        if v is not None and v > cfg.max_rank:
            raise RequestError(f"wrag_params: {name}={v} exceeds the server's max_rank {cfg.max_rank}",
                               "wrag_params")


def _list(v, key: str) -> list:
    if isinstance(v, list):
        return v
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            try:
                out = json.loads(s)
            except json.JSONDecodeError as e:
                raise RequestError(f"{key}: not a valid JSON list ({e})", key) from e
            if not isinstance(out, list):
                raise RequestError(f"{key}: expected a list", key)
            return out
        return [p.strip() for p in s.split(",") if p.strip()] if s else []
    raise RequestError(f"{key}: expected a list or a comma-separated string, got {type(v).__name__}", key)


def _float(v, key: str) -> float:
    if isinstance(v, bool):
        raise RequestError(f"{key}: expected a number, got a boolean", key)
    try:
        return float(v)
    except (TypeError, ValueError):
        raise RequestError(f"{key}: expected a number, got {v!r}", key) from None


def _int(v, key: str) -> int:
    if isinstance(v, bool):
        raise RequestError(f"{key}: expected an integer, got a boolean", key)
    if isinstance(v, float):
        if not v.is_integer():
            raise RequestError(f"{key}: expected an integer, got {v!r}", key)
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v.strip())
    raise RequestError(f"{key}: expected an integer, got {v!r}", key)


def _bool(v, key: str) -> bool:
    try:
        return parse_bool(v)
    except ValueError:
        raise RequestError(f"{key}: expected true/false or 1/0, got {v!r}", key) from None


def parse_controls(xargs: dict | None, cfg: WragConfig) -> RequestControls:
    """Validate the wrag_* entries of vllm_xargs (other keys are vLLM's business)."""
    c = RequestControls()
    if not xargs:
        return c
    if not isinstance(xargs, dict):
        raise RequestError("vllm_xargs must be a JSON object", "vllm_xargs")
    for key in wrag_keys(xargs):
        if key in INTERNAL_KEYS:
            raise RequestError(f"{key} is set by the server and may not be sent by clients", key)
        if key not in PUBLIC_KEYS:
            raise RequestError(f"unknown WRAG control {key!r}; known: {', '.join(PUBLIC_KEYS)}", key)
    if "wrag_off" in xargs:
        c.off = _bool(xargs["wrag_off"], "wrag_off")
    if "wrag_shards" in xargs:
        ids = _list(xargs["wrag_shards"], "wrag_shards")
        for i in ids:
            if not isinstance(i, str) or not i:
                raise RequestError(f"wrag_shards: shard ids must be non-empty strings, got {i!r}", "wrag_shards")
        if len(set(ids)) != len(ids):
            raise RequestError("wrag_shards: a shard id is listed twice", "wrag_shards")
        if len(ids) > cfg.max_top_k:
            raise RequestError(f"wrag_shards: at most {cfg.max_top_k} shards per request", "wrag_shards")
        c.shards = ids
    if "wrag_weights" in xargs:
        if c.shards is None:
            raise RequestError("wrag_weights needs wrag_shards (weights of retrieved shards come "
                               "from their scores)", "wrag_weights")
        ws = [_float(w, "wrag_weights") for w in _list(xargs["wrag_weights"], "wrag_weights")]
        allowed = f"each weight lies in [0, {cfg.max_weight:g}] (the server's max_weight)"
        if ws or c.shards:
            try:
                check_weights(ws, len(c.shards), c.shards)
            except ComposeError as e:
                raise RequestError(f"wrag_weights: {e}; {allowed}", "wrag_weights") from None
        if any(w > cfg.max_weight for w in ws):
            raise RequestError(f"wrag_weights: got {max(ws)}; {allowed}", "wrag_weights")
        c.weights = ws
    if "wrag_top_k" in xargs:
        k = _int(xargs["wrag_top_k"], "wrag_top_k")
        if not 1 <= k <= cfg.max_top_k:
            raise RequestError(f"wrag_top_k must be in 1..{cfg.max_top_k}, got {k}", "wrag_top_k")
        c.top_k = k
    if "wrag_threshold" in xargs:
        t = _float(xargs["wrag_threshold"], "wrag_threshold")
        if not (math.isfinite(t) and 0.0 <= t <= 1.0):
            raise RequestError(f"wrag_threshold must be a relevance probability in [0, 1], got {t}",
                               "wrag_threshold")
        c.threshold = t
    if "wrag_method" in xargs:
        m = xargs["wrag_method"]
        methods = request_methods(cfg)
        if not isinstance(m, str) or m not in METHODS:
            raise RequestError(f"wrag_method: unknown composition method {m!r}; known: "
                               f"{', '.join(METHODS)}", "wrag_method")
        if m not in methods:
            raise RequestError(f"wrag_method: {m!r} is an offline rule on this server (wrag merge); "
                               f"per request: {', '.join(methods)}", "wrag_method")
        c.method = m
    if "wrag_params" in xargs:
        p = xargs["wrag_params"]
        try:
            p = json.loads(p) if isinstance(p, str) else p
        except json.JSONDecodeError as e:
            raise RequestError(f"wrag_params: not valid JSON ({e})", "wrag_params") from e
        if not isinstance(p, dict):
            raise RequestError("wrag_params must be a JSON object", "wrag_params")
        c.params = p
    return c
