"""Hostile inputs (found by a security review) get a clear WragError, never a traceback, and leave the
store as it was: shard headers, text sizes, ids, PEFT configs, delta magnitudes, store URLs, deep JSON.

CLI cases run `wrag_vllm.cli.main` in-process (one embedder load per test process) or the installed
`wrag` script, and check: exit code 2, `error:` on stderr, no traceback, `wrag ls --json` unchanged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_shards import random_shard, tiny_llama
from helpers_store import unit
from wrag_vllm import shard as shard_mod
from wrag_vllm.errors import ShardError, StoreError, WragError
from wrag_vllm.fingerprint import BaseFingerprint, fingerprint_dir, fingerprint_model
from wrag_vllm.peft_io import import_peft
from wrag_vllm.shard import Factors, load_shard
from wrag_vllm.store import ShardStore

DEEP = "[" * 100_000 + "]" * 100_000  # far beyond Python's recursion limit


# ------------------------------------------------------------------------------ helpers
def wrag(*args, store) -> tuple[int, str, str]:
    """The CLI in-process: (exit code, stdout, stderr). Any exception other than the CLI's own
    handling of WragError propagates and fails the test."""
    from wrag_vllm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["--store", str(store), *map(str, args)])
    return rc, out.getvalue(), err.getvalue()


def listing(store) -> tuple[str, list[str]]:
    """What the store shows: `wrag ls --json` and the names of its shard files."""
    rc, out, err = wrag("ls", "--json", store=store)
    assert rc == 0, err
    return out, sorted(p.name for p in (Path(store) / "shards").iterdir())


def refused(store, *args, match: str) -> str:
    """Run `wrag ARGS`: exit 2 with `error: ...` matching `match`, no traceback, store unchanged."""
    before = listing(store)
    rc, out, err = wrag(*args, store=store)
    assert rc == 2, (args, out, err)
    assert re.search(r"^error: ", err, re.M) and "Traceback" not in err, err  # (stderr may show a progress bar)
    assert re.search(match, err), (match, err)
    assert listing(store) == before
    return err


@pytest.fixture
def store(tmp_path, tiny_fp):
    """A store holding one shard 'keep' (precomputed embedding: no embedder load)."""
    root = tmp_path / "store"
    with ShardStore(root) as st:
        st.add(random_shard(tiny_fp, "keep", description="kept shard"), embedding=unit("keep"))
    return root


@pytest.fixture
def good_file(tmp_path, tiny_fp):
    return random_shard(tiny_fp, "good", rank=2, description="a good shard").save(tmp_path / "good.safetensors")


def rewrite(src: Path, dst: Path, meta=None, raw_meta: str | None = None, tensors: dict | None = None) -> Path:
    """A copy of shard file `src` with its `wrag` header replaced (meta: the new header, or a
    function of the old one; raw_meta: the header text) and some tensors replaced."""
    tensors = {**load_file(str(src)), **(tensors or {})}
    if raw_meta is None:
        from safetensors import safe_open

        with safe_open(str(src), "pt") as fh:
            header = json.loads(fh.metadata()["wrag"])
        raw_meta = json.dumps(meta(header) if callable(meta) else meta)
    save_file(tensors, str(dst), metadata={"wrag": raw_meta})
    return dst


def with_(field, value):
    return lambda h: {**h, field: value}


def with_base(field, value):
    return lambda h: {**h, "base": {**h["base"], field: value}}


def peft_adapter(tmp_path, name="adapter", model=None):
    """A real PEFT LoRA adapter (r 4, alpha 8, FFN) over a tiny Llama (in-memory unless `model`)."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model if model is not None else tiny_llama(0),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                                   lora_dropout=0.0))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    out = tmp_path / name
    pm.save_pretrained(out)
    return out


def edit_config(adapter: Path, change) -> Path:
    """Replace the adapter's adapter_config.json by change(config) (JSON text) or by `change`."""
    p = adapter / "adapter_config.json"
    cfg = json.loads(p.read_text())
    p.write_text(change(cfg) if callable(change) else change)
    return adapter


