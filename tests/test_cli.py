"""The `wrag` command as users run it: real subprocesses, a real store folder."""
import contextlib
import io
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_shards import random_shard, tiny_base

class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def wrag(*args, store, check=True):
    """Run the CLI in-process (the embedder loads once per test process); see test_console_script."""
    from wrag_vllm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["--store", str(store), *map(str, args)])
    p = Result(rc, out.getvalue(), err.getvalue())
    if check and p.returncode != 0:
        raise AssertionError(f"wrag {args} failed ({p.returncode}): {p.stderr}")
    return p


def test_console_script(tmp_path, shard_files):
    """The installed `wrag` entry point, as a user runs it, with WRAG_STORE choosing the store."""
    exe = Path(sys.executable).with_name("wrag")
    env = {**os.environ, "WRAG_STORE": str(tmp_path / "s")}
    p = subprocess.run([str(exe), "add", str(shard_files["cardio"])], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([str(exe), "show", "nope"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "nope" in p.stderr and "Traceback" not in p.stderr


@pytest.fixture(scope="module")
def shard_files(tmp_path_factory, tiny_fp):
    d = tmp_path_factory.mktemp("shards")
    specs = {
        "cardio": "Cardiology: heart failure, arrhythmia, myocardial infarction and blood pressure.",
        "compilers": "Compilers: parsing, register allocation, instruction selection and optimisation passes.",
        "contracts": "Contract law: offer, acceptance, consideration, breach and damages.",
    }
    return {i: random_shard(tiny_fp, i, seed=n, description=t).save(d / f"{i}.safetensors")
            for n, (i, t) in enumerate(specs.items())}


def test_add_ls_show_search_export_rm(tmp_path, store_at, shard_files):
    store = store_at("store")  # a folder, then a PostgreSQL database
    for f in shard_files.values():
        wrag("add", f, store=store)
    rows = json.loads(wrag("ls", "--json", store=store).stdout)
    assert sorted(r["id"] for r in rows) == ["cardio", "compilers", "contracts"]
    assert json.loads(wrag("show", "cardio", "--json", store=store).stdout)["rank"] == 4
    hits = json.loads(wrag("--json", "search", "what dose of beta blockers after a heart attack?", "-k", "2",
                           store=store).stdout)
    assert hits[0]["id"] == "cardio" and len(hits) == 2
    out = tmp_path / "peft"
    wrag("export", "contracts", "--out", out, store=store)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    wrag("rm", "compilers", store=store)
    assert "compilers" not in wrag("ls", store=store).stdout


def test_add_peft_directory_with_samples(tmp_path, shard_files, tiny_model_dir):
    from wrag_vllm.peft_io import export_peft
    from wrag_vllm.shard import load_shard

    peft_dir = export_peft(load_shard(shard_files["cardio"]), tmp_path / "adapter")
    samples = tmp_path / "samples.txt"
    samples.write_text("Atrial fibrillation raises stroke risk.\n\nStatins lower LDL cholesterol.\n")
    store = tmp_path / "store"
    p = wrag("add", peft_dir, "--id", "heart", "--samples", samples, "--base", tiny_model_dir, store=store)
    assert "added heart" in p.stdout
    meta = json.loads(wrag("show", "heart", "--json", store=store).stdout)
    assert meta["id"] == "heart"


def test_bad_input_clear_error_store_intact(tmp_path, store_at, shard_files, tiny_fp):
    store = store_at("store")  # a folder, then a PostgreSQL database
    wrag("add", shard_files["cardio"], store=store)
    before = wrag("ls", "--json", store=store).stdout
    other = random_shard(tiny_base(seed=7), "alien", description="another base").save(tmp_path / "alien.safetensors")
    att = random_shard(tiny_fp, "att", modules=("q_proj",), description="attention").save(tmp_path / "att.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(Path(shard_files["compilers"]).read_bytes()[:300])
    cases = [
        (("add", other), "weights_hash"),
        (("add", att), "instruction following"),
        (("add", cut), "corrupt|truncated|readable"),
        (("add", shard_files["cardio"]), "already"),
        (("add", tmp_path / "missing"), "no such"),
        (("show", "nope"), "nope"),
        (("rm", "nope"), "nope"),
        (("search", "x", "-k", "0"), "at least 1"),
    ]
    for args, pattern in cases:
        p = wrag(*args, store=store, check=False)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert re.search(pattern, p.stderr), (args, p.stderr)
        assert "Traceback" not in p.stderr
    assert wrag("ls", "--json", store=store).stdout == before


def test_search_shows_what_the_server_applies(tmp_path, shard_files, monkeypatch):
    """`wrag search`: each hit's relevance p and whether (at what weight) the server's rule applies
    it; `-` reads one text per line and --json prints one list per line; --queries at add."""
    store = tmp_path / "store"
    queries = tmp_path / "q.txt"
    queries.write_text("my chest hurts when I climb stairs\n\nis a heart rate of 110 dangerous?\n")
    wrag("add", shard_files["cardio"], "--queries", queries, store=store)
    assert json.loads(wrag("show", "cardio", "--json", store=store).stdout)["queries"] == [
        "my chest hurts when I climb stairs", "is a heart rate of 110 dangerous?"]
    for f in ("compilers", "contracts"):
        wrag("add", shard_files[f], store=store)
    hits = json.loads(wrag("--json", "search", "my heart races and my chest hurts", store=store).stdout)
    assert hits[0]["id"] == "cardio" and hits[0]["applied"] and hits[0]["weight"] > 0.5
    assert all(0 <= h["score"] <= 1 for h in hits) and [h["score"] for h in hits] == sorted(
        [h["score"] for h in hits], reverse=True)
    assert all(h["weight"] is None for h in hits if not h["applied"])
    # the threshold the server would use: nothing passes p ≥ 1
    hits = json.loads(wrag("--json", "search", "my heart races", "--threshold", "1.0", store=store).stdout)
    assert not any(h["applied"] for h in hits)
    monkeypatch.setattr("sys.stdin", io.StringIO("my heart races and my chest hurts\n\nwrite a parser for my language\n"))
    lines = wrag("--json", "search", "-", "-k", "2", store=store).stdout.strip().splitlines()
    assert len(lines) == 2 and [json.loads(x)[0]["id"] for x in lines] == ["cardio", "compilers"]
    bad = wrag("search", "x", "--threshold", "2", store=store, check=False)
    assert bad.returncode == 2 and "threshold must be in [0, 1]" in bad.stderr


def test_cli_store_commands_do_not_import_transformers(tmp_path, shard_files):
    """ls, show, rm and search start without transformers (or sentence-transformers)."""
    store = tmp_path / "store"
    wrag("add", shard_files["cardio"], store=store)
    code = ("import sys; from wrag_vllm.cli import main; rc = main(sys.argv[1:]); "
            "bad = [m for m in ('transformers', 'sentence_transformers', 'vllm') if m in sys.modules]; "
            "sys.exit(3 if bad else rc)")
    for args in (["ls"], ["show", "cardio"], ["search", "heart attack"], ["rm", "cardio"]):
        p = subprocess.run([sys.executable, "-c", code, "--store", str(store), *args], capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, (args, p.returncode, p.stderr[-2000:])
