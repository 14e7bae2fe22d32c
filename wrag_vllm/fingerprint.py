"""Base-model fingerprint: which frozen base a shard was made for.

Shape fields (architecture, hidden and FFN sizes, layer count) catch most mismatches; the
`weights_hash` tells apart two bases of the same shape (e.g. two fine-tunes of one architecture):
sha256 over a strided sample of the first layer's gate_proj and the last layer's down_proj,
read as float32 (so a bf16 checkpoint and its exact fp32 upcast hash alike).

Two optional facts ride along and are NOT part of the identity (`mismatch`, `==`): the model's
`name_or_path` (config `_name_or_path`, else the folder), which lets a PEFT import check the
adapter's `base_model_name_or_path`, and `weight_rms`, the root-mean-square of the elements of
the two tensors hashed (as float32), the yardstick for how large a shard's deltas may be
(`shard.MAX_DELTA_RMS_RATIO`). Fingerprints written before they existed load and compare equal.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

_SAMPLE = 65536  # elements hashed per tensor
_IDENTITY = ("architecture", "hidden_size", "intermediate_size", "num_layers", "weights_hash")


@dataclass(frozen=True)
class BaseFingerprint:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    weights_hash: str
    # optional facts, not identity (compare=False: two fingerprints of one base are equal)
    name_or_path: str | None = field(default=None, compare=False)
    weight_rms: float | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        """All fields; the optional ones only when known (old readers see the old layout)."""
        return {k: v for k, v in asdict(self).items() if k in _IDENTITY or v is not None}

    def identity(self) -> dict:
        """The fields that decide which base this is."""
        return {k: getattr(self, k) for k in _IDENTITY}

    @classmethod
    def from_dict(cls, d: dict) -> "BaseFingerprint":
        """Parse a fingerprint dict (e.g. from an untrusted shard header); ValueError says which
        field is missing or of the wrong type."""
        if not isinstance(d, dict):
            raise ValueError(f"base fingerprint must be a JSON object, got {type(d).__name__}")
        for k in _IDENTITY:
            if k not in d:
                raise ValueError(f"base fingerprint lacks {k!r}")
        for k in ("architecture", "weights_hash"):
            if not isinstance(d[k], str) or not d[k]:
                raise ValueError(f"base fingerprint field {k!r} must be a non-empty string, got {d[k]!r}")
        for k in ("hidden_size", "intermediate_size", "num_layers"):
            if type(d[k]) is not int or d[k] < 1:
                raise ValueError(f"base fingerprint field {k!r} must be a positive integer, got {d[k]!r}")
        name, rms = d.get("name_or_path"), d.get("weight_rms")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"base fingerprint field 'name_or_path' must be a string, got {name!r}")
        if rms is not None and (type(rms) not in (int, float) or not math.isfinite(rms) or rms <= 0):
            raise ValueError(f"base fingerprint field 'weight_rms' must be a positive finite number, got {rms!r}")
        return cls(d["architecture"], d["hidden_size"], d["intermediate_size"], d["num_layers"],
                   d["weights_hash"], name or None, None if rms is None else float(rms))

    def merged(self, other: "BaseFingerprint | None") -> "BaseFingerprint":
        """self with the optional facts it lacks taken from `other` (a fingerprint of the same
        base); facts self already records are never replaced."""
        if other is None:
            return self
        return replace(self, name_or_path=self.name_or_path or other.name_or_path,
                       weight_rms=self.weight_rms if self.weight_rms is not None else other.weight_rms)

    def short(self) -> str:
        return (f"{self.architecture} h={self.hidden_size} ffn={self.intermediate_size} "
                f"L={self.num_layers} #{self.weights_hash[:12]}")

    def mismatch(self, other: "BaseFingerprint") -> str | None:
        """A human-readable reason why `other` is a different base, or None."""
        for k in _IDENTITY:
            a, b = getattr(self, k), getattr(other, k)
            if a != b:
                return f"{k} differs ({b!r} vs {a!r}): shard base {other.short()} vs {self.short()}"
        return None


def _hash_tensors(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        flat = t.detach().reshape(-1).float().cpu()
        step = max(1, flat.numel() // _SAMPLE)
        h.update(str(tuple(t.shape)).encode())
        h.update(flat[::step][:_SAMPLE].contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _rms(tensors) -> float | None:
    """sqrt(mean of x²) over all elements of `tensors`, read as float32, summed in float64 (6
    significant digits); None for all-zero weights, which give no scale to compare deltas with."""
    total = sum(float(t.detach().float().pow(2).sum(dtype=torch.float64)) for t in tensors)
    n = sum(t.numel() for t in tensors)
    return float(f"{math.sqrt(total / n):.6g}") if total > 0 else None


def model_basename(name: str | None) -> str | None:
    """A model name reduced for comparison: "HuggingFaceTB/SmolLM2-135M-Instruct" and a folder
    ".../smollm2-135m-instruct/" both give "smollm2-135m-instruct"; None when unknown."""
    if not isinstance(name, str) or not name.strip():
        return None
    return name.strip().replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower() or None


def _layer_keys(num_layers: int) -> tuple[str, str]:
    return ("model.layers.0.mlp.gate_proj.weight", f"model.layers.{num_layers - 1}.mlp.down_proj.weight")


def _from_config(cfg, tensors, arch: str | None = None, name: str | None = None) -> BaseFingerprint:
    arch = (getattr(cfg, "architectures", None) or [arch or type(cfg).__name__])[0]
    return BaseFingerprint(arch, int(cfg.hidden_size), int(cfg.intermediate_size),
                           int(cfg.num_hidden_layers), _hash_tensors(tensors),
                           name_or_path=getattr(cfg, "_name_or_path", None) or name or None,
                           weight_rms=_rms(tensors))


def fingerprint_model(model) -> BaseFingerprint:
    """Fingerprint an in-memory HF causal LM (e.g. LlamaForCausalLM)."""
    if hasattr(model, "get_base_model"):  # a PEFT wrapper: fingerprint the frozen base under it
        model = model.get_base_model()
    cfg = model.config
    sd = model.state_dict()
    keys = _layer_keys(cfg.num_hidden_layers)
    # weights under a PEFT LoRA layer are named ...gate_proj.base_layer.weight
    get = lambda k: sd[k] if k in sd else sd[k.replace(".weight", ".base_layer.weight")]
    return _from_config(cfg, [get(k) for k in keys], arch=type(model).__name__)


def fingerprint_dir(path: str | Path) -> BaseFingerprint:
    """Fingerprint an HF model folder (config.json + *.safetensors) without loading the model."""
    from safetensors import safe_open
    from transformers import AutoConfig

    path = Path(path)
    cfg = AutoConfig.from_pretrained(path)
    want = _layer_keys(cfg.num_hidden_layers)
    found = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in want:
                if k in fh.keys():
                    found[k] = fh.get_tensor(k)
    missing = [k for k in want if k not in found]
    if missing:
        raise FileNotFoundError(f"{path}: cannot fingerprint base model, tensors {missing} not found "
                                f"in its *.safetensors files")
    return _from_config(cfg, [found[k] for k in want], name=str(path))


def dumps(fp: BaseFingerprint) -> str:
    return json.dumps(fp.to_dict(), sort_keys=True)