# ------------------------------------------------------------------------------ 1. shard metadata
HOSTILE_META = [
    ("list", lambda h: [h], "must be a JSON object, got list"),
    ("string", lambda h: "shard", "must be a JSON object, got str"),
    ("null", lambda h: None, "must be a JSON object, got NoneType"),
    ("id-int", with_("id", 7), "'id' must be a string"),
    ("name-list", with_("name", ["x"]), "name must be a string"),
    ("description-dict", with_("description", {"a": 1}), "description must be a string"),
    ("samples-str", with_("samples", "abc"), "samples must be a list of strings"),
    ("samples-int-items", with_("samples", ["a", 1]), "non-string items"),
    ("provenance-list", with_("provenance", [1]), "provenance must be a JSON object"),
    ("base-list", with_("base", [1]), "base fingerprint must be a JSON object"),
    ("base-missing", lambda h: {k: v for k, v in h.items() if k != "base"}, "lacks the base"),
    ("base-size-str", with_base("hidden_size", "64"), "'hidden_size' must be a positive integer"),
    ("base-size-bool", with_base("num_layers", True), "'num_layers' must be a positive integer"),
    ("base-hash-int", with_base("weights_hash", 5), "'weights_hash' must be a non-empty string"),
    ("base-rms-neg", with_base("weight_rms", -1), "'weight_rms' must be a positive finite number"),
    ("base-name-int", with_base("name_or_path", 3), "'name_or_path' must be a string"),
    ("version", with_("format_version", "1"), "format version '1' is not supported"),
]


def test_hostile_shard_metadata_and_scale_tensors(tmp_path, good_file, store):
    cases = [(n, rewrite(good_file, tmp_path / f"{n}.safetensors", meta=m), pat) for n, m, pat in HOSTILE_META]
    cases += [(n, rewrite(good_file, tmp_path / f"{n}.safetensors", meta=lambda h: h,
                          tensors={"layers.0.gate_proj.scale": t}), pat) for n, t, pat in [
        ("scale-empty", torch.zeros(0), r"scale must be a floating-point tensor of shape \(1,\).*\(0,\)"),
        ("scale-2", torch.ones(2), r"shape \(1,\), got .* \(2,\)"),
        ("scale-2d", torch.ones(1, 1), r"shape \(1, 1\)"),
        ("scale-int", torch.ones(1, dtype=torch.int32), "torch.int32"),
    ]]
    for name, path, pattern in cases:
        with pytest.raises(ShardError, match=pattern):
            load_shard(path)
        refused(store, "add", path, match=pattern)
    assert load_shard(good_file).samples == []  # the untouched file still loads


# ------------------------------------------------------------------------------ 2. size limits
def test_text_sizes_bounded_everywhere(tmp_path, tiny_fp, good_file, store):
    M = shard_mod
    ok = random_shard(tiny_fp, "ok", description="d" * M.MAX_DESCRIPTION_CHARS,
                      samples=["s" * M.MAX_SAMPLE_CHARS] * M.MAX_SAMPLE_COUNT)
    ok.name, ok.provenance = "n" * M.MAX_NAME_CHARS, {"p": "x" * (M.MAX_PROVENANCE_BYTES - 20)}
    ok.validate()  # exactly at the limits: accepted
    over = {"description": ("description", "d" * (M.MAX_DESCRIPTION_CHARS + 1), "description has 4097 characters"),
            "samples": ("samples", ["s"] * (M.MAX_SAMPLE_COUNT + 1), "1001 samples, at most 1000"),
            "sample": ("samples", ["s" * (M.MAX_SAMPLE_CHARS + 1)], "one of the samples has 8193 characters"),
            "queries": ("queries", ["q"] * (M.MAX_SAMPLE_COUNT + 1), "1001 queries, at most 1000"),
            "name": ("name", "n" * (M.MAX_NAME_CHARS + 1), "name has 257 characters"),
            "provenance": ("provenance", {"p": "x" * M.MAX_PROVENANCE_BYTES}, "provenance is 16393 bytes")}
    for field, value, pattern in over.values():
        with pytest.raises(ShardError, match=pattern):  # Shard.validate
            dataclasses.replace(ok, **{field: value}).validate()
        with pytest.raises(ShardError, match=pattern):  # the store's add path
            with ShardStore(store) as st:
                st.add(dataclasses.replace(ok, id="big", **{field: value}), embedding=unit("big"))
        path = rewrite(good_file, tmp_path / "big.safetensors", meta=with_(field, value))
        with pytest.raises(ShardError, match=pattern):  # a shard file's header
            load_shard(path)
    with pytest.raises(ShardError, match="description has 4097"):  # PEFT import
        import_peft(peft_adapter(tmp_path), tiny_fp, shard_id="p", description="d" * 4097)
    # CLI overrides of a good file: --description, --samples
    refused(store, "add", good_file, "--description", "d" * 4097, match="description has 4097 characters")
    many = tmp_path / "many.txt"
    many.write_text("\n\n".join(f"sample {i}" for i in range(1001)))
    refused(store, "add", good_file, "--samples", many, match="1001 samples, at most 1000")


