"""The hand-offs: what one request carries from process to process, and its wire forms.

A request crosses three processes of a vLLM server. Everything WRAG hands from one to the next
travels inside the request itself, in `SamplingParams.extra_args` (JSON-safe values), so vLLM
moves it for us and no side channel exists:

    API server (frontend.py)                client body: vllm_xargs {wrag_shards, wrag_top_k, ...}
        controls.parse_controls → RequestControls     (HTTP 400 on bad values)
        resolver.Resolver.resolve → Plan              (retrieval + score → weight rule)
        extra_args[PLAN_KEY] = plan.sealed()          (HMAC seal, seal.py)
              │  vLLM: EngineCoreRequest over ZMQ
              ▼
    engine core (admission.py, in vLLM's scheduler)
        Plan.from_sealed(extra_args[PLAN_KEY])        (refused unless sealed by this server)
        preparer.Preparer.prepare(plan) → [SlotRef]   (payload files: shards or one composite)
        extra_args[SLOTS_KEY] = slots_to_json(slots)  (+ the request's prefix-cache salt)
        admitted when its payloads fit the device pool
              │  vLLM: SchedulerOutput to the workers
              ▼
    worker (hooks/runner.py → pool.py)
        slots_from_json(extra_args[SLOTS_KEY])        (paths must lie in the server's run dir)
        ShardPool.step: payloads into device slots, per-sequence (slot, weight) lists
        wrag_kernels.DeltaMeta.fill                   (one step's batch layout, all layers)
              │
              ▼
    layers (hooks/layers.py): y = base(x) + Σ_j w_j · B_j (A_j x)   (wrag_kernels.apply_delta)

Keys in extra_args:
    PUBLIC_KEYS   the client's controls (vllm_xargs), parsed by controls.py
    PLAN_KEY      written by the API server: the sealed Plan JSON (version PLAN_VERSION); for a
                  completions request retrieved per prompt, the list of them in prompt order,
                  which hooks/prompts.py narrows to its own plan in each prompt's engine request
    SLOTS_KEY     written by the engine core: [[content key, weight, payload path], ...]
Clients may send neither server key: the front end answers 400, the engine refuses the request.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from ..compose.registry import DEFAULT_METHOD
from .seal import seal, unseal

PUBLIC_KEYS = ("wrag_shards", "wrag_weights", "wrag_top_k", "wrag_threshold", "wrag_method",
               "wrag_params", "wrag_off")
PLAN_KEY = "wrag_plan"      # API server → engine core
SLOTS_KEY = "wrag_slots"    # engine core → workers
INTERNAL_KEYS = (PLAN_KEY, SLOTS_KEY)
PLAN_VERSION = 1


def wrag_keys(xargs) -> list[str]:
    """The wrag_* keys of a vllm_xargs / extra_args dict."""
    return [k for k in (xargs or {}) if isinstance(k, str) and k.startswith("wrag_")]


@dataclass
class Plan:
    """The resolved shard set of one request: what the API server decided, the engine applies."""
    ids: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    method: str = DEFAULT_METHOD
    params: dict = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)   # retrieval scores (empty for explicit)
    source: str = "none"                                 # explicit | retrieved | off | none
    generation: int = -1                                 # store generation the plan was made at

    @property
    def empty(self) -> bool:
        return not self.ids

    def to_json(self) -> str:
        d = asdict(self)
        d["v"] = PLAN_VERSION
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str) -> "Plan":
        d = json.loads(s)
        if not isinstance(d, dict) or d.pop("v", None) != PLAN_VERSION:
            raise ValueError("not a WRAG plan of this version")
        p = cls(**d)
        if len(p.ids) != len(p.weights):
            raise ValueError("plan ids and weights differ in length")
        return p

    def sealed(self) -> str:
        """The form that travels in extra_args: only this server can make it (seal.py)."""
        return seal(self.to_json())

    @classmethod
    def from_sealed(cls, s) -> "Plan":
        """ValueError unless `s` is a plan sealed by this server."""
        return cls.from_json(unseal(s))

    def header(self) -> str:
        """Compact form for the x-wrag-shards response header: id=weight,... or '-'."""
        if self.empty:
            return "-"
        return ",".join(f"{i}={w:.4g}" for i, w in zip(self.ids, self.weights))

    def scores_header(self) -> str:
        """x-wrag-scores: id=p,... (relevance probability) for retrieved shards, '-' when none were retrieved."""
        if self.empty or not self.scores:
            return "-"
        return ",".join(f"{i}={s:.4f}" for i, s in zip(self.ids, self.scores))

    def summary(self) -> dict:
        return {"shards": [{"id": i, "weight": w, **({"score": s} if self.scores else {})}
                           for i, w, s in zip(self.ids, self.weights, self.scores or [None] * len(self.ids))],
                "method": self.method, "source": self.source}


@dataclass(frozen=True)
class SlotRef:
    """One slot payload of a request: a shard file the workers load into a device slot."""
    key: str       # content key: identical payload ⇔ identical key
    weight: float  # per-token weight the kernel applies
    path: str      # payload shard file (inside the run directory)


def slots_to_json(slots: list[SlotRef]) -> str:
    return json.dumps([[s.key, s.weight, s.path] for s in slots], separators=(",", ":"))


def slots_from_json(s: str, run_dir: str | None = None) -> list[SlotRef]:
    """ValueError if a payload path lies outside `run_dir` (when given)."""
    out = []
    for key, w, path in json.loads(s):
        if run_dir is not None and not os.path.realpath(path).startswith(os.path.realpath(run_dir) + os.sep):
            raise ValueError(f"slot payload {path!r} is outside the WRAG run directory")
        out.append(SlotRef(str(key), float(w), str(path)))
    return out
