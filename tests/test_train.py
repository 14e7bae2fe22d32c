"""`wrag train` on a tiny random Llama with a tiny tokenizer built here (no model hub)."""
from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from helpers_shards import tiny_llama
from wrag_vllm import train
from wrag_vllm.errors import ShardError, WragError
from wrag_vllm.fingerprint import fingerprint_dir
from wrag_vllm.shard import FFN_MODULES, load_shard

CORPUS = [
    "The heart pumps blood through the arteries and veins of the body.",
    "A hash table maps keys to values using a hash function.",
    "The court held that the contract was void for lack of consideration.",
    "Rome was founded, according to legend, by Romulus and Remus.",
] * 6
FAST = train.TrainConfig(rank=4, steps=6, batch_size=2, seq_len=32, lr=2e-2, dtype="float32",
                         factor_dtype="float32", checkpoint_every=2, threads=1)


def _fit(base_dir, work_dir, cfg=FAST, texts=CORPUS, **kw):
    """train_shard on the tiny base, quietly."""
    return train.train_shard(base_dir, texts, cfg, work_dir=work_dir, progress=False, **kw)


def _tiny_tokenizer(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-train-base")
    tok = _tiny_tokenizer(CORPUS)
    tiny_llama(0, vocab_size=len(tok)).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


def _loss(model, tok, texts, shard=None) -> float:
    """Mean LM loss with the shard's ΔW = s·B·A added densely to each FFN weight."""
    import copy
    m = copy.deepcopy(model)
    if shard is not None:
        with torch.no_grad():
            for (layer, mod), f in shard.factors.items():
                getattr(m.model.layers[layer].mlp, mod).weight += f.delta()
    blocks = train.pack(tok, texts, 32)
    with torch.no_grad():
        return float(m(input_ids=blocks, labels=blocks).loss)


def test_train_tiny_ffn_only_and_improves(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "s.safetensors"
    shard = _fit(tiny_dir, tmp_path / "w", out_path=out, shard_id="tiny", description="test shard",
                 samples=["a sample"])
    assert shard.target_modules == sorted(FFN_MODULES)
    assert set(shard.factors) == {(l, m) for l in range(2) for m in FFN_MODULES}
    assert all(f.rank == 4 and f.scale == pytest.approx(8 / 4) for f in shard.factors.values())
    assert shard.base == fingerprint_dir(tiny_dir)
    assert any(f.B.abs().sum() > 0 for f in shard.factors.values()), "B must have moved from its zero init"
    back = load_shard(out)
    assert back.id == "tiny" and back.description == "test shard" and back.samples == ["a sample"]
    assert back.provenance["source"] == "wrag train" and back.provenance["steps"] == 6
    # the conversion (orientation of A/B, scale) is right iff the dense delta lowers the loss
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert _loss(model, tok, CORPUS, back) < _loss(model, tok, CORPUS) - 0.05


def test_resume_equals_uninterrupted(tiny_dir, tmp_path):
    ref = _fit(tiny_dir, tmp_path / "a")
    with pytest.raises(train.TrainingPaused):
        _fit(tiny_dir, tmp_path / "b", stop_after=3)
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 3
    resumed = _fit(tiny_dir, tmp_path / "b")
    for k, f in ref.factors.items():
        torch.testing.assert_close(resumed.factors[k].A, f.A, rtol=0, atol=1e-6)
        torch.testing.assert_close(resumed.factors[k].B, f.B, rtol=0, atol=1e-6)
    assert resumed.provenance["loss_last10"] == pytest.approx(ref.provenance["loss_last10"], abs=1e-5)


def test_same_seed_same_shard_other_seed_differs(tiny_dir, tmp_path):
    cfg = dataclasses.replace(FAST, steps=2)
    a = _fit(tiny_dir, tmp_path / "a", cfg)
    b = _fit(tiny_dir, tmp_path / "b", cfg)
    c = _fit(tiny_dir, tmp_path / "c", dataclasses.replace(cfg, seed=1))
    k = (0, "gate_proj")
    assert torch.equal(a.factors[k].A, b.factors[k].A)
    assert not torch.equal(a.factors[k].A, c.factors[k].A)


def test_work_dir_of_another_run_is_refused(tiny_dir, tmp_path):
    with pytest.raises(train.TrainingPaused):
        _fit(tiny_dir, tmp_path / "w", stop_after=1)
    with pytest.raises(WragError, match="differs in lr"):
        _fit(tiny_dir, tmp_path / "w", dataclasses.replace(FAST, lr=1e-3))
    # --restart discards it
    s = _fit(tiny_dir, tmp_path / "w", dataclasses.replace(FAST, steps=1), restart=True)
    assert s.provenance["steps"] == 1


@pytest.mark.parametrize("targets", [["q_proj"], ["gate_proj", "o_proj"], ["lm_head"], ["embed_tokens"]])
def test_non_ffn_targets_refused(tiny_dir, tmp_path, targets):
    with pytest.raises(ShardError, match="refused"):
        _fit(tiny_dir, tmp_path / "w", dataclasses.replace(FAST, target_modules=targets))
    assert not (tmp_path / "w").exists(), "refused before any work"


def test_attention_only_with_the_research_override(tiny_dir, tmp_path):
    """The attention ablation trains q/k/v/o too; only with the explicit override."""
    shard = _fit(tiny_dir, tmp_path / "w",
                 dataclasses.replace(FAST, target_modules=["gate_proj", "q_proj"], allow_attention=True))
    assert shard.target_modules == ["gate_proj", "q_proj"]
    with pytest.raises(ShardError, match="instruction following"):
        shard.validate()


def test_config_check_and_derived_values():
    cfg = train.TrainConfig()
    cfg.check()
    assert cfg.lora_alpha == 16.0 and cfg.warmup_steps == 10
    assert train.TrainConfig(rank=4, alpha=3, steps=20).lora_alpha == 3.0
    assert train.TrainConfig(steps=20).warmup_steps == 2 and train.TrainConfig(steps=5).warmup_steps == 1
    for bad in (dict(rank=0), dict(steps=0), dict(batch_size=0), dict(seq_len=1), dict(lr=0.0)):
        with pytest.raises(WragError, match="seq_len >= 2 and lr > 0"):
            train.TrainConfig(**bad).check()
    with pytest.raises(WragError, match="dtype must be one of"):
        train.TrainConfig(factor_dtype="int8").check()
    with pytest.raises(ShardError, match="refused"):
        train.TrainConfig(target_modules=("q_proj",)).check()
    train.TrainConfig(target_modules=("gate_proj", "q_proj"), allow_attention=True).check()


def test_empty_corpus_refused(tiny_dir, tmp_path):
    with pytest.raises(WragError, match="empty corpus"):
        _fit(tiny_dir, tmp_path / "w", texts=["", "  \n"])
    assert not (tmp_path / "w").exists()


def test_batch_order_is_a_seeded_permutation_per_epoch():
    n = 7
    first_epoch = torch.cat([train.batch_indices(s, 1, n, seed=3) for s in range(n)])
    assert sorted(first_epoch.tolist()) == list(range(n))
    assert torch.equal(train.batch_indices(5, 2, n, 3), train.batch_indices(5, 2, n, 3))
    assert not torch.equal(torch.cat([train.batch_indices(s, 1, n, 4) for s in range(n)]), first_epoch)


def test_lr_schedule():
    f = [train.lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_load_texts(tmp_path):
    (tmp_path / "c.txt").write_text("first para\nline two\n\n\nsecond para\n\n")
    assert train.load_texts(tmp_path / "c.txt") == ["first para\nline two", "second para"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "a"}) + "\n\n" + json.dumps({"text": "b"}) + "\n")
    assert train.load_texts(tmp_path / "c.jsonl") == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"txt": "a"}) + "\n")
    with pytest.raises(WragError, match="bad.jsonl:1"):
        train.load_texts(tmp_path / "bad.jsonl")
    with pytest.raises(WragError, match="not found"):
        train.load_texts(tmp_path / "nope.txt")