# ------------------------------------------------------------------------------ 3. ids
def test_invalid_ids_refused_by_shards_and_store(tmp_path, tiny_fp, good_file, store):
    for bad in ("keep\n", "../keep", "a/b", "", ".hidden", "x" * 129, 5):
        with pytest.raises(ShardError, match="invalid shard id"):
            random_shard(tiny_fp, bad).validate()
    with ShardStore(store) as st:
        for op in (st.remove, st.get_meta, st.load, st.path):
            for bad in ("keep\n", "../keep", "shards/keep"):
                with pytest.raises(StoreError, match="invalid shard id"):
                    op(bad)
        assert "keep\n" not in st and "../x" not in st and "keep" in st
    refused(store, "rm", "keep\n", match="invalid shard id 'keep\\\\n'")
    refused(store, "show", "../keep", match="invalid shard id")
    refused(store, "add", good_file, "--id", "good\n", match="invalid shard id")
    refused(store, "add", rewrite(good_file, tmp_path / "nl.safetensors", meta=with_("id", "evil\n")),
            match="invalid shard id")


# ------------------------------------------------------------------------------ 4. --overwrite
def test_add_overwrite_flag(tmp_path, tiny_fp, store):
    path = random_shard(tiny_fp, "keep", seed=5, description="new text for keep").save(tmp_path / "k.safetensors")
    err = refused(store, "add", path, match="already exists")
    assert "--overwrite" in err
    rc, out, err = wrag("add", path, "--overwrite", store=store)
    assert rc == 0, err
    rows = json.loads(listing(store)[0])
    assert [(r["id"], r["description"]) for r in rows] == [("keep", "new text for keep")]
    with ShardStore(store) as st:
        assert torch.equal(st.load("keep").factors[(0, "gate_proj")].A, load_shard(path).factors[(0, "gate_proj")].A)
        assert st.verify() == []


# ------------------------------------------------------------------------------ 5. file mode
def test_saved_shard_files_honour_the_umask(tmp_path, tiny_fp):
    sh = random_shard(tiny_fp, "m", rank=2)
    old = os.umask(0o022)
    try:
        p = sh.save(tmp_path / "m.safetensors")
        assert p.stat().st_mode & 0o777 == 0o644
        with ShardStore(tmp_path / "st") as st:
            st.add(sh, embedding=unit("m"))
            assert st.path("m").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        assert sh.save(tmp_path / "private.safetensors").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert not list(tmp_path.glob(".tmp-*")) and load_shard(p).id == "m"


# ------------------------------------------------------------------------------ 6. PEFT import
BAD_CONFIGS = [
    (lambda c: json.dumps({**c, "lora_alpha": "abc"}), "lora_alpha must be a positive finite number, got 'abc'"),
    (lambda c: json.dumps({**c, "r": "x"}), "r must be a positive integer, got 'x'"),
    (lambda c: json.dumps({**c, "r": 0}), "r must be a positive integer, got 0"),
    (lambda c: json.dumps({**c, "lora_alpha": -8}), "lora_alpha must be a positive finite number, got -8"),
    (lambda c: json.dumps({**c, "lora_alpha": math.inf}), "got inf"),
    (lambda c: json.dumps({**c, "lora_alpha": math.nan}), "got nan"),
    (lambda c: json.dumps({**c, "rank_pattern": ["down_proj"]}), "rank_pattern must be an object"),
    (lambda c: json.dumps({**c, "alpha_pattern": {"(": 4}}), "alpha_pattern key '\\(' is not a valid regular"),
    (lambda c: json.dumps({**c, "rank_pattern": {"down_proj": "two"}}), r"rank_pattern\['down_proj'\] must be"),
    (lambda c: json.dumps({**c, "alpha_pattern": {"down_proj": None}}), r"alpha_pattern\['down_proj'\] must be"),
    (lambda c: json.dumps({**c, "use_rslora": "yes"}), "use_rslora must be true or false"),
    (lambda c: json.dumps([c]), "must be a JSON object, got list"),
    (lambda c: DEEP, "nested too deeply"),
]


