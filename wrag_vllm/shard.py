"""A shard: low-rank FFN deltas for one base model, stored as one safetensors file.

For decoder layer l and projection p in (gate_proj, up_proj, down_proj) a shard holds
factors A (r × d_in), B (d_out × r) and a scale s, so that the projection becomes

    y = W·x + s · B·(A·x)          i.e. ΔW = s · B·A   (d_out × d_in, never formed when serving)

File layout (safetensors; loading never executes code, unlike pickle):
    tensors   "layers.{l}.{p}.lora_A"  (r, d_in)
              "layers.{l}.{p}.lora_B"  (d_out, r)
              "layers.{l}.{p}.scale"   (1,) float32
    metadata  "wrag" -> JSON: id, name, description, samples, base (fingerprint), rank,
              target_modules, provenance, format_version
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ShardError
from .fingerprint import BaseFingerprint

FORMAT_VERSION = 1
FFN_MODULES = ("gate_proj", "up_proj", "down_proj")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
# Modules no shard may touch, not even with the research override: they are not low-rank linear
# deltas we can serve (embeddings, norms, the LM head).
NEVER_MODULES = ("embed_tokens", "lm_head", "norm", "input_layernorm", "post_attention_layernorm")
ATTENTION_REFUSAL = (
    "shards may only target the FFN projections (gate_proj, up_proj, down_proj): deltas on "
    "attention layers of instruction-tuned bases destroy instruction following (the original WRAG "
    "work measured up to 34 points lost). Pass allow_attention=True / --allow-attention to "
    "override for research; such shards are never applied by the server."
)
_KEY = re.compile(r"^layers\.(\d+)\.([a-z_]+)\.(lora_A|lora_B|scale)$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class Factors:
    """ΔW = scale · B @ A for one (layer, projection)."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """Dense ΔW (d_out × d_in), for references and offline tools only."""
        return self.scale * (self.B.float() @ self.A.float())


@dataclass
class Shard:
    id: str
    base: BaseFingerprint
    factors: dict[tuple[int, str], Factors]  # (layer, module) -> factors
    name: str = ""
    description: str = ""
    samples: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max((f.rank for f in self.factors.values()), default=0)

    @property
    def target_modules(self) -> list[str]:
        return sorted({m for _, m in self.factors})

    def meta(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "id": self.id,
            "name": self.name or self.id,
            "description": self.description,
            "samples": self.samples,
            "base": self.base.to_dict(),
            "rank": self.rank,
            "target_modules": self.target_modules,
            "provenance": self.provenance,
        }

    def nbytes(self) -> int:
        return sum(f.A.numel() * f.A.element_size() + f.B.numel() * f.B.element_size()
                   for f in self.factors.values())

    # ------------------------------------------------------------------ validation
    def validate(self, allow_attention: bool = False) -> "Shard":
        """Raise ShardError unless the shard is well-formed for its base model."""
        if not _ID.match(self.id or ""):
            raise ShardError(f"invalid shard id {self.id!r}: use 1-128 letters, digits, '.', '_', '-'")
        if not self.factors:
            raise ShardError(f"shard {self.id!r} has no factors")
        check_modules(self.target_modules, allow_attention)
        b = self.base
        dims = {"gate_proj": (b.hidden_size, b.intermediate_size),
                "up_proj": (b.hidden_size, b.intermediate_size),
                "down_proj": (b.intermediate_size, b.hidden_size)}
        for (layer, mod), f in self.factors.items():
            where = f"layer {layer} {mod}"
            if not 0 <= layer < b.num_layers:
                raise ShardError(f"{where}: layer index out of range for a {b.num_layers}-layer base")
            if f.A.dim() != 2 or f.B.dim() != 2:
                raise ShardError(f"{where}: factors must be 2-D, got A{tuple(f.A.shape)} B{tuple(f.B.shape)}")
            if f.A.shape[0] != f.B.shape[1] or f.A.shape[0] == 0:
                raise ShardError(f"{where}: rank mismatch, A is {tuple(f.A.shape)} but B is {tuple(f.B.shape)}")
            d_in, d_out = dims.get(mod, (b.hidden_size, None))
            if f.A.shape[1] != d_in or (d_out is not None and f.B.shape[0] != d_out):
                want = f"A (r, {d_in}), B ({d_out if d_out is not None else 'any'}, r)"
                raise ShardError(f"{where}: shapes A{tuple(f.A.shape)} B{tuple(f.B.shape)} do not fit "
                                 f"the base model ({want})")
            if not (math.isfinite(f.scale)):
                raise ShardError(f"{where}: scale is {f.scale}")
            for name, t in (("A", f.A), ("B", f.B)):
                if not t.is_floating_point():
                    raise ShardError(f"{where}: factor {name} has dtype {t.dtype}, expected floating point")
                if not torch.isfinite(t).all():
                    raise ShardError(f"{where}: factor {name} contains NaN or Inf values")
        return self

    # ------------------------------------------------------------------ file I/O
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temporary file in the same folder, fsync, then rename."""
        path = Path(path)
        tensors = {}
        for (layer, mod), f in sorted(self.factors.items()):
            tensors[f"layers.{layer}.{mod}.lora_A"] = f.A.detach().contiguous().cpu()
            tensors[f"layers.{layer}.{mod}.lora_B"] = f.B.detach().contiguous().cpu()
            tensors[f"layers.{layer}.{mod}.scale"] = torch.tensor([f.scale], dtype=torch.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a shard file is ordinary data
        try:
            save_file(tensors, tmp, metadata={"wrag": json.dumps(self.meta())})
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path


def check_modules(modules, allow_attention: bool = False) -> None:
    """Refuse anything but FFN projections (attention only with the research override)."""
    for m in modules:
        if m in FFN_MODULES:
            continue
        if m in ATTENTION_MODULES:
            if allow_attention:
                continue
            raise ShardError(f"target module {m!r} refused: {ATTENTION_REFUSAL}")
        if any(m == n or m.endswith(n) for n in NEVER_MODULES):
            raise ShardError(f"target module {m!r} refused: shards never touch embeddings, norms or the "
                             f"LM head; {ATTENTION_REFUSAL.split(':')[0]}")
        raise ShardError(f"target module {m!r} refused: unknown module; {ATTENTION_REFUSAL}")


def read_meta(path: str | os.PathLike) -> dict:
    """The header metadata only (no tensors are read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ShardError(f"{path}: not a readable safetensors shard file ({e})") from e
    if "wrag" not in meta:
        raise ShardError(f"{path}: safetensors file has no 'wrag' metadata; is it a shard?")
    try:
        return json.loads(meta["wrag"])
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: corrupt shard metadata ({e})") from e


def load_shard(path: str | os.PathLike, allow_attention: bool = False, validate: bool = True) -> Shard:
    """Load a shard file (safetensors only: no code is executed) and validate it."""
    meta = read_meta(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: shard format version {meta.get('format_version')!r} is not supported "
                         f"(this build reads version {FORMAT_VERSION})")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ShardError(f"{path}: truncated or corrupt shard file ({e})") from e
    parts: dict[tuple[int, str], dict] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise ShardError(f"{path}: unexpected tensor {key!r} in shard file")
        parts.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t
    factors = {}
    for k, p in parts.items():
        if set(p) != {"lora_A", "lora_B", "scale"}:
            raise ShardError(f"{path}: layer {k[0]} {k[1]} is missing one of lora_A, lora_B, scale")
        factors[k] = Factors(p["lora_A"], p["lora_B"], float(p["scale"].reshape(-1)[0]))
    try:
        base = BaseFingerprint.from_dict(meta["base"])
        shard = Shard(id=meta["id"], base=base, factors=factors, name=meta.get("name", ""),
                      description=meta.get("description", ""), samples=list(meta.get("samples", [])),
                      provenance=dict(meta.get("provenance", {})))
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{path}: corrupt shard metadata ({e})") from e
    return shard.validate(allow_attention) if validate else shard
