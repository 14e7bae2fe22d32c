"""Quality of WRAG on the committed domain shards: perplexity, retrieval, PubMedQA, no-regression,
attention ablation and the svd-centered λ/ρ sweep.

    python -m benchmarks.quality.eval_quality           # full run (~25 min on 2 shared cores)
    python -m benchmarks.quality.eval_quality --quick   # smoke run (few texts, short training)

Sections (each cached per item in <cache>/eval_quality/, so a rerun resumes):

1. Retrieval. The four shards go into a real ShardStore (MiniLM relevance heads; description, training
   question stems as samples, the shipped everyday queries).
   top-1 = fraction of held-out domain prompts (never part of a description or sample) whose best
   shard is their own domain. Also per threshold: how often a held-out domain text (query = its first
   400 chars) keeps its own shard, and how often a general text keeps any shard.
2. Held-out perplexity per domain (N texts per domain, per-text, token-weighted; see
   eval_quality_lib) for: base; every single shard (the diagonal is the oracle); WRAG = per text
   retrieve k=3 (query = first 400 chars), weights by the server's rule w = softmax(logit(p)/T) over
   hits with relevance p ≥ threshold (T = 1, threshold 0.5), compose with linear / svd-centered / ties; the same
   with a lower threshold (--alt-threshold); all four shards merged (linear, w = 1/4 each); and the
   distractor setting (own shard 0.5 + two others 0.25 each) for linear and svd-centered.
   Recovered gain = (ppl_base − ppl_X) / (ppl_base − ppl_oracle).
   A plan with one shard at weight 1 is that shard exactly for linear and svd-centered (k = 1 rule),
   so it is scored as the shard; texts that retrieve nothing are scored by the base model.
3. General (out-of-domain) text: Debian `fortunes` passages (quotations, jokes, anecdotes); base,
   each shard, all merged, WRAG (how often anything is retrieved, and the resulting perplexity).
4. PubMedQA yes/no/maybe on the medicine domain's held-out PQA-L ids: argmax of the option
   log-likelihood; base, medicine shard, WRAG (query = the question).
6. Attention ablation: law shards trained with the same recipe and budget, FFN-only vs FFN +
   attention (q/k/v/o); instruction following on chat prompts (greedy, chat template): answer stops
   with <|im_end|> within the limit and has no role markers / degenerate repetition. Also law and
   general perplexity of both.
5. svd-centered sweep: λ × ρ (and ρ as an energy fraction) in the distractor setting and in the
   retrieval setting (texts that retrieve 3 shards at the alt threshold; svd-centered equals linear
   for k ≤ 2, so only those texts can differ).

Writes benchmarks/results/eval_quality.{json,md,png} with a machine description.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import REPO, RESULTS
from benchmarks.quality import eval_quality_lib as L
from wrag_vllm.basemodel import cache_root, ensure_base_model
from wrag_vllm.domains import DOMAINS, _key, build_domain
from wrag_vllm.shard import FFN_MODULES, load_shard

SHARD_DIR = REPO / "wrag_vllm" / "data" / "shards"
PUBMEDQA = REPO.parent / "shared" / "data" / "pubmedqa" / "pqal_trainval.json"  # PubMedQA PQA-L (MIT)
THRESHOLD, TEMPERATURE, TOP_K = 0.5, 1.0, 3          # the server's rule (serving/config.py)
DISTRACTOR_W = (0.5, 0.25, 0.25)
RANK_BUDGETS = (None, 16, 12, 8)   # composite rank budgets measured (None: rank Σ r_i, no truncation)
FACTOR_SPACE = ("linear", "svd-centered")


class Evaluator:
    """Per-text NLL of (model key → delta) on text sets, cached by (model key, text id)."""

    def __init__(self, model, tok, shards, cache: L.JsonCache, max_tokens: int):
        self.model, self.tok, self.shards, self.cache, self.max_tokens = model, tok, shards, cache, max_tokens
        self._composites: dict[str, object] = {}
        self.compose_s = 0.0

    # model keys: "base", "shard:<id>", or "<method>|<params json>|<plan json>"
    def key_for(self, plan, method: str, params: dict | None = None) -> str:
        if not plan:
            return "base"
        if len(plan) == 1 and plan[0][1] == 1.0 and method in FACTOR_SPACE:
            return f"shard:{plan[0][0]}"  # k = 1, w = 1: the shard itself (exact for both rules)
        return f"{method}|{json.dumps(params or {}, sort_keys=True)}|{json.dumps(plan)}"

    def delta(self, key: str):
        if key == "base":
            return None
        if key.startswith("shard:"):
            return self.shards[key[6:]]
        if key not in self._composites:
            from wrag_vllm.compose import compose
            method, params, plan = key.split("|", 2)
            plan = json.loads(plan)
            t0 = time.time()
            self._composites = {key: compose([self.shards[i] for i, _ in plan], [w for _, w in plan], method,
                                             **json.loads(params))}  # keep one: composites are MBs
            self.compose_s += time.time() - t0
        return self._composites[key]

    def nll(self, key: str, items: list[dict]) -> list[list[float]]:
        """[nll, n] per item (item: {"id", "text"})."""
        todo = [it for it in items if f"{key}@{it['id']}" not in self.cache]
        if todo:
            seqs = L.encode_texts(self.tok, [it["text"] for it in todo], self.max_tokens)
            with L.DenseDelta(self.model, self.delta(key)):
                res = L.nll_many(self.model, seqs)
            for it, r in zip(todo, res):
                self.cache.put(f"{key}@{it['id']}", list(r), flush_every=10 ** 9)
            self.cache.flush()
        return [self.cache.get(f"{key}@{it['id']}") for it in items]

    def nll_planned(self, items, plans, method, params=None) -> list[list[float]]:
        """Items grouped by their plan, so each distinct composite is built and applied once."""
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(plans):
            groups.setdefault(self.key_for(p, method, params), []).append(i)
        out: list = [None] * len(items)
        for key, idx in groups.items():
            for i, r in zip(idx, self.nll(key, [items[i] for i in idx])):
                out[i] = r
        return out


def heldout_items(n: int) -> dict[str, list[dict]]:
    """n held-out texts per domain, in hash order of their ids (no source dominates by position)."""
    out = {}
    for d in DOMAINS:
        dom = build_domain(d)
        pairs = sorted(zip(dom.heldout_ids, dom.heldout_texts), key=lambda p: _key(d, p[0]))[:n]
        out[d] = [{"id": f"{d}/{i}", "text": t, "domain": d} for i, t in pairs]
    return out


def budget_label(budget: int | None) -> str:
    return "no budget (rank Σ r_i)" if budget is None else f"rank ≤ {budget}"


def rank_budget_rows(ev, items, shards) -> dict[str, dict[str, float]]:
    """Perplexity rows for the composite rank budget (compose's max_rank, truncation in factor space).

    Two k = 3 settings, each at every budget in RANK_BUDGETS: `top-3` — every text gets its top-3
    retrieved shards with the server's softmax weights and no threshold (bench_serving's k = 3
    workload: every request a rank-Σr composite); `distractor` — own shard 0.5 + two others 0.25.
    Budgets ≥ the shards' own rank only, so a k = 1 plan is the shard itself at every budget."""
    top_rank = max(sh.rank for sh in shards.values())
    out: dict[str, dict[str, float]] = {}
    for budget in RANK_BUDGETS:
        assert budget is None or budget >= top_rank, "a budget below a shard's rank truncates single shards too"
        params = {} if budget is None else {"max_rank": budget}
        lab = budget_label(budget)
        out[f"top-3 svd-centered [{lab}]"] = {
            d: L.ppl(ev.nll_planned(items[d], [L.plan(it["hits"], 0.0, TEMPERATURE) for it in items[d]],
                                    "svd-centered", params)) for d in DOMAINS}
        out[f"distractor svd-centered [{lab}]"] = {}
        for i, d in enumerate(DOMAINS):
            p = ((d, DISTRACTOR_W[0]), (DOMAINS[(i + 1) % 4], DISTRACTOR_W[1]), (DOMAINS[(i + 2) % 4], DISTRACTOR_W[2]))
            out[f"distractor svd-centered [{lab}]"][d] = L.ppl(ev.nll(ev.key_for(p, "svd-centered", params), items[d]))
        print(lab, {k: v for k, v in out.items() if lab in k}, flush=True)
    return out