def test_peft_config_checked_and_base_name_verified(tmp_path, tiny_fp, tiny_model_dir, store):
    for i, (change, pattern) in enumerate(BAD_CONFIGS):
        adapter = edit_config(peft_adapter(tmp_path, f"bad{i}"), change)
        with pytest.raises(ShardError, match=pattern):
            import_peft(adapter, tiny_fp)
        refused(store, "add", adapter, match=pattern)

    # same widths, another model: the adapter names its base; refused with what to do
    other_dir = tmp_path / "SmolLM2-360M"
    tiny_llama(1).save_pretrained(other_dir)
    from transformers import AutoModelForCausalLM

    alien = peft_adapter(tmp_path, "alien", model=AutoModelForCausalLM.from_pretrained(other_dir))
    assert json.loads((alien / "adapter_config.json").read_text())["base_model_name_or_path"] == str(other_dir)
    assert tiny_fp.name_or_path and Path(tiny_fp.name_or_path).name == Path(tiny_model_dir).name
    with pytest.raises(ShardError, match="trained for base model .*SmolLM2-360M.* set base_model_name_or_path"):
        import_peft(alien, tiny_fp)
    refused(store, "add", alien, "--base", tiny_model_dir, match="trained for base model")

    # same name (hub id vs folder, case-insensitive): verified; unknown on either side: accepted, recorded
    named = edit_config(peft_adapter(tmp_path, "named"), lambda c: json.dumps(
        {**c, "base_model_name_or_path": "SomeOrg/" + Path(tiny_fp.name_or_path).name.upper()}))
    assert import_peft(named, tiny_fp).provenance["base_verified"] is True
    anonymous = peft_adapter(tmp_path, "anonymous")  # from an in-memory model: PEFT writes null
    assert import_peft(anonymous, tiny_fp).provenance["base_verified"] is False
    unnamed_base = dataclasses.replace(tiny_fp, name_or_path=None)
    assert import_peft(alien, unnamed_base).provenance["base_verified"] is False


# ------------------------------------------------------------------------------ 7. delta magnitudes
def scaled(shard, factor: float, **changes):
    """A copy of `shard` with every scale multiplied by `factor` (and dataclass fields changed)."""
    out = dataclasses.replace(shard, **changes)
    out.factors = {k: Factors(f.A, f.B, f.scale * factor) for k, f in shard.factors.items()}
    return out


def worst_ratio(shard, weight_rms: float) -> float:
    return max(shard_mod.delta_rms(f) for f in shard.factors.values()) / weight_rms


def test_weight_rms_fingerprint_and_delta_bounds(tmp_path, tiny_fp, store):
    # weight_rms: RMS of the two fingerprinted tensors, the same from a folder and from the model
    m = tiny_llama(0)
    ts = [m.model.layers[0].mlp.gate_proj.weight.detach(), m.model.layers[-1].mlp.down_proj.weight.detach()]
    want = math.sqrt(sum(float((t.double() ** 2).sum()) for t in ts) / sum(t.numel() for t in ts))
    assert tiny_fp.weight_rms == pytest.approx(want, rel=1e-5)
    assert fingerprint_model(m).weight_rms == pytest.approx(want, rel=1e-5)
    # optional, non-identity: an old fingerprint (no name, no weight_rms) loads and compares equal
    old = {k: v for k, v in tiny_fp.to_dict().items() if k not in ("name_or_path", "weight_rms")}
    assert BaseFingerprint.from_dict(old) == tiny_fp and tiny_fp.mismatch(BaseFingerprint.from_dict(old)) is None
    assert BaseFingerprint.from_dict(old).to_dict() == old

    # a legitimate shard passes; ×1000 of the base weights is refused, relative and absolute
    sh = random_shard(tiny_fp, "s", rank=4, scale=4.0)
    ratio = worst_ratio(sh, tiny_fp.weight_rms)
    assert 3 < ratio < shard_mod.MAX_DELTA_RMS_RATIO / 4
    sh.validate()
    f = sh.factors[(0, "gate_proj")]
    assert shard_mod.delta_rms(f) == pytest.approx(float(f.delta().double().pow(2).mean().sqrt()), rel=1e-5)
    with pytest.raises(ShardError, match=r"× the RMS of the base model's weights"):
        scaled(sh, 1000 / ratio).validate()
    anonymous = dataclasses.replace(tiny_fp, weight_rms=None, name_or_path=None)
    with pytest.raises(ShardError, match="has RMS .*, at most 1 is allowed"):
        scaled(sh, 1000 / ratio, base=anonymous).validate()  # no yardstick: the absolute ceiling
    huge = random_shard(tiny_fp, "h", rank=2)
    huge.factors[(0, "up_proj")].A[0, 0] = 2e4
    with pytest.raises(ShardError, match="factor entries reach 2e\\+04"):
        huge.validate()

    # 40× the weights (RMS 0.8 < 1): passes on its own header (no weight_rms) but the store knows
    # the base's weight_rms (the first shard's header carried it) and refuses it
    sneaky = scaled(sh, 40 / ratio, id="sneaky", base=anonymous)
    sneaky.validate()
    with ShardStore(store) as st:
        assert st.base.weight_rms == tiny_fp.weight_rms
    path = sneaky.save(tmp_path / "sneaky.safetensors")
    refused(store, "add", path, match=r"[\d.]+× the RMS of the base model's weights .*at most 32×")


