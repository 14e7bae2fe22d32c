"""Server configuration, read the same way in every vLLM process.

Sources, later wins:
    defaults  <  vLLM --additional-config '{"wrag": {...}}'  <  WRAG_* environment variables
WRAG is on only for a server that asks for it: a "wrag" section in --additional-config, "wrag" in
VLLM_PLUGINS (as `wrag serve` sets), or WRAG_ENABLED=1.

Every process of a server (API server, engine core, workers) sees the same vLLM config and the same
environment, so each one derives the same WragConfig without talking to the others.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

from ..compose.registry import DEFAULT_METHOD
from ..errors import WragError

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(v) -> bool:
    """true/false, 1/0, yes/no, on/off (any case) → bool; ValueError otherwise."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    s = v.strip().lower() if isinstance(v, str) else None
    if s in TRUE or s in FALSE:
        return s in TRUE
    raise ValueError(f"not a boolean: {v!r}")


def _default_store() -> str:
    from ..store import default_store_path   # the store's own rule ($WRAG_STORE, else ~/.local/...)
    return str(default_store_path())


@dataclass
class WragConfig:
    enabled: bool = True
    store: str = field(default_factory=_default_store)
    top_k: int = 3                 # shards retrieved per request
    max_top_k: int = 16            # largest wrag_top_k a request may ask for
    threshold: float = 0.5         # relevance probability below which a retrieved shard is dropped (docs/decisions.md)
    temperature: float = 1.0       # weights = softmax(logit(p) / temperature) over the kept shards
    method: str = DEFAULT_METHOD   # composition method (wrag_vllm.compose.METHODS)
    method_params: dict = field(default_factory=dict)
    slots: int = 8                 # device pool slots per FFN layer (S)
    max_rank: int = 64             # rank per slot (R); a composite of rank > R is refused
    # rank budget of a composite (compose's max_rank, truncated in factor space) unless the request
    # sets max_rank / energy; capped at max_rank; 0 = none (rank Σ r_i). The default and its
    # measurement: docs/decisions.md
    composite_rank: int = 12
    k_max: int = 4                 # slots a single sequence may use at once (linear method)
    host_cache_mb: int = 1024      # worker host-memory cache of slot payloads
    composition_cache_mb: int = 1024
    prepare_threads: int = 2       # engine-core threads doing retrieval/composition off the loop
    kernel_backend: str = "auto"   # wrag_kernels backend: auto | native | torch | triton (DeltaMeta)
    # --- limits a request cannot exceed (see README "Security model")
    max_weight: float = 2.0        # each wrag_weights value must lie in [0, max_weight]
    # per-request wrag_method values: the rules with a factor-space serving form; the dense offline
    # rules (ties, dare: seconds to minutes of engine time per set) only if the operator lists them
    request_methods: list = field(default_factory=lambda: ["linear", "svd-centered"])
    query_max_tokens: int = 256    # retrieval embeds at most the last ~N tokens of the query text
    query_context_turns: int = 2   # earlier user turns of a conversation embedded before the last one
    # most prompts of one completions request retrieved for (one retrieval each, one batched embed);
    # a request with more gets a 400 unless it names its shards (wrag_shards) or sets wrag_off
    max_prompts: int = 64
    # with --data-parallel-size > 1: send a request to the engine its shard set hashes to (affinity.py)
    dp_affinity: bool = True
    # --- the admin surface (POST/DELETE /wrag/shards): off unless the operator turns it on, and
    # then only with --api-key; registration by server path only inside these directories
    admin_writes: bool = False
    admin_dirs: list = field(default_factory=list)
    max_upload_mb: int = 256       # largest shard upload accepted over HTTP

    # env var -> field; parsed with the field's type
    ENV = {
        "WRAG_ENABLED": "enabled", "WRAG_STORE": "store", "WRAG_TOP_K": "top_k",
        "WRAG_MAX_TOP_K": "max_top_k", "WRAG_THRESHOLD": "threshold",
        "WRAG_TEMPERATURE": "temperature", "WRAG_METHOD": "method",
        "WRAG_METHOD_PARAMS": "method_params", "WRAG_SLOTS": "slots", "WRAG_MAX_RANK": "max_rank",
        "WRAG_COMPOSITE_RANK": "composite_rank",
        "WRAG_K_MAX": "k_max", "WRAG_HOST_CACHE_MB": "host_cache_mb",
        "WRAG_COMPOSITION_CACHE_MB": "composition_cache_mb",
        "WRAG_PREPARE_THREADS": "prepare_threads", "WRAG_KERNEL_BACKEND": "kernel_backend",
        "WRAG_MAX_WEIGHT": "max_weight",
        "WRAG_REQUEST_METHODS": "request_methods", "WRAG_QUERY_MAX_TOKENS": "query_max_tokens",
        "WRAG_QUERY_CONTEXT_TURNS": "query_context_turns", "WRAG_MAX_PROMPTS": "max_prompts",
        "WRAG_DP_AFFINITY": "dp_affinity",
        "WRAG_ADMIN_WRITES": "admin_writes", "WRAG_ADMIN_DIRS": "admin_dirs",
        "WRAG_MAX_UPLOAD_MB": "max_upload_mb",
    }

    @classmethod
    def from_sources(cls, additional_config: dict | str | None = None,
                     environ: dict | None = None) -> "WragConfig":
        env = os.environ if environ is None else environ
        if isinstance(additional_config, str):
            additional_config = json.loads(additional_config) if additional_config.strip() else {}
        section = (additional_config or {}).get("wrag", {})
        if section is True or section is False:
            section = {"enabled": section}
        if not isinstance(section, dict):
            raise WragError(f'--additional-config "wrag" must be a JSON object, got {section!r}')
        cfg = cls()
        # The general plugin loads in every vLLM process of an environment where this package is
        # installed; WRAG acts only on servers that ask for it (a "wrag" section in
        # --additional-config, "wrag" in VLLM_PLUGINS, or WRAG_ENABLED=1). Others stay plain vLLM.
        plugins = [p.strip() for p in env.get("VLLM_PLUGINS", "").split(",")]
        cfg.enabled = bool(section) or "wrag" in plugins
        names = {f.name: f for f in fields(cls)}
        for k, v in section.items():
            k = k.replace("-", "_")
            if k not in names:
                raise WragError(f"unknown WRAG setting {k!r} in --additional-config; known: "
                                f"{', '.join(sorted(names))}")
            setattr(cfg, k, _coerce(names[k].type, v, k))
        for var, k in cls.ENV.items():
            if var in env and env[var] != "":
                setattr(cfg, k, _coerce(names[k].type, env[var], var))
        return cfg.validate()

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "WragConfig":
        return cls.from_sources(getattr(vllm_config, "additional_config", None) or {})

    def validate(self) -> "WragConfig":
        def need(ok, msg):
            if not ok:
                raise WragError(f"WRAG configuration: {msg}")
        need(1 <= self.top_k <= self.max_top_k, f"top_k must be in 1..max_top_k ({self.max_top_k})")
        need(math.isfinite(self.threshold) and 0.0 <= self.threshold <= 1.0, "threshold must be in [0, 1]")
        need(math.isfinite(self.temperature) and self.temperature > 0, "temperature must be > 0")
        need(self.slots >= 1, "slots must be >= 1")
        need(self.max_rank >= 1, "max_rank must be >= 1")
        need(self.composite_rank >= 0, "composite_rank must be >= 0 (0 = no budget)")
        need(1 <= self.k_max <= self.slots, "k_max must be in 1..slots (one sequence's shards must fit the pool)")
        need(self.prepare_threads >= 1, "prepare_threads must be >= 1")
        need(math.isfinite(self.max_weight) and self.max_weight > 0, "max_weight must be > 0")
        need(self.query_max_tokens >= 1, "query_max_tokens must be >= 1")
        need(self.query_context_turns >= 0, "query_context_turns must be >= 0")
        need(self.max_prompts >= 1, "max_prompts must be >= 1")
        need(self.max_upload_mb >= 1, "max_upload_mb must be >= 1")
        from wrag_kernels.meta import BACKENDS
        need(self.kernel_backend in ("auto", *BACKENDS), f"kernel_backend must be one of auto, {', '.join(BACKENDS)}")
        from ..compose import METHODS
        unknown = [m for m in self.request_methods if m not in METHODS]
        need(not unknown, f"request_methods: unknown method(s) {unknown}; known: {', '.join(METHODS)}")
        need(self.method in METHODS, f"method: unknown composition method {self.method!r}")
        need(all(isinstance(d, str) and d for d in self.admin_dirs), "admin_dirs must be a list of folder paths")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def _coerce(typ, v, where):
    typ = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if typ == "bool":
            return parse_bool(v)
        if typ == "int":
            if isinstance(v, bool):
                raise ValueError(v)
            return int(v)
        if typ == "float":
            return float(v)
        if typ == "dict":
            out = json.loads(v) if isinstance(v, str) else dict(v)
            if not isinstance(out, dict):
                raise ValueError(v)
            return out
        if typ == "list":  # a JSON list, or a comma-separated string (environment variables)
            if isinstance(v, str):
                out = json.loads(v) if v.strip().startswith("[") else [p.strip() for p in v.split(",") if p.strip()]
            else:
                out = list(v)
            return [str(x) for x in out]
        return str(v)
    except (TypeError, ValueError, json.JSONDecodeError) as e:
        raise WragError(f"WRAG setting {where}: cannot read {v!r} as {typ}") from e
