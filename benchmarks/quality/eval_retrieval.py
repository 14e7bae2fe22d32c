"""Retrieval as people ask: which shard the server applies, per domain, and to general text.

    .venv/bin/python -m benchmarks.quality.eval_retrieval              # the reported run (test set)
    .venv/bin/python -m benchmarks.quality.eval_retrieval --set dev    # the set settings were chosen on

Store: a real ShardStore (MiniLM) with the four demo shards registered as `wrag demo` registers
them: description, 32 training question stems as samples, the shipped everyday queries
(wrag_vllm/data/queries/), all in one add.

Text sets. Only the dev sets were looked at while choosing anything (relevance.C, the background
corpus, the multi-vector threshold); the test sets and the held-out prompts were not:
  everyday   benchmarks/data/retrieval/everyday_{test,dev}.jsonl: requests per domain phrased as
             people ask, and general requests (recipes, poems, travel, small talk, ...); written
             for this project, separately from the shipped queries and the background corpus
  heldout    the evaluation prompts of each domain's held-out corpus items (domains.py)
  fortunes   general passages: Debian `fortunes`, the everyday categories eval_quality uses
             (dev: other everyday categories, FORTUNES_DEV)
  wordnet    general passages: 3 usage examples of WordNet verbs, adjectives and adverbs joined
             (dev: of nouns), Debian `wordnet-base`, WordNet licence
Rules:
  head       the server's: relevance head p ≥ 0.5 (store/relevance.py)
  head-noq   the same, shards registered without queries (documents only)
  centroid   the previous rule: cosine to the shard's centroid ≥ 0.15
  multi-m3   multi-vector: mean of the 3 best cosines to a shard's text vectors ≥ a threshold
             chosen on the dev set (the best mean of domain applied-first and general none)
Measures: applied_first (the first applied shard is the text's own domain), none (a general text
gets no shard), top1 (the nearest shard is its own, no threshold). Also timed: registering one
shard of 500 samples and 120 queries (embedder loaded), and FAISS search at 10,000 shards for one
vector per shard against 32.

Writes benchmarks/results/eval_retrieval.{json,md,png} (the dev run: eval_retrieval_dev.*).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import REPO, RESULTS
from benchmarks.machine import describe
from benchmarks.quality import eval_quality_lib as L
from wrag_vllm.domains import DOMAINS, build_domain

SETS = REPO / "benchmarks" / "data" / "retrieval"
WORDNET = Path("/usr/share/wordnet")
HEAD_THRESHOLD, CENTROID_THRESHOLD, M = 0.5, 0.15, 3
FORTUNES_DEV = ("kids", "work", "men-women", "songs-poems", "riddles", "platitudes", "miscellaneous", "art")
MULTI_GRID = [round(x, 3) for x in np.arange(0.20, 0.70, 0.025)]


def everyday(which: str) -> list[dict]:
    with open(SETS / f"everyday_{which}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def wordnet_passages(n: int, parts=("verb", "adj", "adv"), per: int = 3) -> list[dict]:
    """n passages of `per` usage examples each, from the glosses of WordNet's `parts` of speech."""
    if not WORDNET.is_dir():
        raise SystemExit(f"the wordnet set needs the Debian package wordnet-base ({WORDNET} missing)")
    ex = []
    for part in parts:
        for line in (WORDNET / f"data.{part}").read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.startswith("  "):
                ex += [s for s in re.findall(r'"([^"]{25,200})"', line.split("|", 1)[-1])]
    rng = random.Random(0)
    rng.shuffle(ex)
    return [{"id": f"wordnet/{i}", "text": ". ".join(ex[i * per:(i + 1) * per]) + "."} for i in range(n)]


def build_store(path: Path, with_queries: bool):
    from wrag_vllm.demo import domain_shards
    from wrag_vllm.store import ShardStore

    shards = domain_shards()
    if not with_queries:
        for sh in shards.values():
            sh.queries = []
    store = ShardStore(path)
    store.add_many(shards.values())
    return store