def test_store_learns_base_facts(tmp_path, tiny_fp, tiny_model_dir):
    """A store bound by a header without weight_rms/name learns them from a later fingerprint of
    the same base (a shard's header, --base DIR, bind_base) and then bounds deltas by them; the
    committed demo shards pass by a wide margin."""
    anonymous = dataclasses.replace(tiny_fp, weight_rms=None, name_or_path=None)
    sh = random_shard(tiny_fp, "fine", rank=4, scale=4.0, description="fine")
    sneaky = scaled(sh, 40 / worst_ratio(sh, tiny_fp.weight_rms), id="sneaky", base=anonymous)
    path = sneaky.save(tmp_path / "sneaky.safetensors")
    root = tmp_path / "st"
    with ShardStore(root) as st:
        st.add(random_shard(anonymous, "first", description="first"), embedding=unit("first"))
        assert st.base.weight_rms is None
        st.add(sneaky, embedding=unit("sneaky"))  # nothing to compare with yet: the absolute bounds pass
        st.remove("sneaky")
    refused(root, "add", path, "--base", tiny_model_dir, match="× the RMS of the base model's weights")
    with ShardStore(root) as st:
        assert st.base.weight_rms is None  # a refused add changes nothing, not even the base record
        st.add(sh, embedding=unit("fine"))  # its header knows weight_rms: the store records it
        assert (st.base.weight_rms, st.base.name_or_path) == (tiny_fp.weight_rms, tiny_fp.name_or_path)
        with pytest.raises(ShardError, match="× the RMS of the base model's weights"):
            st.add(sneaky, embedding=unit("sneaky"))
        assert [r["id"] for r in st.list()] == ["first", "fine"]
    with ShardStore(tmp_path / "st2") as st:
        st.add(random_shard(anonymous, "first", description="first"), embedding=unit("first"))
        st.bind_base(fingerprint_dir(tiny_model_dir))
        with ShardStore(st.root) as again:  # recorded in the catalog, not only in this instance
            assert st.base.weight_rms == again.base.weight_rms == tiny_fp.weight_rms
        with pytest.raises(StoreError, match="bound to another base"):
            st.bind_base(fingerprint_model(tiny_llama(3)))
    # the committed demo shards against SmolLM2-135M-Instruct's weight_rms (benchmarks/data/delta_rms_ratios.py)
    for p in sorted((Path(shard_mod.__file__).parent / "data" / "shards").glob("*.safetensors")):
        demo = load_shard(p)
        demo.validate(base=dataclasses.replace(demo.base, weight_rms=0.184093))
        assert worst_ratio(demo, 0.184093) < shard_mod.MAX_DELTA_RMS_RATIO / 100, p.name