def rank_budget_summary(rows, shards) -> dict:
    """Per budget: recovered share of the oracle gain (per domain, mean, worst) in both settings, and
    the bytes a k = 3 composite reads per step relative to the unbudgeted one."""
    full = 3 * max(sh.rank for sh in shards.values())
    summ = {}
    for budget in RANK_BUDGETS:
        lab = budget_label(budget)
        e = {"budget": budget, "composite_rank": full if budget is None else min(budget, full)}
        e["bytes_vs_unbudgeted"] = e["composite_rank"] / full
        for setting in ("top-3", "distractor"):
            rec = {d: rows[f"{setting} svd-centered [{lab}]"][d]["recovered"] for d in DOMAINS}
            e[setting] = {"per_domain": rec, "mean": sum(rec.values()) / len(rec), "worst": min(rec.values())}
        summ[lab] = e
    return summ


def write_results(out, a, t_start, timings, ev, shards) -> str:
    """JSON + markdown + PNG of what `out` holds so far."""
    from benchmarks.machine import describe
    out.update({"machine": describe(), "dtype": a.dtype, "seconds": round(time.time() - t_start, 1),
                "timings": timings, "compose_seconds": round(ev.compose_s, 1),
                "shard_provenance": {s: sh.provenance for s, sh in shards.items()}})
    a.results.mkdir(parents=True, exist_ok=True)
    stem = "eval_quality" + ("_quick" if a.quick else "")
    (a.results / f"{stem}.json").write_text(json.dumps(out, indent=1, default=str))
    from benchmarks.quality import eval_quality_report as R
    md = R.markdown(out)
    (a.results / f"{stem}.md").write_text(md)
    R.plot(out, a.results / f"{stem}.png")
    return md