class Rules:
    """Every rule's (id, score) hits, best first, for unit query rows."""

    def __init__(self, store, store_noq):
        self.store, self.store_noq = store, store_noq
        from wrag_vllm.demo import domain_shards
        from wrag_vllm.store.embedding import centroid, text_vectors

        shards = domain_shards()
        self.ids = list(DOMAINS)
        self.tv = text_vectors(store.embedder, [(shards[i].description, shards[i].samples, shards[i].queries)
                                                for i in self.ids])  # every text, not only the stored rows
        self.cent = np.stack([centroid(t) for t in self.tv])

    def hits(self, q: np.ndarray) -> dict[str, list[list[tuple[str, float]]]]:
        def rank(scores):  # (n, shards) -> hits best first
            order = np.argsort(-scores, axis=1)
            return [[(self.ids[j], float(row[j])) for j in o] for row, o in zip(scores, order)]
        multi = np.stack([np.sort(q @ t.T, axis=1)[:, -M:].mean(axis=1) for t in self.tv], axis=1)
        return {"head": self.store.search_vectors(q, k=4), "head-noq": self.store_noq.search_vectors(q, k=4),
                "centroid": rank(q @ self.cent.T), "multi-m3": rank(multi)}


def measure(hits, domains: list[str], thr: float) -> dict:
    """applied_first / none / top1 of hits for texts whose domains are `domains` ('general' or a domain)."""
    out = {}
    for d in sorted(set(domains)):
        hs = [h for h, dd in zip(hits, domains) if dd == d]
        if d == "general":
            out[d] = {"n": len(hs), "none": sum(not h or h[0][1] < thr for h in hs) / len(hs),
                      "applied": {i: int(sum(bool(h) and h[0][0] == i and h[0][1] >= thr for h in hs)) for i in DOMAINS}}
        else:
            out[d] = {"n": len(hs), "applied_first": sum(bool(h) and h[0][0] == d and h[0][1] >= thr for h in hs) / len(hs),
                      "top1": sum(bool(h) and h[0][0] == d for h in hs) / len(hs),
                      "none": sum(not h or h[0][1] < thr for h in hs) / len(hs)}
    return out


def balanced(m: dict) -> float:
    dom = [v["applied_first"] for d, v in m.items() if d != "general"]
    return 0.5 * (sum(dom) / len(dom) + m["general"]["none"])


def timings(store) -> dict:
    """Seconds to register one shard of 500 samples and its 120 queries (embedder loaded); FAISS p50."""
    import faiss

    from wrag_vllm.demo import domain_shards

    sh = domain_shards(["law"])["law"]
    d = build_domain("law")
    sh.id, sh.samples = "law-500", (d.train_texts * 2)[:500]
    t0 = time.perf_counter()
    store.add(sh)
    add_s = time.perf_counter() - t0
    store.remove("law-500")
    rng = np.random.default_rng(0)
    out = {"register_500_samples_s": round(add_s, 3)}
    faiss.omp_set_num_threads(1)
    for name, rows, dim in (("faiss_10k_heads_p50_ms", 10_000, 385), ("faiss_10k_x32_vectors_p50_ms", 320_000, 384)):
        idx = faiss.IndexFlatIP(dim)
        idx.add(rng.standard_normal((rows, dim), dtype=np.float32))
        qs = rng.standard_normal((200, dim), dtype=np.float32)
        ts = []
        for q in qs:
            t = time.perf_counter()
            idx.search(q[None], 32 if rows > 10_000 else 3)
            ts.append(time.perf_counter() - t)
        out[name] = round(1e3 * float(np.median(ts)), 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=("test", "dev"), default="test")
    ap.add_argument("--general", type=int, default=60, help="passages per general source")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="wrag-eval-ret-") as tmp:
        store = build_store(Path(tmp) / "store", True)
        store_noq = build_store(Path(tmp) / "noq", False)
        rules = Rules(store, store_noq)
        emb = store.embedder
        ev = everyday(a.set)
        texts = {"everyday": ([x["text"] for x in ev], [x["domain"] for x in ev])}
        held = {d: build_domain(d).heldout_prompts for d in DOMAINS}
        if a.set == "test":
            texts["heldout"] = ([p for d in DOMAINS for p in held[d]], [d for d in DOMAINS for _ in held[d]])
            general = (("fortunes", L.general_texts(a.general)), ("wordnet", wordnet_passages(a.general)))
        else:
            general = (("fortunes-dev", L.general_texts(a.general, files=FORTUNES_DEV)),
                       ("wordnet-dev", wordnet_passages(a.general, parts=("noun",))))
        for src, items in general:
            texts[src] = ([it["text"][:1000] for it in items], ["general"] * len(items))
        hits = {name: rules.hits(emb.embed(t)) for name, (t, _) in texts.items()}
        # the multi-vector threshold: chosen on the dev set's everyday requests
        dev = everyday("dev")
        dev_hits = rules.hits(emb.embed([x["text"] for x in dev]))["multi-m3"]
        multi_thr = max(MULTI_GRID, key=lambda t: balanced(measure(dev_hits, [x["domain"] for x in dev], t)))
        thr = {"head": HEAD_THRESHOLD, "head-noq": HEAD_THRESHOLD, "centroid": CENTROID_THRESHOLD, "multi-m3": multi_thr}
        res = {name: {rule: measure(h, texts[name][1], thr[rule]) for rule, h in hs.items()} for name, hs in hits.items()}
        examples = [{"text": t, "domain": d, "hits": [(i, round(s, 3)) for i, s in h[:2]]}
                    for t, d, h in zip(*texts["everyday"], hits["everyday"]["head"])]
        tim = timings(store)
    out = {"set": a.set, "thresholds": thr, "results": res, "timings": tim, "examples": examples,
           "machine": describe(), "seconds": round(time.time() - t_start, 1)}
    write(out, Path(a.out), "" if a.set == "test" else "_dev")
    return 0