# ------------------------------------------------------------------------------ 8. wrag serve options
def test_serve_wrag_options_after_model():
    from wrag_vllm.cli import build_parser
    from wrag_vllm.serving.cli import build_command

    parse = build_parser().parse_args
    cmd, env = build_command(parse(["serve", "MODEL", "--wrag-top-k", "2", "--port", "8000", "--store", "/s",
                                    "--wrag-threshold=0.25", "--max-model-len", "2048", "--wrag-off"]))
    assert cmd[1:] == ["serve", "MODEL", "--port", "8000", "--max-model-len", "2048"]
    assert (env["WRAG_TOP_K"], env["WRAG_THRESHOLD"], env["WRAG_STORE"], env["WRAG_ENABLED"]) == \
        ("2", "0.25", "/s", "0")
    cmd, env = build_command(parse(["serve", "--wrag-top-k", "3", "MODEL", "--port", "1"]))  # before MODEL
    assert cmd[1:] == ["serve", "MODEL", "--port", "1"] and env["WRAG_TOP_K"] == "3"
    cmd, env = build_command(parse(["serve", "MODEL", "--port", "1", "--", "--x", "--wrag-slots", "4"]))
    assert cmd[2:] == ["MODEL", "--port", "1", "--", "--x"] and env["WRAG_SLOTS"] == "4"  # the rest untouched
    for argv, pattern in ((["--wrag-top-k", "two"], "invalid int value 'two'"), (["--wrag-slots"], "needs a value"),
                          (["--wrag-off=1"], "takes no value"), (["--store", "mysql://h/db"], "scheme")):
        with pytest.raises(WragError, match=pattern):
            build_command(parse(["serve", "MODEL", *argv]))
    rc, _, err = wrag("serve", "MODEL", "--wrag-top-k", "two", store="/nonexistent")
    assert rc == 2 and "invalid int value" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ 9. store URLs
def test_store_urls_refused(tmp_path, monkeypatch, store):
    """A URL of a scheme we do not serve is refused (never a folder named "mysql:"); a PostgreSQL
    URL whose server does not answer is a clear error, in the library, the CLI and $WRAG_STORE."""
    monkeypatch.chdir(tmp_path)
    for url in ("mysql://user@db/wrag", "s3://bucket/store", "file:///tmp/x"):
        scheme = url.split(":")[0]
        with pytest.raises(StoreError, match=f"store URLs with scheme '{scheme}' are not supported; a store is "
                                             f"a folder path or a postgresql://"):
            ShardStore(url)
        rc, _, err = wrag("ls", store=url)
        assert rc == 2 and "a store is a folder path" in err and "Traceback" not in err
    down = "postgresql://wrag:secret@127.0.0.1:1/wrag"  # nothing listens on port 1
    with pytest.raises(StoreError, match="cannot connect to the store database postgresql://wrag:\\*\\*\\*@127.0.0.1:1/wrag"):
        ShardStore(down)
    rc, _, err = wrag("ls", store=down)
    assert rc == 2 and "cannot connect" in err and "secret" not in err and "Traceback" not in err
    # $WRAG_STORE, through the installed console script
    exe = Path(sys.executable).with_name("wrag")
    p = subprocess.run([str(exe), "ls"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "WRAG_STORE": "mysql://user@db/wrag"})
    assert p.returncode == 2 and "scheme 'mysql'" in p.stderr and "Traceback" not in p.stderr
    assert list(tmp_path.iterdir()) == [store], "no folder named after the URL was created"


# ------------------------------------------------------------------------------ 10. deep / bad JSON
def test_deep_and_malformed_json_inputs(tmp_path, tiny_fp, good_file, store):
    from wrag_vllm.compose.cli import parse_param
    from wrag_vllm.errors import ComposeError
    from wrag_vllm.train import load_texts

    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": "fine"}\n' + DEEP + "\n")
    refused(store, "add", good_file, "--samples", deep, match=r"deep.jsonl:2: JSON nested too deeply")
    for i, (line, pattern) in enumerate([("{not json", "invalid JSON"), ('["text"]', "string field"),
                                         ('{"text": 3}', "string field"), ("1" * 5000, "invalid JSON")]):
        bad = tmp_path / f"bad{i}.jsonl"
        bad.write_text(line + "\n")
        refused(store, "add", good_file, "--samples", bad, match=pattern)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    refused(store, "add", good_file, "--samples", binary, match="UTF-8")
    adapter = edit_config(peft_adapter(tmp_path), DEEP)
    refused(store, "add", adapter, match="adapter_config.json: JSON nested too deeply")
    header = rewrite(good_file, tmp_path / "deep.safetensors", raw_meta=DEEP)
    refused(store, "add", header, match="corrupt shard metadata: JSON nested too deeply")
    with pytest.raises(WragError, match="nested too deeply"):
        load_texts(deep)
    with pytest.raises(ComposeError, match="nested too deeply"):
        parse_param("lam=" + DEEP)
