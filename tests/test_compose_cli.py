"""`wrag merge` and merge_to_peft: a composite written as a PEFT adapter that real PEFT serves."""
from __future__ import annotations

import json

import pytest
import torch

from helpers_shards import random_shard, tiny_llama
from wrag_vllm.compose import compose
from wrag_vllm.compose.cli import PROVENANCE_FILE, merge_to_peft
from wrag_vllm.errors import ComposeError


def _peft_deltas(adapter_dir) -> dict:
    """Load the adapter into the tiny Llama with real PEFT, merge, and return W_merged − W_base."""
    from peft import PeftModel

    base_sd = {k: v.clone() for k, v in tiny_llama(0).state_dict().items()}
    merged = PeftModel.from_pretrained(tiny_llama(0), str(adapter_dir)).merge_and_unload()
    out = {}
    for k, v in merged.state_dict().items():
        if ".mlp." in k and k.endswith(".weight"):
            layer, mod = int(k.split(".")[2]), k.split(".")[-2]
            out[(layer, mod)] = v - base_sd[k]
    return out


def test_merge_to_peft_is_served_by_peft(tmp_path, tiny_fp):
    shards = [random_shard(tiny_fp, "med", rank=4, seed=1), random_shard(tiny_fp, "law", rank=2, seed=2),
              random_shard(tiny_fp, "code", rank=3, seed=3, modules=("up_proj",))]
    w = [0.5, 0.3, 0.2]
    out = tmp_path / "adapter"
    comp = merge_to_peft(shards, w, "linear", out)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / PROVENANCE_FILE).read_text())["id"] == comp.id
    got = _peft_deltas(out)
    for key in comp.factors:
        want = sum(wi * s.factors[key].delta() for s, wi in zip(shards, w) if key in s.factors)
        assert torch.allclose(got[key], want, atol=1e-5), key
    with pytest.raises(ComposeError, match="not an empty directory"):
        merge_to_peft(shards, w, "linear", out)


def test_wrag_merge_command(tmp_path, tiny_fp, capsys):
    pytest.importorskip("faiss")
    from helpers_store import unit

    from wrag_vllm.cli import main
    from wrag_vllm.store import ShardStore

    root = tmp_path / "store"
    store = ShardStore.init(root, base=tiny_fp)
    shards = [random_shard(tiny_fp, i, rank=3, seed=n) for n, i in enumerate(("a", "b", "c"))]
    for s in shards:
        store.add(s, embedding=unit(s.id))
    store.close()

    out = tmp_path / "merged"
    rc = main(["merge", "a", "b", "c", "--weights", "0.5,0.3", "0.2", "--method", "svd-centered",
               "--param", "lam=1.5", "--param", "rho=2", "--out", str(out), "--store", str(root), "--json"])
    assert rc == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"]["lam"] == 1.5 and info["params"]["rho"] == 2
    comp = compose(shards, [0.5, 0.3, 0.2], "svd-centered", lam=1.5, rho=2)
    assert info["id"] == comp.id
    got = _peft_deltas(out)
    for key, f in comp.factors.items():
        assert torch.allclose(got[key], f.delta(), atol=1e-5)

    rc = main(["merge", "a", "b", "--weights", "0.5", "--out", str(tmp_path / "x"), "--store", str(root)])
    assert rc == 2 and "1 weight(s) for 2 shard(s)" in capsys.readouterr().err
    rc = main(["merge", "a", "b", "--weights", "1", "1", "--param", "bogus=1", "--out", str(tmp_path / "y"),
               "--store", str(root)])
    assert rc == 2 and "no parameter(s) bogus" in capsys.readouterr().err