def _pct(x):
    return f"{100 * x:.0f}%"


def write(out: dict, out_dir: Path, suffix: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"eval_retrieval{suffix}.json").write_text(json.dumps(out, indent=1, default=float) + "\n")
    res, rules = out["results"], list(out["thresholds"])
    lines = [f"# Retrieval as people ask ({out['set']} set)", "",
             "`.venv/bin/python -m benchmarks.quality.eval_retrieval" + ("" if out["set"] == "test" else " --set dev")
             + f"` ({out['seconds']} s). Thresholds: " + ", ".join(f"{r} {t}" for r, t in out["thresholds"].items())
             + " (multi-m3's chosen on the dev set).", "",
             "Domain texts: the first applied shard is their own (applied first); general texts: no shard applied.", "",
             "| set | text | " + " | ".join(rules) + " |", "|---|---|" + "---|" * len(rules)]
    for name, by_rule in res.items():
        for d in list(DOMAINS) + ["general"]:
            if d not in by_rule[rules[0]]:
                continue
            key = "none" if d == "general" else "applied_first"
            lines.append(f"| {name} | {d} ({by_rule[rules[0]][d]['n']}) {'none' if d == 'general' else 'applied first'} | "
                         + " | ".join(_pct(by_rule[r][d][key]) for r in rules) + " |")
    lines += ["", "Nearest shard is its own (top-1, no threshold):", "",
              "| set | domain | " + " | ".join(rules) + " |", "|---|---|" + "---|" * len(rules)]
    for name in [n for n in ("everyday", "heldout") if n in res]:
        for d in DOMAINS:
            lines.append(f"| {name} | {d} | " + " | ".join(_pct(res[name][r][d]["top1"]) for r in rules) + " |")
    t = out["timings"]
    lines += ["", f"Registering one shard with 500 samples and 120 queries (embedder loaded; the store embeds the first 32 samples and 128 queries): {t['register_500_samples_s']} s. "
              f"FAISS exact search, one thread, 10,000 shards: one head per shard p50 {t['faiss_10k_heads_p50_ms']} ms; "
              f"32 vectors per shard p50 {t['faiss_10k_x32_vectors_p50_ms']} ms.", "",
              "Misses of the server's rule on the everyday set:", ""]
    for ex in out["examples"]:
        h = ex["hits"]
        ok = (not h or h[0][1] < HEAD_THRESHOLD) if ex["domain"] == "general" else (bool(h) and h[0][0] == ex["domain"] and h[0][1] >= HEAD_THRESHOLD)
        if not ok:
            lines.append(f"- ({ex['domain']}) {ex['text']!r} → " + ", ".join(f"{i} {s}" for i, s in h))
    m = out["machine"]
    lines += ["", f"Machine: {m.get('cpu')}, {m.get('cores', '?')} cores."]
    (out_dir / f"eval_retrieval{suffix}.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(9, 4))
    cols = [(n, d) for n in res for d in list(DOMAINS) + ["general"] if d in res[n][rules[0]]]
    x = np.arange(len(cols))
    for k, r in enumerate(rules):
        vals = [res[n][r][d]["none" if d == "general" else "applied_first"] for n, d in cols]
        ax.bar(x + (k - 1.5) * 0.2, vals, 0.2, label=r)
    ax.set_xticks(x, [f"{n}\n{d}" for n, d in cols], fontsize=6)
    ax.axhline(0.95, color="k", lw=0.6, ls="--")
    ax.set_ylabel("applied first (domain) / none (general)")
    ax.set_ylim(0, 1.15)
    ax.legend(fontsize=7, loc="upper center", ncol=len(rules))
    fig.tight_layout()
    fig.savefig(out_dir / f"eval_retrieval{suffix}.png", dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
