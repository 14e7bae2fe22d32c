"""PEFT LoRA adapter directories <-> shards.

PEFT applies, per targeted linear layer, y = W·x + s · B·(A·x) with
    s = lora_alpha / r           (classic LoRA)
    s = lora_alpha / sqrt(r)     (rsLoRA, `use_rslora: true`)
where r and lora_alpha may be overridden per module by `rank_pattern` / `alpha_pattern`.
A shard stores exactly (A, B, s), so import is lossless. Export writes one rank r_max for all
modules (PEFT and vLLM need one r per adapter, or a rank_pattern vLLM does not read): each
module's factors are zero-padded to r_max and its scale is folded into B, with lora_alpha = r_max
so that PEFT's own scale is 1. Padding with zeros adds nothing to the product.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ShardError
from .fingerprint import BaseFingerprint
from .shard import FFN_MODULES, Factors, Shard, check_modules

# base_model.model.model.layers.3.mlp.gate_proj.lora_A.weight (also with an adapter name
# before ".weight" in older PEFT versions: lora_A.default.weight)
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:mlp|self_attn)\."
                       r"([a-z_]+)\.(lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight$")


def _pattern_value(pattern: dict, module_key: str, default):
    """PEFT's rank_pattern/alpha_pattern: keys are regexes or suffixes of the module name."""
    for pat, val in (pattern or {}).items():
        if module_key == pat or module_key.endswith("." + pat) or re.fullmatch(pat, module_key):
            return val
    return default


def import_peft(path: str | Path, base: BaseFingerprint, shard_id: str | None = None,
                description: str = "", samples: list[str] | None = None,
                allow_attention: bool = False, name: str = "") -> Shard:
    """Read a PEFT LoRA adapter directory as a validated Shard for `base`."""
    path = Path(path)
    cfg_path, w_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise ShardError(f"{path}: not a PEFT adapter directory (no adapter_config.json)")
    if not w_path.is_file():
        hint = " (adapter_model.bin is a pickle and is not loaded: re-save with safe_serialization=True)" \
            if (path / "adapter_model.bin").exists() else ""
        raise ShardError(f"{path}: no adapter_model.safetensors{hint}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{cfg_path}: invalid JSON ({e})") from e
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ShardError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LoRA")
    for flag, why in (("use_dora", "DoRA magnitude vectors are not low-rank deltas"),
                      ("modules_to_save", "it trains full copies of other modules (e.g. embeddings or the LM head)")):
        if cfg.get(flag):
            raise ShardError(f"{path}: {flag} is set; not supported because {why}")
    if cfg.get("bias", "none") not in ("none", None) or cfg.get("lora_bias"):
        raise ShardError(f"{path}: LoRA bias terms are not supported; train with bias='none'")
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ShardError(f"{w_path}: truncated or corrupt safetensors file ({e})") from e

    parts: dict[tuple[int, str], dict] = {}
    others = []
    for key, t in tensors.items():
        m = _PEFT_KEY.match(key)
        if not m:
            others.append(key)
            continue
        parts.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t
    if others:
        # embeddings (lora_embedding_A), norms, lm_head... : name the first few
        modules = sorted({k.rsplit(".lora_", 1)[0].split(".")[-1] if ".lora_" in k else k for k in others})
        check_modules(modules, allow_attention)  # raises with the alignment explanation
        raise ShardError(f"{path}: unsupported tensors in adapter: {others[:3]}")
    if not parts:
        raise ShardError(f"{path}: adapter holds no LoRA factors")
    check_modules(sorted({m for _, m in parts}), allow_attention)

    r0, alpha0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", cfg.get("r", 8)))
    rslora = bool(cfg.get("use_rslora", False))
    factors = {}
    for (layer, mod), p in sorted(parts.items()):
        if set(p) != {"lora_A", "lora_B"}:
            raise ShardError(f"{path}: layer {layer} {mod} lacks lora_A or lora_B")
        key = f"model.layers.{layer}.{'mlp' if mod in FFN_MODULES else 'self_attn'}.{mod}"
        r = int(_pattern_value(cfg.get("rank_pattern"), key, r0))
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), key, alpha0))
        if p["lora_A"].shape[0] != r:
            raise ShardError(f"{path}: layer {layer} {mod} has rank {p['lora_A'].shape[0]} but the "
                             f"config says r={r}")
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        factors[(layer, mod)] = Factors(p["lora_A"], p["lora_B"], scale)
    shard = Shard(id=shard_id or path.name, base=base, factors=factors, name=name or shard_id or path.name,
                  description=description, samples=list(samples or []),
                  provenance={"source": "peft", "path": str(path.resolve()),
                              "base_model_name_or_path": cfg.get("base_model_name_or_path"),
                              "r": r0, "lora_alpha": alpha0, "use_rslora": rslora})
    return shard.validate(allow_attention)