def test_corpus_too_small(tiny_dir, tmp_path):
    with pytest.raises(WragError, match="too small"):
        _fit(tiny_dir, tmp_path / "w", texts=["hi"])


def _cli_args(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", default="unused")
    parser.add_argument("--json", action="store_true")
    sub = parser.add_subparsers()
    train.register_cli(sub)
    return parser.parse_args(argv)


def test_cli_defaults_are_the_config_defaults():
    args = _cli_args(["train", "--corpus", "c.txt"])
    d = train.TrainConfig()
    for k in ("rank", "alpha", "steps", "lr", "batch_size", "seq_len", "seed", "dtype", "checkpoint_every",
              "threads"):
        assert getattr(args, k) == getattr(d, k), k


def test_cli_train_to_file(tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS))
    out = tmp_path / "cli.safetensors"
    args = _cli_args(["--json", "train", "--corpus", str(corpus), "--base", str(tiny_dir), "--no-register",
                      "--out", str(out), "--rank", "2", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                      "--dtype", "float32", "--threads", "1", "--work-dir", str(tmp_path / "w")])
    assert args.func(args) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["id"] == "corpus" and info["rank"] == 2 and not info["registered"]
    assert load_shard(out).rank == 2


def test_cli_refuses_losing_the_shard(tiny_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS))
    args = _cli_args(["train", "--corpus", str(corpus), "--base", str(tiny_dir), "--no-register"])
    with pytest.raises(WragError, match="--out"):
        args.func(args)
    args = _cli_args(["train", "--corpus", str(corpus), "--base", str(tiny_dir)])
    with pytest.raises(WragError, match="--description, --samples or --queries"):
        args.func(args)


@pytest.mark.slow
def test_cli_train_registers_in_store(tiny_dir, tmp_path, capsys):
    """The real path: train, then ShardStore.add with the default (MiniLM) embedder, then search."""
    from wrag_vllm.store import ShardStore

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS))
    store = tmp_path / "store"
    argv = ["--store", str(store), "train", "--corpus", str(corpus), "--base", str(tiny_dir), "--id", "cardio",
            "--description", "the heart and blood circulation", "--rank", "2", "--steps", "2",
            "--batch-size", "2", "--seq-len", "32", "--dtype", "float32", "--threads", "1",
            "--work-dir", str(tmp_path / "w")]
    args = _cli_args(argv)
    assert args.func(args) == 0
    st = ShardStore(store)
    assert [r["id"] for r in st.list()] == ["cardio"]
    assert st.load("cardio").rank == 2
    assert st.search("How does blood flow through the heart?", k=1)[0][0] == "cardio"
    args = _cli_args(argv)  # same id again: refused before training
    with pytest.raises(WragError, match="already has a shard"):
        args.func(args)


def test_corpus_questions_become_the_shards_queries(tmp_path):
    """A .jsonl corpus's "prompt"/"question" fields are kept as queries; text files have none."""
    from wrag_vllm.train import corpus_questions

    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "Aspirin inhibits COX.", "question": "Does aspirin thin the blood?"}\n\n'
                 '{"text": "Statins lower LDL.", "prompt": "  What do statins do? "}\n{"text": "No question."}\n')
    assert corpus_questions(p) == ["Does aspirin thin the blood?", "What do statins do?"]
    t = tmp_path / "c.txt"
    t.write_text("Aspirin inhibits COX.\n\nStatins lower LDL.")
    assert corpus_questions(t) == []
