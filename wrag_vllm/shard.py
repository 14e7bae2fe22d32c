"""A shard: low-rank FFN deltas for one base model, stored as one safetensors file.

For decoder layer l and projection p in (gate_proj, up_proj, down_proj) a shard holds
factors A (r × d_in), B (d_out × r) and a scale s, so that the projection becomes

    y = W·x + s · B·(A·x)          i.e. ΔW = s · B·A   (d_out × d_in, never formed when serving)

File layout (safetensors; loading never executes code, unlike pickle):
    tensors   "layers.{l}.{p}.lora_A"  (r, d_in)
              "layers.{l}.{p}.lora_B"  (d_out, r)
              "layers.{l}.{p}.scale"   (1,) float32
    metadata  "wrag" -> JSON: id, name, description, samples, queries, base (fingerprint), rank,
              target_modules, provenance, format_version

samples are texts of the shard's domain (what it was trained on: documents, abstracts); queries are
requests it should serve, phrased as users ask. Retrieval is fitted on both (store/relevance.py).

Everything in a shard file is untrusted: `check_meta` checks the header, `Shard.validate` the
shard (id, bounded texts, shapes for the base, finite values and bounded delta magnitudes).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from . import jsonio
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
_KEY = re.compile(r"layers\.(0|[1-9][0-9]*)\.([a-z_]+)\.(lora_A|lora_B|scale)")  # fullmatch
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # fullmatch: no trailing newline slips through

# Bounds on the texts a shard carries: they are embedded, stored in the catalog, listed by
# `wrag ls` and shown on the chat page. Generous for real shards (the demo shards use < 500
# characters per text), small enough that one shard cannot bloat the catalog or the embedder.
MAX_NAME_CHARS = 256
MAX_DESCRIPTION_CHARS = 4096
MAX_SAMPLE_COUNT = 1000  # samples (and queries) kept in the file (the store embeds the first 32 / 128)
MAX_SAMPLE_CHARS = 8192  # per sample or query
MAX_PROVENANCE_BYTES = 16 * 1024  # of its JSON encoding

# Bounds on ΔW = s·B·A, checked in factor space at validation (see delta_rms):
# RMS(ΔW) ≤ MAX_DELTA_RMS_RATIO × RMS(base weights) when the base's weight_rms is known.
MAX_DELTA_RMS_RATIO = 32.0  # measured max: demo shards 0.027, test random_shard 6.1 (r8, s4); docs/decisions.md
MAX_DELTA_RMS = 1.0  # always, whatever the base: 5-50× the RMS of real LLM weight matrices
MAX_FACTOR_ABS = 1e4  # |x| and |s·x| for every entry x of A and B: fp16/bf16 slots hold them with room


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
    queries: list[str] = field(default_factory=list)

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
            "queries": self.queries,
            "base": self.base.to_dict(),
            "rank": self.rank,
            "target_modules": self.target_modules,
            "provenance": self.provenance,
        }

    def nbytes(self) -> int:
        return sum(f.A.numel() * f.A.element_size() + f.B.numel() * f.B.element_size()
                   for f in self.factors.values())

    # ------------------------------------------------------------------ validation
    def validate(self, allow_attention: bool = False, base: BaseFingerprint | None = None) -> "Shard":
        """Raise ShardError unless the shard is well-formed for its base model.

        base: a fingerprint of the same base that may know more than the shard's own header (the
        store's record); its weight_rms, when known, bounds the deltas (MAX_DELTA_RMS_RATIO).
        """
        if (why := id_problem(self.id)) is not None:
            raise ShardError(why)
        check_texts(self.name, self.description, self.samples, self.provenance, f"shard {self.id!r}",
                    self.queries)
        if not self.factors:
            raise ShardError(f"shard {self.id!r} has no factors")
        check_modules(self.target_modules, allow_attention)
        b = self.base
        weight_rms = base.weight_rms if base is not None and base.weight_rms is not None else b.weight_rms
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
            check_magnitude(f, weight_rms, where)
        return self

    # ------------------------------------------------------------------ file I/O
    def to_bytes(self) -> bytes:
        """The shard's safetensors file, as bytes."""
        tensors = {}
        for (layer, mod), f in sorted(self.factors.items()):
            tensors[f"layers.{layer}.{mod}.lora_A"] = f.A.detach().contiguous().cpu()
            tensors[f"layers.{layer}.{mod}.lora_B"] = f.B.detach().contiguous().cpu()
            tensors[f"layers.{layer}.{mod}.scale"] = torch.tensor([f.scale], dtype=torch.float32)
        return save(tensors, metadata={"wrag": json.dumps(self.meta())})

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temporary file in the same folder, fsync, then rename.

        The file is created with mode 0666 minus the umask (0644 under umask 022), like any data
        file. (safetensors' save_file replaces its target with a new 0600 file, whatever mode
        the target had, so the bytes are serialised here and written to our own file.)
        """
        return write_atomic(Path(path), self.to_bytes())


def id_problem(shard_id) -> str | None:
    """Why `shard_id` is not a valid shard id (1-128 letters, digits, '.', '_', '-', starting with
    a letter or digit), or None. Ids name files in the store, so nothing else is allowed."""
    if isinstance(shard_id, str) and _ID.fullmatch(shard_id):
        return None
    return (f"invalid shard id {shard_id!r}: use 1-128 letters, digits, '.', '_', '-', starting with a "
            f"letter or digit")


def check_texts(name, description, samples, provenance, where: str, queries=()) -> None:
    """ShardError unless name and description are strings, samples and queries lists of strings
    and provenance a JSON-serialisable dict, all within the MAX_* bounds above."""
    for field_name, value, limit in (("name", name, MAX_NAME_CHARS),
                                     ("description", description, MAX_DESCRIPTION_CHARS)):
        if not isinstance(value, str):
            raise ShardError(f"{where}: {field_name} must be a string, got {type(value).__name__}")
        if len(value) > limit:
            raise ShardError(f"{where}: {field_name} has {len(value)} characters, at most {limit} are allowed")
    for what, texts in (("samples", samples), ("queries", queries)):
        if not isinstance(texts, (list, tuple)) or not all(isinstance(x, str) for x in texts):
            raise ShardError(f"{where}: {what} must be a list of strings, got {type(texts).__name__}"
                             + ("" if not isinstance(texts, (list, tuple)) else " with non-string items"))
        if len(texts) > MAX_SAMPLE_COUNT:
            raise ShardError(f"{where}: {len(texts)} {what}, at most {MAX_SAMPLE_COUNT} are allowed")
        if (longest := max(map(len, texts), default=0)) > MAX_SAMPLE_CHARS:
            raise ShardError(f"{where}: one of the {what} has {longest} characters, at most "
                             f"{MAX_SAMPLE_CHARS} are allowed")
    if not isinstance(provenance, dict):
        raise ShardError(f"{where}: provenance must be a JSON object, got {type(provenance).__name__}")
    try:
        size = len(json.dumps(provenance).encode())
    except (TypeError, ValueError, RecursionError) as e:
        raise ShardError(f"{where}: provenance is not JSON-serialisable ({e})") from None
    if size > MAX_PROVENANCE_BYTES:
        raise ShardError(f"{where}: provenance is {size} bytes as JSON, at most {MAX_PROVENANCE_BYTES} are allowed")


def delta_rms(f: Factors) -> float:
    """RMS of the entries of ΔW = s·B·A without forming it: ‖BA‖_F² = trace((BᵀB)(AAᵀ)) on r×r
    matrices, in float64, so RMS = |s|·‖BA‖_F / sqrt(d_out·d_in)."""
    A, B = f.A.detach().double(), f.B.detach().double()
    fro2 = max(0.0, float(torch.trace((B.T @ B) @ (A @ A.T))))  # ≥ 0 up to rounding
    return abs(f.scale) * math.sqrt(fro2 / (B.shape[0] * A.shape[1]))


def check_magnitude(f: Factors, weight_rms: float | None, where: str) -> None:
    """ShardError unless the factors (alone and times |s|, whichever the scale is folded into)
    stay within MAX_FACTOR_ABS and RMS(ΔW) within MAX_DELTA_RMS and, when the base's weight_rms
    is known, MAX_DELTA_RMS_RATIO × weight_rms. Such deltas are not a fine-tune but a takeover
    (or an fp16 overflow) of the base model."""
    biggest = max(float(f.A.abs().max()), float(f.B.abs().max())) * max(1.0, abs(f.scale))
    if not biggest <= MAX_FACTOR_ABS:
        raise ShardError(f"{where}: factor entries reach {biggest:.3g} in magnitude (with the scale "
                         f"{f.scale:g}), at most {MAX_FACTOR_ABS:g} are allowed")
    rms = delta_rms(f)
    if weight_rms is not None and not rms <= MAX_DELTA_RMS_RATIO * weight_rms:
        raise ShardError(f"{where}: the delta s·B·A has RMS {rms:.3g}, {rms / weight_rms:.3g}× the RMS of the "
                         f"base model's weights ({weight_rms:.3g}); at most {MAX_DELTA_RMS_RATIO:g}× is "
                         f"allowed: check the scale (lora_alpha / r) and the factors")
    if not rms <= MAX_DELTA_RMS:
        raise ShardError(f"{where}: the delta s·B·A has RMS {rms:.3g}, at most {MAX_DELTA_RMS:g} is allowed; "
                         f"check the scale (lora_alpha / r) and the factors")


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


def check_meta(meta, where) -> dict:
    """The `wrag` header of a shard file, checked (ShardError says what is wrong): a JSON object
    of this format version with a string id, a well-formed base fingerprint, string name and
    description, a list of string samples and a dict provenance, within the MAX_* bounds."""
    if not isinstance(meta, dict):
        raise ShardError(f"{where}: shard metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{where}: shard format version {meta.get('format_version')!r} is not supported "
                         f"(this build reads version {FORMAT_VERSION})")
    if not isinstance(meta.get("id"), str):
        raise ShardError(f"{where}: shard metadata field 'id' must be a string, got {meta.get('id')!r}")
    if "base" not in meta:
        raise ShardError(f"{where}: shard metadata lacks the base model fingerprint 'base'")
    try:
        BaseFingerprint.from_dict(meta["base"])
    except ValueError as e:
        raise ShardError(f"{where}: corrupt shard metadata: {e}") from None
    check_texts(meta.get("name", ""), meta.get("description", ""), meta.get("samples", []),
                meta.get("provenance", {}), str(where), meta.get("queries", []))
    return meta


def read_meta(path: str | os.PathLike) -> dict:
    """The header metadata only (no tensors are read), checked by check_meta."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ShardError(f"{path}: not a readable safetensors shard file ({e})") from e
    if "wrag" not in meta:
        raise ShardError(f"{path}: safetensors file has no 'wrag' metadata; is it a shard?")
    return check_meta(jsonio.loads(meta["wrag"], f"{path}: corrupt shard metadata", ShardError), path)


