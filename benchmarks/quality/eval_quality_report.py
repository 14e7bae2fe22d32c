"""Markdown tables and the PNG figure of benchmarks/quality/eval_quality.py (from its JSON result)."""
from __future__ import annotations

from pathlib import Path

DOMAINS = ("medicine", "computing", "law", "history")


def _pct(x, digits=1):
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def targets(out) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) rows."""
    rows = []
    r = out["retrieval"]["prompts"]
    rows.append(("retrieval top-1 ≥ 95% on held-out prompts (every domain)",
                 ", ".join(f"{d} {_pct(r[d]['top1'])}" for d in DOMAINS), all(r[d]["top1"] >= 0.95 for d in DOMAINS)))
    p = out["perplexity"]
    for name in [k for k in p if k.startswith("WRAG")]:
        rec = {d: p[name][d]["recovered"] for d in DOMAINS}
        rows.append((f"{name} recovers ≥ 80% of the oracle gain (every domain)",
                     ", ".join(f"{d} {_pct(v, 0)}" for d, v in rec.items()), all(v >= 0.8 for v in rec.values())))
    g = out.get("general")
    if g:
        for name in [k for k in g["ppl"] if k.startswith("WRAG")]:
            c = g["change_vs_base"][name]
            rows.append((f"out-of-domain perplexity within 2% of base ({name})", f"{100 * c:+.2f}%", abs(c) <= 0.02))
    dl, ds = p["distractor linear"], p["distractor svd-centered"]
    better = [d for d in DOMAINS if ds[d]["ppl"] <= dl[d]["ppl"] * 1.0005]
    rows.append(("svd-centered ≤ linear perplexity with distractors (every domain; default λ=1, ρ=r)",
                 ", ".join(f"{d} {ds[d]['ppl']:.2f} vs {dl[d]['ppl']:.2f}" for d in DOMAINS), len(better) == 4))
    return rows


def markdown(out) -> str:
    L = []
    L += ["## Targets (measured, not asserted)", "", "| target | measured | met |", "|---|---|---|"]
    for t, m, ok in targets(out):
        L.append(f"| {t} | {m} | {'yes' if ok else '**no**'} |")

    p = out["perplexity"]
    L += ["", "## Held-out perplexity per domain (lower is better; recovered = share of the oracle shard's gain)", "",
          "| model | " + " | ".join(DOMAINS) + " |", "|---" * 5 + "|"]
    order = ["base", "oracle"] + [k for k in p if k.startswith("WRAG")] + \
            ["all merged (linear ¼ each)", "distractor linear", "distractor svd-centered"]
    for name in order:
        cells = []
        for d in DOMAINS:
            c = p[name][d]
            cells.append(f"{c['ppl']:.2f}" + ("" if name in ("base", "oracle") else f" ({_pct(c['recovered'], 0)})"))
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    ps = out["plan_stats"]
    L += ["", "What retrieval chose for these texts (query = first 400 characters; k = shards kept):", "",
          "| threshold | " + " | ".join(DOMAINS) + " |", "|---" * 5 + "|"]
    for thr, st in ps.items():
        L.append(f"| {thr} | " + " | ".join(
            f"none {st[d]['retrieved_none']}/{st[d]['n']}, own shard first {st[d]['own_top']}, "
            f"k=2: {st[d]['k'].count(2)}, k=3: {st[d]['k'].count(3)}" for d in DOMAINS) + " |")
    L += ["", "Single shards on every domain (diagonal = oracle; off-diagonal = harm or help out of domain):", "",
          "| shard | " + " | ".join(DOMAINS) + " |", "|---" * 5 + "|"]
    for s in DOMAINS:
        row = p[f"shard {s}"]
        L.append(f"| {s} | " + " | ".join(
            f"{row[d]['ppl']:.2f} ({100 * (row[d]['ppl'] / p['base'][d]['ppl'] - 1):+.1f}%)" + (" **" if s == d else "")
            for d in DOMAINS) + " |")

    r = out["retrieval"]
    thr = out.get("server_rule", {}).get("threshold", "the threshold")
    L += ["", "## Retrieval (real ShardStore, MiniLM relevance heads)", "",
          f"| domain | held-out prompts | top-1 | top-1 and p ≥ {thr} | confusion (top-1) | texts: top-1 |",
          "|---|---|---|---|---|---|"]
    for d in DOMAINS:
        x = r["prompts"][d]
        L.append(f"| {d} | {x['n']} | {_pct(x['top1'])} | {_pct(x['top1_kept'])} | {x['confusion']} | "
                 f"{_pct(r['texts'][d]['top1_no_threshold'])} |")
    L += ["", "Threshold vs what is kept (domain texts: own shard is the top hit and kept; general texts: anything kept):",
          "", "| threshold | domain texts: own shard kept | domain texts: any kept | general texts: any kept |",
          "|---|---|---|---|"]
    for thr, x in r["thresholds"].items():
        L.append(f"| {thr} | {_pct(x['domain_own_top1_kept'])} | {_pct(x['domain_any_kept'])} | "
                 f"{_pct(x['general_any_kept'])} |")

    g = out.get("general")
    if g:
        L += ["", f"## General, out-of-domain text ({g['n']} passages of the Debian `fortunes` package, "
                  f"{g['tokens']} tokens)", "", "| model | perplexity | vs base | shards retrieved |", "|---|---|---|---|"]
        for k, v in g["ppl"].items():
            extra = ""
            if k.startswith("WRAG"):
                thr = k.split("thr ")[1].rstrip(")") if "thr" in k else str(out["server_rule"]["threshold"])
                extra = f"any: {_pct(g[f'retrieved_any@{thr}'], 0)}, per shard {g[f'retrieved@{thr}']}"
            L.append(f"| {k} | {v:.2f} | {100 * g['change_vs_base'][k]:+.2f}% | {extra} |")

    q = out.get("pubmedqa")
    if q:
        L += ["", f"## PubMedQA yes/no/maybe (held-out PQA-L ids of the medicine split, n = {q['n']}; "
                  f"labels {q['label_counts']})", "", "| model | accuracy | predictions | medicine shard retrieved |",
              "|---|---|---|---|"]
        for k, v in q.items():
            if isinstance(v, dict) and "accuracy" in v:
                L.append(f"| {k} | {_pct(v['accuracy'])} | {v.get('predicted', '–')} | "
                         f"{_pct(v['retrieved_medicine'], 0) if 'retrieved_medicine' in v else '–'} |")

    ab = out.get("ablation")
    if ab:
        L += ["", f"## Ablation: FFN-only vs FFN + attention shards (law, {ab['steps']} steps each, same recipe)", "",
              "| model | follows chat format: general prompts | law prompts | stopped at <\\|im_end\\| > | clean | "
              "mean answer tokens |", "|---|---|---|---|---|---|"]
        for k, v in ab["instruction_following"].items():
            gg, ll = v["general"], v["law"]
            L.append(f"| {k} | {_pct(gg['follows'], 0)} ({gg['n']}) | {_pct(ll['follows'], 0)} ({ll['n']}) | "
                     f"{_pct(gg['stopped'], 0)} / {_pct(ll['stopped'], 0)} | {_pct(gg['clean'], 0)} / "
                     f"{_pct(ll['clean'], 0)} | {gg['mean_tokens']:.0f} / {ll['mean_tokens']:.0f} |")
        L += ["", "| variant | trainable params | loss first→last 10 | law ppl | general ppl | train s |", "|---|---|---|---|---|---|"]
        L.append(f"| base | – | – | {ab['law_ppl_base']:.2f} | "
                 f"{g['ppl']['base']:.2f} | – |" if g else f"| base | – | – | {ab['law_ppl_base']:.2f} | – | – |")
        for k, v in ab["variants"].items():
            L.append(f"| {k} | {v['trainable_params']:,} | {v['loss_first10']:.3f}→{v['loss_last10']:.3f} | "
                     f"{v['law_ppl']:.2f} | {v.get('general_ppl', float('nan')):.2f} | {v['train_seconds']} |")

    rb = out.get("rank_budget")
    if rb:
        L += ["", "## Composite rank budget (svd-centered k = 3, truncated in factor space; recovered share of the "
                  "oracle gain per domain)", "",
              "top-3: every text's top-3 retrieved shards, server weights, no threshold (the k = 3 serving "
              "workload); distractor: own shard 0.5 + two others 0.25.", "",
              "| budget | composite rank | bytes vs no budget | top-3: " + " | top-3: ".join(DOMAINS) +
              " | top-3 mean | distractor mean | distractor worst |", "|---" * 10 + "|"]
        for lab, e in rb.items():
            t3, di = e["top-3"], e["distractor"]
            L.append(f"| {lab} | {e['composite_rank']} | {e['bytes_vs_unbudgeted']:.2f} | " +
                     " | ".join(_pct(t3["per_domain"][d], 1) for d in DOMAINS) +
                     f" | {_pct(t3['mean'], 1)} | {_pct(di['mean'], 1)} | {_pct(di['worst'], 1)} |")

    sw = out.get("sweep")
    if sw:
        L += ["", f"## svd-centered λ/ρ sweep (distractor: {sw['texts_per_domain']} texts per domain, own 0.5 + two "
                  f"others 0.25; retrieval: {sw['retrieval_texts']} texts that keep 3 shards at the alt threshold)", "",
              "| params | " + " | ".join(f"distractor {d}" for d in DOMAINS) + " | distractor mean vs linear | "
              "retrieval ppl (vs linear) |", "|---" * 7 + "|"]
        lin = sw["linear"]
        L.append("| linear | " + " | ".join(f"{lin['distractor'][d]:.2f}" for d in DOMAINS) + " | 0 | "
                 + (f"{lin['retrieval']:.2f}" if lin["retrieval"] else "–") + " |")
        for r in sw["distractor"]:
            L.append(f"| {r['params']} | " + " | ".join(f"{r['distractor'][d]:.2f}" for d in DOMAINS) +
                     f" | {100 * r['distractor_mean_rel_linear']:+.2f}% | " +
                     (f"{r['retrieval']:.2f} ({100 * r['retrieval_rel_linear']:+.2f}%)" if r["retrieval"] else "–") + " |")
        L += ["", f"Best (lowest distractor + retrieval change vs linear): {sw['best']}"]

    m = out["machine"]
    L += ["", f"{out['dtype']}, ≤ {out['config']['max_tokens']} tokens per text, {out['config']['texts']} held-out "
              f"texts per domain ({out['tokens_per_domain']} tokens); {m['cpu']}, {m['cores']} cores, "
              f"torch {m['torch']}, vllm {m['vllm']}; {out['seconds']} s ({out['timings']})."]
    return "\n".join(L) + "\n"


def plot(out, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    p = out["perplexity"]
    ax = axes[0][0]
    names = ["base", "oracle"] + [k for k in p if k.startswith("WRAG")] + \
            ["all merged (linear ¼ each)", "distractor linear", "distractor svd-centered"]
    x = np.arange(len(DOMAINS))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar(x + i * w, [p[n][d]["ppl"] for d in DOMAINS], w, label=n)
    ax.set_xticks(x + 0.4 - w / 2, DOMAINS)
    ax.set_ylabel("held-out perplexity")
    ax.set_title("perplexity per domain")
    ax.legend(fontsize=6)
    ax = axes[0][1]
    rn = [n for n in names if n not in ("base", "oracle")]
    for i, n in enumerate(rn):
        ax.bar(x + i * 0.8 / len(rn), [100 * p[n][d]["recovered"] for d in DOMAINS], 0.8 / len(rn), label=n)
    ax.axhline(80, color="k", ls="--", lw=1)
    ax.set_xticks(x + 0.4 - 0.4 / len(rn), DOMAINS)
    ax.set_ylabel("% of oracle gain recovered")
    ax.set_title("recovered gain (target 80%)")
    ax.legend(fontsize=6)
    ax = axes[0][2]
    th = out["retrieval"]["thresholds"]
    t = [float(k) for k in th]
    ax.plot(t, [100 * v["domain_own_top1_kept"] for v in th.values()], "o-", label="domain text: own shard kept")
    if th[next(iter(th))]["general_any_kept"] is not None:
        ax.plot(t, [100 * v["general_any_kept"] for v in th.values()], "s-", label="general text: any shard kept")
    ax.axvline(out["server_rule"]["threshold"], color="k", ls="--", lw=1)
    ax.set_xlabel("retrieval threshold (relevance p)")
    ax.set_ylabel("%")
    ax.set_title("threshold: domain recall vs general false retrieval")
    ax.legend(fontsize=7)
    ax = axes[1][0]
    sw = out.get("sweep")
    if sw:
        rows = [r for r in sw["distractor"] if "rho" in r["params"]]
        lams = sorted({r["params"]["lam"] for r in rows})
        rhos = sorted({r["params"]["rho"] for r in rows})
        M = np.array([[next(100 * r["distractor_mean_rel_linear"] for r in rows
                            if r["params"]["lam"] == la and r["params"]["rho"] == rh) for rh in rhos] for la in lams])
        lim = max(1e-6, float(np.abs(M).max()))
        im = ax.imshow(M, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(rhos)), [f"ρ={r}" for r in rhos])
        ax.set_yticks(range(len(lams)), [f"λ={la}" for la in lams])
        for i in range(len(lams)):
            for j in range(len(rhos)):
                ax.text(j, i, f"{M[i, j]:+.2f}%", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title("svd-centered vs linear, distractor ppl change")
    ax = axes[1][1]
    ab = out.get("ablation")
    if ab:
        ks = list(ab["instruction_following"])
        v = ab["instruction_following"]
        xx = np.arange(len(ks))
        ax.bar(xx - 0.2, [100 * v[k]["general"]["follows"] for k in ks], 0.4, label="general prompts")
        ax.bar(xx + 0.2, [100 * v[k]["law"]["follows"] for k in ks], 0.4, label="law prompts")
        ax.set_xticks(xx, [k.replace(" (", "\n(") for k in ks], fontsize=7)
        ax.set_ylim(0, 100)
        ax.set_ylabel("% answers in chat format, stopped at <|im_end|>")
        ax.set_title("instruction following: FFN-only vs FFN+attention")
        ax.legend(fontsize=7)
    ax = axes[1][2]
    q, g = out.get("pubmedqa"), out.get("general")
    if q:
        ks = [k for k, v in q.items() if isinstance(v, dict) and "accuracy" in v]
        ax.barh(ks, [100 * q[k]["accuracy"] for k in ks], color="tab:purple")
        ax.set_xlabel("PubMedQA accuracy (%)")
        ax.set_title(f"PubMedQA yes/no/maybe, n={q['n']}")
    elif g:
        ax.barh(list(g["ppl"]), [100 * c for c in g["change_vs_base"].values()])
        ax.set_title("general text: perplexity change vs base (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