def export_peft(shard: Shard, out_dir: str | Path, base_model_name_or_path: str | None = None,
                dtype: torch.dtype | None = None) -> Path:
    """Write `shard` as a PEFT LoRA directory that `peft` loads and vLLM's --lora-modules serves.

    Every layer of the base gets factors for every module the shard targets (zeros where the
    shard has none) so that loaders that expect a uniform adapter accept it.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ShardError(f"{out_dir}: output directory exists and is not empty")
    modules = shard.target_modules
    r = shard.rank
    b = shard.base
    dims = {"gate_proj": (b.hidden_size, b.intermediate_size), "up_proj": (b.hidden_size, b.intermediate_size),
            "down_proj": (b.intermediate_size, b.hidden_size)}
    any_f = next(iter(shard.factors.values()))
    dtype = dtype or any_f.A.dtype
    tensors = {}
    for layer in range(b.num_layers):
        for mod in modules:
            f = shard.factors.get((layer, mod))
            if f is None:
                d_in, d_out = dims[mod] if mod in dims else (b.hidden_size, any_f.B.shape[0])
                A, B = torch.zeros(r, d_in), torch.zeros(d_out, r)
            else:
                A = torch.zeros(r, f.A.shape[1])
                B = torch.zeros(f.B.shape[0], r)
                A[: f.rank] = f.A.float()
                B[:, : f.rank] = f.B.float() * f.scale
            sub = "mlp" if mod in FFN_MODULES else "self_attn"
            pre = f"base_model.model.model.layers.{layer}.{sub}.{mod}"
            tensors[f"{pre}.lora_A.weight"] = A.to(dtype).contiguous()
            tensors[f"{pre}.lora_B.weight"] = B.to(dtype).contiguous()
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
        "use_rslora": False, "use_dora": False, "bias": "none", "fan_in_fan_out": False,
        "target_modules": modules, "modules_to_save": None, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path
        or shard.provenance.get("base_model_name_or_path") or shard.base.architecture,
        "revision": None, "init_lora_weights": True,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "wrag_shard.json").write_text(json.dumps(shard.meta(), indent=2))
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def shard_from_path(path: str | Path, base: BaseFingerprint | None, shard_id: str | None = None,
                    description: str | None = None, samples: list[str] | None = None,
                    allow_attention: bool = False) -> Shard:
    """A shard file or a PEFT adapter directory as a validated Shard, with the given overrides.

    `base` is the model a PEFT adapter is checked against (a shard file carries its own).
    """
    from .shard import load_shard

    path = Path(path)
    if path.is_dir():
        if base is None:
            raise ShardError("the store has no base model yet: give the base model (--base MODEL_DIR) so "
                             "the PEFT adapter can be checked against the model it was trained for")
        return import_peft(path, base, shard_id=shard_id, description=description or "", samples=samples,
                           allow_attention=allow_attention)
    if not path.is_file():
        raise ShardError(f"no such shard file or PEFT directory: {path}")
    shard = load_shard(path, allow_attention=allow_attention)
    shard.id = shard_id or shard.id
    shard.description = description or shard.description
    shard.samples = list(samples) if samples else shard.samples
    return shard.validate(allow_attention)
