"""A real `vllm serve` with WRAG for tests: tiny model + tokenizer on disk, a store, one server.

The tokenizer is character-level (tokenizers WordLevel over printable ASCII, Fuse decoder), built
here and saved with PreTrainedTokenizerFast; the chat template is a 1-line Jinja template.
"""
from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import torch

from wrag_vllm.launch import VllmServer, free_port  # noqa: F401  (free_port: re-exported)

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
    if __package__:     # imported as tests.helpers_server (the serving benchmarks)
        from .helpers_shards import tiny_llama
    else:               # tests/ on sys.path (conftest.py)
        from helpers_shards import tiny_llama

    out_dir = Path(out_dir)
    model = tiny_llama(seed, num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2, pad_token_id=3, torch_dtype=torch.float32)
    model.config.torch_dtype = torch.float32
    model.save_pretrained(out_dir, safe_serialization=True)
    build_tokenizer(out_dir)
    return out_dir


class Server(VllmServer):
    """The test server: tiny fp32 model, WRAG on with `store_dir`, one OpenMP thread."""

    def __init__(self, model_dir, store_dir, tmp_dir, wrag: dict | None = None, api_key: str | None = None,
                 eager: bool = True, extra_args=(), env=None):
        e = {"VLLM_PLUGINS": "wrag", "VLLM_CACHE_ROOT": str(Path(tmp_dir) / "vllm-cache"),
             "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "INFO", "WRAG_RUN_DIR": None, **(env or {})}
        super().__init__(model_dir, tmp_dir, wrag={"store": str(store_dir), **(wrag or {})}, api_key=api_key,
                         eager=eager, env=e, kv_cache_bytes=64 << 20, served_name="tiny",
                         extra_args=["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "64",
                                     *extra_args])


def model_and_store(tmp: Path, descriptions: dict[str, str], seed: int):
    """A tiny model folder and a store holding one random rank-4 shard per (id, description), scale
    4 (large enough to change the random model's greedy tokens). (model_dir, fingerprint, store,
    {id: shard}); shard i has seed `seed + i`."""
    from helpers_shards import random_shard

    from wrag_vllm.fingerprint import fingerprint_dir
    from wrag_vllm.store import ShardStore

    model_dir = build_model_dir(tmp / "model")
    fp = fingerprint_dir(model_dir)
    store = ShardStore(tmp / "store")
    shards = {sid: random_shard(fp, sid, rank=4, seed=seed + i, description=desc, scale=4.0)
              for i, (sid, desc) in enumerate(descriptions.items())}
    for sh in shards.values():
        store.add(sh)
    return model_dir, fp, store, shards


_HF: dict = {}


def hf_greedy(model_dir, shards: dict, prompt: str, shard_ids=(), weights=(), method="linear", n: int = 8):
    """The reference: HF transformers fp32 greedy tokens with the composed delta added densely to
    the FFN weights (cached per arguments)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from wrag_vllm.compose import compose

    key = (str(model_dir), prompt, tuple(shard_ids), tuple(weights), method, n)
    if key in _HF:
        return _HF[key]
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    if shard_ids:
        comp = compose([shards[i] for i in shard_ids], list(weights), method)
        with torch.no_grad():
            for (layer, mod), f in comp.factors.items():
                w = getattr(model.model.layers[layer].mlp, mod).weight
                w += f.delta().to(w.dtype)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=tok.pad_token_id)
    _HF[key] = out[0, ids.shape[1]:].tolist()
    return _HF[key]


def call_json(base_url: str, path: str, body=None, key: str | None = None, method: str = "POST",
              timeout: float = 120):
    """(status, headers, JSON body) of one request to the server; HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base_url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"{}")

