"""A real `vllm serve` with WRAG for tests: tiny model + tokenizer on disk, a store, one server.

The tokenizer is character-level (tokenizers WordLevel over printable ASCII, Fuse decoder), built
here and saved with PreTrainedTokenizerFast; the chat template is a 1-line Jinja template.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def build_tokenizer(out_dir: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_model_dir(out_dir: Path, seed: int = 0) -> Path:
    """Tiny random fp32 Llama + char tokenizer (+ chat template) saved as an HF folder.

    head_dim 32 (2 heads of hidden 64): the CPU attention backend supports head sizes >= 32 only.
    """
    from helpers_shards import tiny_llama

    out_dir = Path(out_dir)
    model = tiny_llama(seed, num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2, pad_token_id=3, torch_dtype=torch.float32)
    model.config.torch_dtype = torch.float32
    model.save_pretrained(out_dir, safe_serialization=True)
    build_tokenizer(out_dir)
    return out_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vllm serve` in a subprocess (own process group, killed as a group at exit)."""

    def __init__(self, model_dir, store_dir, tmp_dir, wrag: dict | None = None, api_key: str | None = None,
                 eager: bool = True, extra_args=(), env=None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = Path(tmp_dir) / "vllm-server.log"
        cfg = {"store": str(store_dir), **(wrag or {})}
        cmd = [str(VENV_BIN / "vllm"), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "64",
               "--served-model-name", "tiny", "--additional-config", json.dumps({"wrag": cfg}),
               "--kv-cache-memory-bytes", str(64 << 20), *extra_args]
        if eager:
            cmd.append("--enforce-eager")
        if api_key:
            cmd += ["--api-key", api_key]
        e = dict(os.environ)
        e.update({"VLLM_PLUGINS": "wrag", "VLLM_CACHE_ROOT": str(Path(tmp_dir) / "vllm-cache"),
                  "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                  "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "INFO"})
        e.pop("WRAG_RUN_DIR", None)
        e.update(env or {})
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=e,
                                     start_new_session=True, cwd=str(tmp_dir))

    def wait_ready(self, timeout: float = 400.0) -> float:
        import urllib.request

        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return time.time() - t0
            except OSError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vllm serve not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        with contextlib.suppress(OSError):
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-n:])
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()
