"""Base-model fingerprint: which frozen base a shard was made for.

Shape fields (architecture, hidden and FFN sizes, layer count) catch most mismatches; the
`weights_hash` tells apart two bases of the same shape (e.g. two fine-tunes of one architecture):
sha256 over a strided sample of the first layer's gate_proj and the last layer's down_proj,
read as float32 (so a bf16 checkpoint and its exact fp32 upcast hash alike).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

_SAMPLE = 65536  # elements hashed per tensor


@dataclass(frozen=True)
class BaseFingerprint:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    weights_hash: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BaseFingerprint":
        return cls(str(d["architecture"]), int(d["hidden_size"]), int(d["intermediate_size"]),
                   int(d["num_layers"]), str(d["weights_hash"]))

    def short(self) -> str:
        return (f"{self.architecture} h={self.hidden_size} ffn={self.intermediate_size} "
                f"L={self.num_layers} #{self.weights_hash[:12]}")

    def mismatch(self, other: "BaseFingerprint") -> str | None:
        """A human-readable reason why `other` is a different base, or None."""
        for k in ("architecture", "hidden_size", "intermediate_size", "num_layers", "weights_hash"):
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


def _layer_keys(num_layers: int) -> tuple[str, str]:
    return (f"model.layers.0.mlp.gate_proj.weight", f"model.layers.{num_layers - 1}.mlp.down_proj.weight")


def _from_config(cfg, tensors, arch: str | None = None) -> BaseFingerprint:
    arch = (getattr(cfg, "architectures", None) or [arch or type(cfg).__name__])[0]
    return BaseFingerprint(arch, int(cfg.hidden_size), int(cfg.intermediate_size),
                           int(cfg.num_hidden_layers), _hash_tensors(tensors))


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
    return _from_config(cfg, [found[k] for k in want])


def fingerprint(path_or_model) -> BaseFingerprint:
    if isinstance(path_or_model, (str, Path)):
        return fingerprint_dir(path_or_model)
    return fingerprint_model(path_or_model)


def dumps(fp: BaseFingerprint) -> str:
    return json.dumps(fp.to_dict(), sort_keys=True)