def retrieval_store(path: Path, shards: dict):
    """A real ShardStore holding the shards with their domains' retrieval texts, as `wrag demo` registers them."""
    from wrag_vllm.store import ShardStore

    for name, sh in shards.items():
        d = build_domain(name)
        sh.samples, sh.queries = d.samples, d.queries
    store = ShardStore(path)
    store.add_many(shards.values())
    return store


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", type=int, default=24, help="held-out texts per domain")
    ap.add_argument("--general", type=int, default=24, help="general-text passages")
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens scored per text")
    ap.add_argument("--sweep-texts", type=int, default=8, help="texts per domain in the λ/ρ sweep")
    ap.add_argument("--alt-threshold", type=float, default=0.2,
                    help="a lower retrieval threshold evaluated beside the server's 0.5")
    ap.add_argument("--ablation-steps", type=int, default=40, help="training steps per ablation variant")
    ap.add_argument("--pubmedqa", type=Path, default=PUBMEDQA)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--cache", type=Path, default=None, help="default <wrag cache>/eval_quality")
    ap.add_argument("--shards", type=Path, default=SHARD_DIR)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: "
                                               "general,pubmedqa,ablation,sweep,ties,budget")
    ap.add_argument("--quick", action="store_true", help="smoke run: 6 texts, 6 general, 4 sweep, 4 steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core host)")
    a = ap.parse_args(argv)
    if a.quick:
        a.texts, a.general, a.sweep_texts, a.ablation_steps = 6, 6, 4, 4
    skip = set(filter(None, a.skip.split(",")))
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start, timings = time.time(), {}

    def lap(name, t0):
        timings[name] = round(time.time() - t0, 1)
        print(f"[{name}: {timings[name]} s, total {time.time() - t_start:.0f} s]", flush=True)
        if "perplexity" in out:  # results so far, so an interrupted run still leaves a report
            write_results(out, a, t_start, timings, ev, shards)

    base_dir = ensure_base_model()
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, a.dtype)).eval()
    shards = {n: load_shard(a.shards / f"{n}.safetensors") for n in DOMAINS}
    shard_hash = hashlib.sha256(b"".join((a.shards / f"{n}.safetensors").read_bytes() for n in DOMAINS)).hexdigest()
    cache_dir = a.cache or cache_root() / "eval_quality"
    ck = L.digest({"base": next(iter(shards.values())).base.weights_hash, "shards": shard_hash,
                   "dtype": a.dtype, "max_tokens": a.max_tokens, "v": 1})
    cache = L.JsonCache(cache_dir / f"nll-{ck}.json")
    ev = Evaluator(model, tok, shards, cache, a.max_tokens)
    items = heldout_items(a.texts)
    out: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                 "server_rule": {"threshold": THRESHOLD, "temperature": TEMPERATURE, "top_k": TOP_K}}

    # ---------------------------------------------------------------- 1. retrieval
    t0 = time.time()
    gen_items = [] if "general" in skip else L.general_texts(a.general)
    tmp = tempfile.TemporaryDirectory(prefix="wrag-eval-")
    store = retrieval_store(Path(tmp.name) / "store", shards)
    ret: dict = {"prompts": {}, "texts": {}, "thresholds": {}}
    for d in DOMAINS:
        dom = build_domain(d)
        hits = store.search_many(dom.heldout_prompts, k=TOP_K)
        top = [h[0][0] for h in hits]
        ret["prompts"][d] = {"n": len(top), "top1": sum(t == d for t in top) / len(top),
                             "top1_kept": sum(h[0][0] == d and h[0][1] >= THRESHOLD for h in hits) / len(top),
                             "confusion": {o: top.count(o) for o in DOMAINS}}
    all_items = [it for d in DOMAINS for it in items[d]]
    text_hits = store.search_many([it["text"][:400] for it in all_items], k=TOP_K)
    gen_hits = store.search_many([it["text"][:400] for it in gen_items], k=TOP_K) if gen_items else []
    for it, h in zip(all_items, text_hits):
        it["hits"] = h
    for it, h in zip(gen_items, gen_hits):
        it["hits"] = h
    for thr in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        ret["thresholds"][str(thr)] = {
            "domain_own_top1_kept": sum(h[0][0] == it["domain"] and h[0][1] >= thr
                                        for it, h in zip(all_items, text_hits)) / len(all_items),
            "domain_any_kept": sum(h[0][1] >= thr for h in text_hits) / len(all_items),
            "general_any_kept": (sum(h[0][1] >= thr for h in gen_hits) / len(gen_hits)) if gen_hits else None}
    ret["texts"] = {d: {"top1_no_threshold": sum(it["hits"][0][0] == d for it in items[d]) / len(items[d])}
                    for d in DOMAINS}
    out["retrieval"] = ret
    store.close()
    tmp.cleanup()
    lap("retrieval", t0)

    def plans(its, thr):
        return [L.plan(it["hits"], thr, TEMPERATURE) for it in its]

    # ---------------------------------------------------------------- 2. per-domain perplexity
    t0 = time.time()
    rows: dict[str, dict] = {}
    ppl: dict[str, dict[str, float]] = {}
    ppl["base"] = {d: L.ppl(ev.nll("base", items[d])) for d in DOMAINS}
    print("base", ppl["base"], flush=True)
    for s in DOMAINS:
        ppl[f"shard {s}"] = {d: L.ppl(ev.nll(f"shard:{s}", items[d])) for d in DOMAINS}
        print(f"shard {s}", ppl[f"shard {s}"], flush=True)
    ppl["oracle"] = {d: ppl[f"shard {d}"][d] for d in DOMAINS}
    lap("ppl_single", t0)
    t0 = time.time()
    methods = ["linear", "svd-centered"] + ([] if "ties" in skip else ["ties"])
    plan_stats = {}
    for thr in (THRESHOLD, a.alt_threshold):
        for d in DOMAINS:
            ps = plans(items[d], thr)
            plan_stats.setdefault(str(thr), {})[d] = {
                "retrieved_none": sum(not p for p in ps), "k": [len(p) for p in ps],
                "own_top": sum(bool(p) and p[0][0] == d for p in ps), "n": len(ps)}
        for m in methods if thr == THRESHOLD else ["linear", "svd-centered"]:
            name = f"WRAG {m}" + ("" if thr == THRESHOLD else f" (thr {thr})")
            ppl[name] = {d: L.ppl(ev.nll_planned(items[d], plans(items[d], thr), m)) for d in DOMAINS}
            print(name, ppl[name], flush=True)
    merged = tuple((s, 0.25) for s in DOMAINS)
    ppl["all merged (linear ¼ each)"] = {d: L.ppl(ev.nll(ev.key_for(merged, "linear"), items[d])) for d in DOMAINS}
    for m in ("linear", "svd-centered"):
        ppl[f"distractor {m}"] = {}
        for i, d in enumerate(DOMAINS):
            p = ((d, DISTRACTOR_W[0]), (DOMAINS[(i + 1) % 4], DISTRACTOR_W[1]), (DOMAINS[(i + 2) % 4], DISTRACTOR_W[2]))
            ppl[f"distractor {m}"][d] = L.ppl(ev.nll(ev.key_for(p, m), items[d]))
        print(f"distractor {m}", ppl[f"distractor {m}"], flush=True)
    budget_rows = rank_budget_rows(ev, items, shards) if "budget" not in skip else {}
    ppl.update(budget_rows)
    for name, row in ppl.items():
        rows[name] = {d: {"ppl": row[d], "recovered": (ppl["base"][d] - row[d]) / (ppl["base"][d] - ppl["oracle"][d])}
                      for d in DOMAINS}
    if budget_rows:
        out["rank_budget"] = rank_budget_summary(rows, shards)
    out["perplexity"] = rows
    out["plan_stats"] = plan_stats
    out["tokens_per_domain"] = {d: sum(r[1] for r in ev.nll("base", items[d])) for d in DOMAINS}
    lap("ppl_wrag", t0)

    # ---------------------------------------------------------------- 3. general text
    if gen_items:
        t0 = time.time()
        g: dict = {"n": len(gen_items), "tokens": sum(r[1] for r in ev.nll("base", gen_items)), "ppl": {}}
        g["ppl"]["base"] = L.ppl(ev.nll("base", gen_items))
        for s in DOMAINS:
            g["ppl"][f"shard {s}"] = L.ppl(ev.nll(f"shard:{s}", gen_items))
        g["ppl"]["all merged (linear ¼ each)"] = L.ppl(ev.nll(ev.key_for(merged, "linear"), gen_items))
        for thr in (THRESHOLD, a.alt_threshold):
            ps = plans(gen_items, thr)
            name = "WRAG svd-centered" + ("" if thr == THRESHOLD else f" (thr {thr})")
            g["ppl"][name] = L.ppl(ev.nll_planned(gen_items, ps, "svd-centered"))
            g[f"retrieved_any@{thr}"] = sum(bool(p) for p in ps) / len(ps)
            g[f"retrieved@{thr}"] = {s: sum(any(i == s for i, _ in p) for p in ps) for s in DOMAINS}
        g["change_vs_base"] = {k: v / g["ppl"]["base"] - 1 for k, v in g["ppl"].items()}
        out["general"] = g
        print("general", g["ppl"], flush=True)
        lap("general", t0)

    # ---------------------------------------------------------------- 4. PubMedQA
    if "pubmedqa" not in skip and a.pubmedqa.exists():
        t0 = time.time()
        qa = L.pubmedqa_items(a.pubmedqa, build_domain("medicine").heldout_ids)
        if a.quick:
            qa = qa[:8]
        qcache = L.JsonCache(cache_dir / f"pubmedqa-{ck}.json")
        tmp = tempfile.TemporaryDirectory(prefix="wrag-eval-")
        store = retrieval_store(Path(tmp.name) / "store", shards)
        qhits = store.search_many([it["question"] for it in qa], k=TOP_K)
        store.close()
        tmp.cleanup()
        res: dict = {"n": len(qa), "ids": [it["id"] for it in qa],
                     "label_counts": {o: sum(it["answer"] == o for it in qa) for o in L.OPTIONS}}

        def score(key, sub):
            todo = [it for it in sub if f"{key}@{it['id']}" not in qcache]
            if todo:
                with L.DenseDelta(model, ev.delta(key)):
                    for it, sc in zip(todo, L.pubmedqa_scores(model, tok, todo)):
                        qcache.put(f"{key}@{it['id']}", sc, flush_every=10 ** 9)
                qcache.flush()
            return [qcache.get(f"{key}@{it['id']}") for it in sub]

        def acc(keys):
            groups: dict[str, list[int]] = {}
            for i, k in enumerate(keys):
                groups.setdefault(k, []).append(i)
            pred = [None] * len(qa)
            for k, idx in groups.items():
                for i, sc in zip(idx, score(k, [qa[i] for i in idx])):
                    pred[i] = L.OPTIONS[max(range(3), key=lambda j: sc[j])]
            return {"accuracy": sum(p == it["answer"] for p, it in zip(pred, qa)) / len(qa),
                    "predicted": {o: pred.count(o) for o in L.OPTIONS}}

        res["base"] = acc(["base"] * len(qa))
        res["medicine shard"] = acc(["shard:medicine"] * len(qa))
        for thr in (THRESHOLD, a.alt_threshold):
            ps = [L.plan(h, thr, TEMPERATURE) for h in qhits]
            name = "WRAG svd-centered" + ("" if thr == THRESHOLD else f" (thr {thr})")
            res[name] = {**acc([ev.key_for(p, "svd-centered") for p in ps]),
                         "retrieved_medicine": sum(any(i == "medicine" for i, _ in p) for p in ps) / len(ps)}
        res["majority class (yes)"] = {"accuracy": res["label_counts"]["yes"] / len(qa)}
        out["pubmedqa"] = res
        print("pubmedqa", {k: v for k, v in res.items() if k != "ids"}, flush=True)
        lap("pubmedqa", t0)

    # ---------------------------------------------------------------- 5. λ/ρ sweep
    if "sweep" not in skip:
        t0 = time.time()
        configs = [{"lam": lam, "rho": rho} for lam in (0.5, 1.0, 1.5, 2.0) for rho in (2, 4, 8)] + \
                  [{"lam": lam, "rho_energy": e} for lam in (1.0, 2.0) for e in (0.5, 0.8)]
        sub = {d: items[d][:a.sweep_texts] for d in DOMAINS}
        sw: dict = {"texts_per_domain": a.sweep_texts, "distractor": [], "retrieval": []}

        def dist_ppl(method, params):
            per = {}
            for i, d in enumerate(DOMAINS):
                p = ((d, 0.5), (DOMAINS[(i + 1) % 4], 0.25), (DOMAINS[(i + 2) % 4], 0.25))
                per[d] = L.ppl(ev.nll(ev.key_for(p, method, params), sub[d]))
            return per

        k3 = [it for it in all_items if len(L.plan(it["hits"], a.alt_threshold, TEMPERATURE)) >= 3][:16]
        sw["retrieval_texts"] = len(k3)

        def ret_ppl(method, params):
            return L.ppl(ev.nll_planned(k3, plans(k3, a.alt_threshold), method, params)) if k3 else None

        base_sub = {d: L.ppl(ev.nll("base", sub[d])) for d in DOMAINS}
        sw["base"] = {"distractor": base_sub, "retrieval": L.ppl(ev.nll("base", k3)) if k3 else None}
        sw["linear"] = {"distractor": dist_ppl("linear", {}), "retrieval": ret_ppl("linear", {})}
        for c in configs:
            r = {"params": c, "distractor": dist_ppl("svd-centered", c), "retrieval": ret_ppl("svd-centered", c)}
            r["distractor_mean_rel_linear"] = sum(r["distractor"][d] / sw["linear"]["distractor"][d] - 1
                                                  for d in DOMAINS) / len(DOMAINS)
            r["retrieval_rel_linear"] = (r["retrieval"] / sw["linear"]["retrieval"] - 1) if k3 else None
            sw["distractor"].append(r)
            print("sweep", c, f"{100 * r['distractor_mean_rel_linear']:+.2f}%",
                  r["retrieval_rel_linear"], flush=True)
        score = lambda r: r["distractor_mean_rel_linear"] + (r["retrieval_rel_linear"] or 0.0)  # noqa: E731
        best = min(sw["distractor"], key=score)
        sw["best"] = best["params"]
        out["sweep"] = sw
        lap("sweep", t0)

    # ---------------------------------------------------------------- 6. attention ablation
    if "ablation" not in skip:
        t0 = time.time()
        from wrag_vllm.peft_io import import_peft
        law = build_domain("law")
        abl: dict = {"steps": a.ablation_steps, "variants": {}}
        variants = {"ffn": list(FFN_MODULES), "ffn+attn": list(FFN_MODULES) + list(L.ATTN)}
        prompts = L.CHAT_PROMPTS + [p for p in law.heldout_prompts[:10]]
        acache = L.JsonCache(cache_dir / f"ablation-{ck}.json")
        gkey = "gen|base"
        if gkey not in acache:
            acache.put(gkey, L.chat_generate(model, tok, prompts))
        for name, targets in variants.items():
            vdir = cache_dir / "ablation" / f"law-{name}-{a.ablation_steps}"
            if not (vdir / "wrag_ablation.json").exists():
                L.train_lora(base_dir, law.train_texts, targets, vdir, a.ablation_steps)
            info = json.loads((vdir / "wrag_ablation.json").read_text())
            sh = import_peft(vdir, shards["law"].base, shard_id=f"law-{name.replace('+', '-')}",
                             allow_attention=True)
            key = f"ablation:{name}:{a.ablation_steps}"
            ev.shards[key] = sh
            info["law_ppl"] = L.ppl(ev.nll(f"shard:{key}", items["law"]))
            if gen_items:
                info["general_ppl"] = L.ppl(ev.nll(f"shard:{key}", gen_items))
            if f"gen|{key}" not in acache:
                with L.DenseDelta(model, sh):
                    acache.put(f"gen|{key}", L.chat_generate(model, tok, prompts))
            abl["variants"][name] = info
            print("ablation", name, {k: info[k] for k in ("law_ppl", "loss_last10")}, flush=True)
        if "gen|shard:law" not in acache:
            with L.DenseDelta(model, shards["law"]):
                acache.put("gen|shard:law", L.chat_generate(model, tok, prompts))
        ng = len(L.CHAT_PROMPTS)
        abl["instruction_following"] = {}
        for label, gk in [("base", gkey), ("law FFN-only (committed, 80 steps)", "gen|shard:law")] + \
                         [(f"law {n} ({a.ablation_steps} steps)", f"gen|ablation:{n}:{a.ablation_steps}")
                          for n in variants]:
            gens = acache.get(gk)
            row = {}
            for part, sub in (("general", gens[:ng]), ("law", gens[ng:])):
                row[part] = {"n": len(sub), "follows": sum(x["follows"] for x in sub) / len(sub),
                             "stopped": sum(x["stopped"] for x in sub) / len(sub),
                             "clean": sum(x["clean"] for x in sub) / len(sub),
                             "mean_tokens": sum(x["tokens"] for x in sub) / len(sub)}
            row["examples"] = [{"prompt": x["prompt"], "answer": x["answer"][:300]} for x in gens[:3]]
            abl["instruction_following"][label] = row
        abl["law_ppl_base"] = ppl["base"]["law"]
        abl["law_ppl_committed"] = ppl["oracle"]["law"]
        out["ablation"] = abl
        lap("ablation", t0)

    md = write_results(out, a, t_start, timings, ev, shards)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
