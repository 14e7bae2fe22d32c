"""PEFT LoRA adapter directories <-> shards.

PEFT applies, per targeted linear layer, y = W·x + s · B·(A·x) with
    s = lora_alpha / r           (classic LoRA)
    s = lora_alpha / sqrt(r)     (rsLoRA, `use_rslora: true`)
where r and lora_alpha may be overridden per module by `rank_pattern` / `alpha_pattern`.
A shard stores exactly (A, B, s), so import is lossless. Export writes one rank r_max for all
modules (PEFT and vLLM need one r per adapter, or a rank_pattern vLLM does not read): each
module's factors are zero-padded to r_max and its scale is folded into B, with lora_alpha = r_max
so that PEFT's own scale is 1. Padding with zeros adds nothing to the product.

Shapes only tell that an adapter fits the base's widths; the adapter's `base_model_name_or_path`
tells which model it was trained on. Import refuses an adapter that names another model than the
base's recorded name (basenames compared, see fingerprint.model_basename) and records in the
provenance whether the name could be checked (`base_verified`).
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

from . import jsonio
from .errors import ShardError
from .fingerprint import BaseFingerprint, model_basename
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


def _rank(v, what: str) -> int:
    if type(v) is not int or v < 1:
        raise ShardError(f"{what} must be a positive integer, got {v!r}")
    return v


def _alpha(v, what: str) -> float:
    if type(v) not in (int, float) or not math.isfinite(v) or v <= 0:
        raise ShardError(f"{what} must be a positive finite number, got {v!r}")
    return float(v)


def _lora_settings(cfg: dict, where) -> tuple[int, float, bool, dict, dict]:
    """(r, lora_alpha, use_rslora, rank_pattern, alpha_pattern) of an adapter config, checked:
    ranks positive integers, alphas positive finite numbers, patterns objects whose keys compile
    as regexes. ShardError names the field that is wrong."""
    r = _rank(cfg.get("r", 8), f"{where}: r")
    alpha = _alpha(cfg.get("lora_alpha", r), f"{where}: lora_alpha")
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise ShardError(f"{where}: use_rslora must be true or false, got {rslora!r}")
    patterns = []
    for name, check in (("rank_pattern", _rank), ("alpha_pattern", _alpha)):
        pat = cfg.get(name) or {}
        if not isinstance(pat, dict):
            raise ShardError(f"{where}: {name} must be an object {{module pattern: value}}, got {type(pat).__name__}")
        for key, val in pat.items():
            try:
                re.compile(key)
            except re.error as e:
                raise ShardError(f"{where}: {name} key {key!r} is not a valid regular expression ({e})") from None
            check(val, f"{where}: {name}[{key!r}]")
        patterns.append(pat)
    return r, alpha, rslora, patterns[0], patterns[1]


def check_adapter_base(claimed, base: BaseFingerprint, where) -> bool:
    """True when the adapter's base_model_name_or_path names the base's recorded model, False
    when either name is unknown (nothing to check), ShardError when they name different models.
    (Older wrag exports wrote the architecture name when the base's name was unknown.)"""
    a = None if claimed == base.architecture else model_basename(claimed)
    b = model_basename(base.name_or_path)
    if a is None or b is None:
        return False
    if a != b:
        raise ShardError(
            f"{where}: the adapter was trained for base model {claimed!r} (base_model_name_or_path in "
            f"adapter_config.json) but it is being registered for base model {base.name_or_path!r}. "
            f"Register it in a store for {claimed!r}; or, if it really was trained on this base under "
            f"another name, set base_model_name_or_path in adapter_config.json to {b!r} (or to null "
            f"to skip the check)")
    return True


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
    cfg = jsonio.loads(cfg_path.read_bytes(), str(cfg_path), ShardError)
    if not isinstance(cfg, dict):
        raise ShardError(f"{cfg_path}: must be a JSON object, got {type(cfg).__name__}")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ShardError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LoRA")
    for flag, why in (("use_dora", "DoRA magnitude vectors are not low-rank deltas"),
                      ("modules_to_save", "it trains full copies of other modules (e.g. embeddings or the LM head)")):
        if cfg.get(flag):
            raise ShardError(f"{path}: {flag} is set; not supported because {why}")
    if cfg.get("bias", "none") not in ("none", None) or cfg.get("lora_bias"):
        raise ShardError(f"{path}: LoRA bias terms are not supported; train with bias='none'")
    r0, alpha0, rslora, rank_pattern, alpha_pattern = _lora_settings(cfg, cfg_path)
    claimed = cfg.get("base_model_name_or_path")
    claimed = claimed if isinstance(claimed, str) else None
    verified = check_adapter_base(claimed, base, path)
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ShardError(f"{w_path}: truncated or corrupt safetensors file ({e})") from e

    parts: dict[tuple[int, str], dict] = {}
    others = []
    for key, t in tensors.items():
        m = _PEFT_KEY.fullmatch(key)
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

    factors = {}
    for (layer, mod), p in sorted(parts.items()):
        if set(p) != {"lora_A", "lora_B"}:
            raise ShardError(f"{path}: layer {layer} {mod} lacks lora_A or lora_B")
        key = f"model.layers.{layer}.{'mlp' if mod in FFN_MODULES else 'self_attn'}.{mod}"
        r = _pattern_value(rank_pattern, key, r0)
        alpha = _pattern_value(alpha_pattern, key, alpha0)
        if p["lora_A"].shape[0] != r:
            raise ShardError(f"{path}: layer {layer} {mod} has rank {p['lora_A'].shape[0]} but the "
                             f"config says r={r}")
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        factors[(layer, mod)] = Factors(p["lora_A"], p["lora_B"], scale)
    shard = Shard(id=shard_id or path.name, base=base, factors=factors, name=name or shard_id or path.name,
                  description=description, samples=list(samples or []),
                  provenance={"source": "peft", "path": str(path.resolve()),
                              "base_model_name_or_path": claimed,
                              "base_verified": verified, "r": r0, "lora_alpha": alpha0, "use_rslora": rslora})
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
        "base_model_name_or_path": base_model_name_or_path or shard.base.name_or_path
        or shard.provenance.get("base_model_name_or_path") or None,
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
                    allow_attention: bool = False, queries: list[str] | None = None) -> Shard:
    """A shard file or a PEFT adapter directory as a validated Shard, with the given overrides.

    `base` is the model a PEFT adapter is checked against (a shard file carries its own, which
    must then be the same base; its name and weight_rms are filled in from `base` when known).
    """
    from .shard import load_shard

    path = Path(path)
    if path.is_dir():
        if base is None:
            raise ShardError("the store has no base model yet: give the base model (--base MODEL_DIR) so "
                             "the PEFT adapter can be checked against the model it was trained for")
        shard = import_peft(path, base, shard_id=shard_id, description=description or "", samples=samples,
                            allow_attention=allow_attention)
        shard.queries = list(queries or [])
        return shard.validate(allow_attention)
    if not path.is_file():
        raise ShardError(f"no such shard file or PEFT directory: {path}")
    shard = load_shard(path, allow_attention=allow_attention, validate=False)
    if base is not None:
        if (why := base.mismatch(shard.base)) is not None:
            raise ShardError(f"{path}: the shard was made for a different base model: {why}")
        shard.base = base.merged(shard.base)
    shard.id = shard_id or shard.id
    shard.description = description or shard.description
    shard.samples = list(samples) if samples else shard.samples
    shard.queries = list(queries) if queries else shard.queries
    return shard.validate(allow_attention)
