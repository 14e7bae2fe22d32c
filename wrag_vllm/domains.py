"""Four built-in domain corpora (medicine, computing, law, history) with a fixed train/held-out split.

The data is committed in small form in `wrag_vllm/data/corpora/<domain>.jsonl.gz` (≈1 MB in all;
sources and licences in that folder's SOURCES.md; regenerate with `python -m benchmarks.data.build_domain_data`),
so building a domain needs no network, no apt package and no file outside the installed package.

Split: item i of domain d is held out iff  int(sha256(f"{d}/{id_i}")[:12], 16) mod 1000 < 1000·f
(f = 0.2). It depends on the id only, so it is stable under reordering and subsetting; the ids on
each side are recorded in `data/corpora/splits.json` and a test checks the rule still produces them.

A domain gives
  train_texts      text a shard is trained on
  heldout_texts    text of held-out items (perplexity)
  heldout_prompts  question stems of held-out items: realistic requests for evaluating retrieval.
                   Never used as the shard's description or samples.
  description      what a shard trained on it knows (embedded for retrieval)
  samples          *training* question stems (embedded for retrieval)
  queries          everyday requests of the domain, written for this project (data/queries/<domain>.txt,
                   Apache-2.0), phrased as people ask a chat assistant: what the shard's relevance
                   head learns the domain's questions from. Disjoint from the evaluation sets in
                   benchmarks/data/retrieval/.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import WragError

DATA_DIR = Path(__file__).parent / "data" / "corpora"
QUERIES_DIR = Path(__file__).parent / "data" / "queries"
HELDOUT_FRACTION = 0.2
N_SAMPLES = 32
MAX_PROMPTS = 60
SAMPLE_CHARS = 400

DESCRIPTIONS = {
    "medicine": "Medicine and biomedical research: clinical studies, diseases, diagnosis, treatments, "
                "patients, surgery, drugs and their outcomes, as in PubMed abstracts.",
    "computing": "Computing: computer science terms, programming languages, algorithms, operating systems, "
                 "networking, hardware, software engineering, machine learning and computer security.",
    "law": "Law: legal reasoning about torts, contracts, criminal law and procedure, evidence, "
           "constitutional law, property, jurisprudence and international law.",
    "history": "History: primary-source passages and questions on European, United States and world "
               "history, revolutions, empires, wars, religion, trade and prehistory.",
}
DOMAINS = tuple(DESCRIPTIONS)


@dataclass
class Domain:
    name: str
    description: str
    train_texts: list[str]
    heldout_texts: list[str]
    heldout_prompts: list[str]
    samples: list[str]
    queries: list[str]
    train_ids: list[str]
    heldout_ids: list[str]
    prompt_ids: list[str] = field(default_factory=list)  # ids of the items behind heldout_prompts

    def summary(self) -> dict:
        return {"name": self.name, "train": len(self.train_texts), "heldout": len(self.heldout_texts),
                "prompts": len(self.heldout_prompts), "train_chars": sum(map(len, self.train_texts))}


def _key(domain: str, item_id: str) -> int:
    return int(hashlib.sha256(f"{domain}/{item_id}".encode()).hexdigest()[:12], 16)


def is_heldout(domain: str, item_id: str, fraction: float = HELDOUT_FRACTION) -> bool:
    return _key(domain, item_id) % 1000 < round(1000 * fraction)


def read_items(domain: str, data_dir: Path | None = None) -> list[dict]:
    """The committed rows of a domain: {"id", "source", "text", "prompt"?} in source order."""
    path = Path(data_dir or DATA_DIR) / f"{domain}.jsonl.gz"
    if not path.exists():
        raise WragError(f"no corpus for domain {domain!r} ({path} missing); known domains: {', '.join(DOMAINS)}")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _cut(s: str, n: int = SAMPLE_CHARS) -> str:
    s = s.replace("This question refers to the following information.\n", "")  # MMLU boilerplate
    return s if len(s) <= n else s[:n].rsplit(" ", 1)[0] + " …"


def build_domain(name: str, data_dir: Path | None = None) -> Domain:
    """Build one domain (deterministic: same files -> same lists in the same order)."""
    if name not in DESCRIPTIONS:
        raise WragError(f"unknown domain {name!r}; known domains: {', '.join(DOMAINS)}")
    items = read_items(name, data_dir)
    train = [it for it in items if not is_heldout(name, it["id"])]
    held = [it for it in items if is_heldout(name, it["id"])]
    # samples and evaluation prompts: chosen in hash order so no source dominates by file position
    by_hash = lambda xs: sorted(xs, key=lambda it: _key(name, it["id"]))  # noqa: E731
    sample_items = [it for it in by_hash(train) if it.get("prompt")][:N_SAMPLES]
    prompt_items = [it for it in by_hash(held) if it.get("prompt")][:MAX_PROMPTS]
    return Domain(name=name, description=DESCRIPTIONS[name],
                  train_texts=[it["text"] for it in train], heldout_texts=[it["text"] for it in held],
                  heldout_prompts=[it["prompt"] for it in prompt_items],
                  samples=[_cut(it["prompt"]) for it in sample_items], queries=domain_queries(name),
                  train_ids=[it["id"] for it in train], heldout_ids=[it["id"] for it in held],
                  prompt_ids=[it["id"] for it in prompt_items])


def domain_queries(name: str) -> list[str]:
    """The shipped everyday requests of a domain, one per line."""
    path = QUERIES_DIR / f"{name}.txt"
    return [q.strip() for q in path.read_text(encoding="utf-8").splitlines() if q.strip()] if path.exists() else []


def build_all(data_dir: Path | None = None) -> dict[str, Domain]:
    return {n: build_domain(n, data_dir) for n in DOMAINS}


# One builder per domain (the public names the brief and the CLI use).
def medicine() -> Domain:
    """PubMedQA PQA-L abstracts + long answers; prompts are the held-out research questions."""
    return build_domain("medicine")


def computing() -> Domain:
    """FOLDOC definitions + MMLU computing questions; prompts are held-out MMLU questions."""
    return build_domain("computing")


def law() -> Domain:
    """MMLU professional law, jurisprudence, international law questions with their answers."""
    return build_domain("law")


def history() -> Domain:
    """MMLU history passages and questions (one item per shared passage)."""
    return build_domain("history")


def splits(data_dir: Path | None = None) -> dict:
    """{domain: {"train": [ids], "heldout": [ids], "prompts": [ids]}} — what splits.json records."""
    return {n: {"train": d.train_ids, "heldout": d.heldout_ids, "prompts": d.prompt_ids}
            for n, d in build_all(data_dir).items()}


def write_splits(path: Path | None = None) -> Path:
    path = Path(path or DATA_DIR / "splits.json")
    path.write_text(json.dumps({"rule": f"heldout iff int(sha256('<domain>/<id>')[:12],16) % 1000 < "
                                        f"{round(1000 * HELDOUT_FRACTION)}", "domains": splits()},
                               indent=0) + "\n")
    return path