def write_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder, fsync, rename: a reader
    sees the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{secrets.token_hex(8)}.safetensors"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def load_shard(path: str | os.PathLike, allow_attention: bool = False, validate: bool = True) -> Shard:
    """Load a shard file (safetensors only: no code is executed) and validate it."""
    meta = read_meta(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ShardError(f"{path}: truncated or corrupt shard file ({e})") from e
    parts: dict[tuple[int, str], dict] = {}
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        if not m:
            raise ShardError(f"{path}: unexpected tensor {key!r} in shard file")
        parts.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t
    factors = {}
    for k, p in parts.items():
        if set(p) != {"lora_A", "lora_B", "scale"}:
            raise ShardError(f"{path}: layer {k[0]} {k[1]} is missing one of lora_A, lora_B, scale")
        s = p["scale"]
        if tuple(s.shape) != (1,) or not s.is_floating_point():
            raise ShardError(f"{path}: layer {k[0]} {k[1]}: scale must be a floating-point tensor of shape "
                             f"(1,), got {s.dtype} of shape {tuple(s.shape)}")
        factors[k] = Factors(p["lora_A"], p["lora_B"], float(s[0]))
    shard = Shard(id=meta["id"], base=BaseFingerprint.from_dict(meta["base"]), factors=factors,
                  name=meta.get("name", ""), description=meta.get("description", ""),
                  samples=list(meta.get("samples", [])), provenance=dict(meta.get("provenance", {})),
                  queries=list(meta.get("queries", [])))
    return shard.validate(allow_attention) if validate else shard
