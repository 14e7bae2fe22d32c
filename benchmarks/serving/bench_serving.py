"""Multi-tenant serving throughput: plain vLLM vs WRAG (k = 1, k = 3 linear, k = 3 svd-centered)
vs vLLM's multi-LoRA (one adapter per request; the concatenated adapter equal to the same k = 3 shards).

Set-up: S random rank-r FFN shards, one per (domain, sub-topic) description, in a ShardStore
(MiniLM embeddings). Q = S query texts, one per sub-topic ("Explain the basics of <topic>."); a
request's prompt is its query text, so WRAG retrieves the sub-topic's own shard first and its
neighbours after it. N closed-loop streaming clients; every configuration runs the same request list
(each query text once per pass, shuffled), after a warm-up pass over all query texts.

The LoRA baselines serve exactly what WRAG applies, computed in-process with the server's own code
(wrag_vllm.serving.resolver.Resolver on the same store, same threshold and temperature):
    lora-1:    adapter of the query's top-1 shard   (export_peft(shard))        ≙ WRAG k = 1
    lora-cat3: compose(top-3, w, "linear") = [A_1;A_2;A_3], [w_1B_1 w_2B_2 w_3B_3]   (rank 3r)
               exported as a PEFT dir, one adapter per query text            ≙ WRAG k = 3 linear
Servers (one at a time): base (plain `vllm serve`, no plugin, compiled), wrag (same flags + the
plugin, compiled), lora-r<r> and lora-r<3r> (--enable-lora; the CPU build forces eager mode).

Workloads: every-set-distinct (the WRAG configs above: each query text retrieves its own shards,
the worst case for the pool) and shared-set (`wrag-shared`: each request names one of
SHARED_SETS sets of 3 shards, drawn Zipf-like per query text, p ∝ 1/rank, svd-centered — as when
a few tenants' domains serve most traffic, like the four demo shards).

Metrics per configuration: output tokens/s (Σ completion tokens / wall time), TTFT p50/p99,
inter-token latency p50/p99 (streamed chunk gaps), the ratio of tokens/s to the base server, and
beside it the memory-traffic limit of that ratio for a decode step: base bytes ÷ (base bytes + the
bytes of the distinct slot factors the step reads), from the model's real weight bytes and the
distinct slots `clients` concurrent requests of that configuration use.

    .venv/bin/python -m benchmarks.serving.bench_serving              # CPU default (SmolLM2, 64 shards)
    .venv/bin/python -m benchmarks.serving.bench_serving --model llama-1b --shards 256 --clients 64 ...  (GPU)
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.serving import serving_common as sc

SHARED_SETS = 4          # the shared-set workload's distinct shard sets


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2", "llama-1b", "llama-3b", "tiny"])
    p.add_argument("--shards", type=int, default=64, help="S: shards in the store (= distinct query topics)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--clients", type=int, default=8, help="N concurrent streaming clients")
    p.add_argument("--passes", type=int, default=1, help="measured passes over the S query texts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--warmup-tokens", type=int, default=4)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--kv-mib", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--slots", type=int, default=64, help="WRAG device pool slots per FFN layer")
    p.add_argument("--max-rank", type=int, default=0, help="WRAG slot rank (default 3·rank)")
    p.add_argument("--composite-rank", type=int, default=None,
                   help="WRAG composite rank budget (default: the server's; 0 = none, rank Σ r_i)")
    p.add_argument("--eager", action="store_true", help="--enforce-eager on base and WRAG servers too")
    p.add_argument("--configs", default="base,wrag,lora1,loracat",
                   help="servers to run: base, wrag, lora1, loracat")
    p.add_argument("--wrag-configs", default="wrag-off,wrag-k1,wrag-k3-linear,wrag-k3-svd,wrag-shared",
                   help="request configurations run on the WRAG server")
    p.add_argument("--extra-server-args", default="", help="appended to every vllm serve command")
    p.add_argument("--out", default="serving")
    p.add_argument("--workdir", default=None, help="keep the work folder here (default: temp, deleted)")
    p.add_argument("--profile", default=None, metavar="CONFIG",
                   help="py-spy record the engine process during this configuration (e.g. wrag-k3-svd)")
    return p.parse_args(argv)


def prepare(args, work: Path):
    """Model, store, per-query plans (the server's own retrieval code, run here), PEFT exports."""
    import torch

    from wrag_vllm.fingerprint import fingerprint_dir
    from wrag_vllm.peft_io import export_peft
    from wrag_vllm.compose import compose
    from wrag_vllm.serving.config import WragConfig
    from wrag_vllm.serving.resolver import Resolver
    from wrag_vllm.serving.controls import RequestControls

    t0 = time.time()
    model_dir, model_desc = sc.base_model(args.model, work)
    fp = fingerprint_dir(model_dir)
    shards = sc.make_shards(fp, args.shards, args.rank)
    store = sc.build_store(work / "store", shards)
    by_id = {s.id: s for s in shards}
    cfg = WragConfig.from_sources({"wrag": wrag_cfg(args, work)}, environ={})
    res = Resolver(cfg, store)
    texts = sc.query_texts(args.shards)
    rng = random.Random(5)
    sets = [sorted(rng.sample([s.id for s in shards], 3)) for _ in range(SHARED_SETS)]
    zipf = [1 / (i + 1) for i in range(SHARED_SETS)]
    shared = {t: sets[random.Random(t).choices(range(SHARED_SETS), weights=zipf)[0]] for t in texts}
    plans = {}
    for t in texts:
        p1 = res.resolve(t, RequestControls(top_k=1, method="linear"))
        p3 = res.resolve(t, RequestControls(top_k=3, method="linear"))
        plans[t] = {"k1": (p1.ids, p1.weights), "k3": (p3.ids, p3.weights)}
    t_prep = time.time() - t0
    lora = {}
    if {"lora1", "loracat"} & set(args.configs.split(",")):
        t1 = time.time()
        used1 = sorted({plans[t]["k1"][0][0] for t in texts})
        ad1 = {}
        for sid in used1:
            ad1[sid] = export_peft(by_id[sid], work / "peft1" / sid, base_model_name_or_path=str(model_dir),
                                   dtype=getattr(torch, args.dtype))
        adcat = {}
        for j, t in enumerate(texts):
            ids, w = plans[t]["k3"]
            comp = compose([by_id[i] for i in ids], w, method="linear")
            adcat[t] = (f"cat{j:04d}", export_peft(comp, work / "pcat" / f"cat{j:04d}",
                                                   base_model_name_or_path=str(model_dir),
                                                   dtype=getattr(torch, args.dtype)), comp.rank)
        lora = {"single": ad1, "cat": adcat, "export_s": time.time() - t1}
    return {"model_dir": model_dir, "model_desc": model_desc, "fp": fp, "store": store, "texts": texts,
            "plans": plans, "shared": shared, "lora": lora, "prep_s": t_prep, "shards": shards}


def wrag_cfg(args, work: Path) -> dict:
    cfg = {"store": str(work / "store"), "slots": args.slots, "max_rank": args.max_rank or 3 * args.rank,
           "k_max": 4, "top_k": 3, "threshold": 0.0, "method": "svd-centered"}
    if args.composite_rank is not None:
        cfg["composite_rank"] = args.composite_rank
    return cfg


def server_common(args):
    sc.Server.log_stem = args.out
    return dict(dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.clients,
                kv_bytes=args.kv_mib << 20, extra_args=args.extra_server_args.split())


def request_list(texts, passes, seed, model_of, xargs_of, max_tokens):
    order = []
    rng = random.Random(seed)
    for _ in range(passes):
        o = list(texts)
        rng.shuffle(o)
        order += o
    return [sc.completion_body(model_of(t), t, max_tokens, xargs_of(t)) for t in order]


def measure(name, srv, args, texts, model_of=lambda t: "model", xargs_of=lambda t: None, wrag=False,
            profile=None):
    """Warm-up pass (all query texts, few tokens: compiles, loads adapters, fills caches), then the
    measured passes. WRAG: /metrics deltas of each pass are kept (retrieval, composition)."""
    warm = request_list(texts, 1, 7, model_of, xargs_of, args.warmup_tokens)
    meas = request_list(texts, args.passes, 11, model_of, xargs_of, args.max_tokens)
    m0 = sc.scrape_metrics(srv.base_url) if wrag else {}
    w = sc.run_load(srv.base_url, warm, args.clients)
    m1 = sc.scrape_metrics(srv.base_url) if wrag else {}
    prof = start_profile(srv, name, args) if profile == name else None
    r = sc.run_load(srv.base_url, meas, args.clients)
    if prof is not None:
        r["profile"] = stop_profile(prof)
    m2 = sc.scrape_metrics(srv.base_url) if wrag else {}
    r["name"] = name
    r["warmup"] = {k: w[k] for k in ("wall_s", "ttft_p50_ms", "ttft_p99_ms", "ttft_mean_ms", "requests")}
    if wrag:
        r["metrics_warmup"] = sc.metrics_delta(m0, m1)
        r["metrics_measured"] = sc.metrics_delta(m1, m2)
    print(f"[bench] {name:16s} {r['output_tok_s']:7.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:7.1f} ms "
          f"p99 {r['ttft_p99_ms']:7.1f}  ITL p50 {r['itl_p50_ms']:6.1f} p99 {r['itl_p99_ms']:6.1f}  "
          f"(load {r['loadavg_1m_before']:.1f}->{r['loadavg_1m_after']:.1f})", flush=True)
    return r


def start_profile(srv, name, args):
    """py-spy record on the busiest child of the server (the engine core / worker)."""
    import subprocess

    import psutil
    kids = psutil.Process(srv.proc.pid).children(recursive=True)
    if not kids:
        return None
    for k in kids:
        k.cpu_percent(None)
    time.sleep(1.0)
    tgt = max(kids, key=lambda k: k.cpu_percent(None))
    out = sc.RESULTS / f"{args.out}-profile-{name}.svg"
    raw = sc.RESULTS / f"{args.out}-profile-{name}.txt"
    pyspy = shutil.which("py-spy") or str(sc.helpers_server.VENV_BIN / "py-spy")
    p = subprocess.Popen([pyspy, "record", "--pid", str(tgt.pid), "--rate", "50", "--format", "raw",
                          "--output", str(raw), "--nonblocking"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    return {"proc": p, "raw": raw, "svg": out, "pid": tgt.pid, "name": tgt.name()}


def stop_profile(prof):
    import signal
    prof["proc"].send_signal(signal.SIGINT)
    try:
        prof["proc"].wait(timeout=60)
    except Exception:
        prof["proc"].kill()
    return {"raw": str(prof["raw"]), "pid": prof["pid"], "process": prof["name"]}


def main(argv=None):
    args = parse(argv)
    configs = args.configs.split(",")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="wrag-bench-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    mach0 = sc.machine()          # code hashes as the servers load them
    results, servers = [], {}
    try:
        env = prepare(args, work)
        env["machine0"] = mach0
        texts, plans = env["texts"], env["plans"]
        print(f"[bench] prepared {args.shards} shards, {len(texts)} query texts in {env['prep_s']:.0f} s "
              f"(+ PEFT export {env['lora'].get('export_s', 0):.0f} s); model: {env['model_desc']}", flush=True)
        common = server_common(args)
        if "base" in configs:
            srv = sc.Server(env["model_dir"], work, name="base", eager=args.eager, **common)
            with sc.running(srv):
                servers["base"] = {"startup_s": srv.startup_s, "cmd": srv.cmd, "env": srv.env_used}
                results.append(measure("base", srv, args, texts, profile=args.profile))
        if "wrag" in configs:
            srv = sc.Server(env["model_dir"], work, name="wrag", eager=args.eager, wrag=wrag_cfg(args, work),
                            store_dir=work / "store", **common)
            with sc.running(srv):
                servers["wrag"] = {"startup_s": srv.startup_s, "cmd": srv.cmd, "env": srv.env_used}
                for name, xa in (("wrag-off", {"wrag_off": True}),
                                 ("wrag-k1", {"wrag_top_k": 1, "wrag_method": "linear"}),
                                 ("wrag-k3-linear", {"wrag_top_k": 3, "wrag_method": "linear"}),
                                 ("wrag-k3-svd", {"wrag_top_k": 3, "wrag_method": "svd-centered"})):
                    if name not in args.wrag_configs.split(","):
                        continue
                    r = measure(name, srv, args, texts, xargs_of=lambda t, xa=xa: xa, wrag=True,
                                profile=args.profile)
                    r["plan_check"] = check_plans(r, plans, name)
                    results.append(r)
                if "wrag-shared" in args.wrag_configs.split(","):
                    shared = env["shared"]
                    results.append(measure("wrag-shared", srv, args, texts, wrag=True, profile=args.profile,
                                           xargs_of=lambda t: {"wrag_shards": shared[t], "wrag_method": "svd-centered"}))
                servers["wrag"]["memory"] = sc.tree_memory(srv.proc.pid)
                servers["wrag"]["log_tail"] = srv.tail(5)
        lora = env["lora"]
        if "lora1" in configs:
            mods = [f"{sid}={p}" for sid, p in lora["single"].items()]
            srv = sc.Server(
                env["model_dir"], work, name="lora1", eager=args.eager,
                **{**common, "extra_args": [*common["extra_args"], "--enable-lora", "--max-loras",
                                            str(args.clients), "--max-lora-rank", str(lora_rank(args.rank)),
                                            "--max-cpu-loras", str(len(mods)), "--lora-modules", *mods]})
            with sc.running(srv):
                servers["lora1"] = {"startup_s": srv.startup_s, "cmd": srv.cmd[:20] + ["..."], "env": srv.env_used}
                results.append(measure("lora-base", srv, args, texts, profile=args.profile))
                results.append(measure("lora-1", srv, args, texts, model_of=lambda t: plans[t]["k1"][0][0],
                                       profile=args.profile))
        if "loracat" in configs:
            mods = [f"{n}={p}" for n, p, _ in lora["cat"].values()]
            rank = max(r for _, _, r in lora["cat"].values())
            srv = sc.Server(env["model_dir"], work, name="loracat", eager=args.eager,
                            **{**common, "extra_args": [*common["extra_args"], "--enable-lora", "--max-loras",
                                                        str(args.clients), "--max-lora-rank", str(lora_rank(rank)),
                                                        "--max-cpu-loras", str(len(mods)), "--lora-modules", *mods]})
            with sc.running(srv):
                servers["loracat"] = {"startup_s": srv.startup_s, "cmd": srv.cmd[:20] + ["..."], "env": srv.env_used}
                results.append(measure("lora-cat3", srv, args, texts, model_of=lambda t: lora["cat"][t][0],
                                       profile=args.profile))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    report(args, env, results, servers, time.time() - t_all)


def lora_rank(r: int) -> int:
    for c in (8, 16, 32, 64, 128, 256, 320, 512):
        if c >= r:
            return c
    raise ValueError(r)


def check_plans(r, plans, name):
    """Fraction of sampled responses whose x-wrag-shards header names exactly the shards of the
    in-process plan for the same prompt (same store, same resolver code)."""
    ok = n = 0
    for prompt, h in r["wrag_headers_sample"]:
        hdr = (h or {}).get("x-wrag-shards")
        if name == "wrag-off":
            want = []
        else:
            want = plans[prompt]["k1" if name == "wrag-k1" else "k3"][0]
        got = [] if hdr in (None, "-") else [x.split("=")[0] for x in hdr.split(",")]
        ok += got == list(want)
        n += 1
    return {"matching": ok, "sampled": n}


def slots_per_step(name: str, args, env) -> tuple[int, int]:
    """(distinct slot payloads a decode step of `clients` concurrent requests reads, their rank)."""
    n, r = args.clients, args.rank
    from wrag_vllm.serving.config import WragConfig
    from wrag_vllm.serving.resolver import Resolver
    cfg = WragConfig.from_sources({"wrag": wrag_cfg(args, Path("."))})   # WRAG_* as the server reads them
    rc = Resolver(cfg, store=None).served_rank([r] * 3, dict(cfg.method_params), cfg.method)  # budget applied
    if name == "wrag-k1":
        return n, r
    if name == "wrag-k3-linear":
        return 3 * n, r
    if name == "wrag-k3-svd":
        return n, rc                          # one composite of rank min(Σ r_i, the budget) per request
    if name == "wrag-shared":                 # expected distinct sets among n Zipf draws
        z = [1 / (i + 1) for i in range(SHARED_SETS)]
        p = [x / sum(z) for x in z]
        return max(1, round(sum(1 - (1 - q) ** n for q in p))), rc
    return 0, 0


def limit_ratio(name: str, args, env) -> float | None:
    """base bytes ÷ (base bytes + distinct factor bytes per step): the ratio to base a decode step
    reaches if it only streams its bytes."""
    import json as _json
    cfg = _json.loads((Path(env["model_dir"]) / "config.json").read_text())
    base = sum(f.stat().st_size for f in Path(env["model_dir"]).glob("*.safetensors"))
    n_slots, rank = slots_per_step(name, args, env)
    if not base or not name.startswith("wrag"):
        return None
    el = 2 if args.dtype in ("bfloat16", "float16") else 4
    H, F, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    factors = n_slots * L * rank * (2 * (H + F) + (F + H)) * el
    return base / (base + factors)


def report(args, env, results, servers, total_s):
    base = next((r for r in results if r["name"] == "base"), None)
    for r in results:
        r["ratio_to_base"] = r["output_tok_s"] / base["output_tok_s"] if base else None
        r["limit_ratio"] = limit_ratio(r["name"], args, env)
    by = {r["name"]: r for r in results}
    ratios = {}
    if "wrag-k3-linear" in by and "lora-cat3" in by:
        ratios["wrag_k3_linear_over_lora_cat3"] = by["wrag-k3-linear"]["output_tok_s"] / by["lora-cat3"]["output_tok_s"]
    if "wrag-k3-svd" in by and "lora-cat3" in by:
        ratios["wrag_k3_svd_over_lora_cat3"] = by["wrag-k3-svd"]["output_tok_s"] / by["lora-cat3"]["output_tok_s"]
    if "wrag-k1" in by and "lora-1" in by:
        ratios["wrag_k1_over_lora_1"] = by["wrag-k1"]["output_tok_s"] / by["lora-1"]["output_tok_s"]
    targets = {}
    if base and "wrag-k1" in by:
        targets["wrag_k1_vs_base >= 0.85"] = by["wrag-k1"]["ratio_to_base"]
    if base and "wrag-off" in by:
        targets["wrag_off_vs_base >= 0.98"] = by["wrag-off"]["ratio_to_base"]
    if base and "wrag-shared" in by:
        targets["wrag_shared_vs_base >= 0.90"] = by["wrag-shared"]["ratio_to_base"]
    if base and "wrag-k3-svd" in by:
        targets["wrag_k3_svd_vs_limit >= 0.90"] = by["wrag-k3-svd"]["ratio_to_base"] / by["wrag-k3-svd"]["limit_ratio"]
        targets["wrag_k3_svd_vs_base >= 0.85"] = by["wrag-k3-svd"]["ratio_to_base"]
    if base and "wrag-k3-linear" in by:
        targets["wrag_k3_linear_vs_base >= 0.85"] = by["wrag-k3-linear"]["ratio_to_base"]
    for k in ("wrag_k3_linear_over_lora_cat3", "wrag_k3_svd_over_lora_cat3"):
        if k in ratios:
            targets[k + " >= 2"] = ratios[k]
    distinct = len({i for t in env["texts"] for i in env["plans"][t]["k3"][0]})
    settings = {k: v for k, v in vars(args).items()}
    settings.update(model_kind=args.model, model=env["model_desc"], model_dir=str(env["model_dir"]), distinct_shards_k3=distinct,
                    query_texts=len(env["texts"]), wrag=wrag_cfg(args, Path("<tmp>")),
                    note_compile=("base and wrag servers: same flags, compiled (vLLM default) unless --eager; "
                                  "the LoRA servers run eager because the CPU build turns compilation off "
                                  "when LoRA is enabled"))
    data = {"machine": env.get("machine0") or sc.machine(), "machine_at_end": sc.machine(), "settings": settings, "servers": servers, "results": results,
            "ratios": ratios, "targets": targets, "total_s": total_s, "prep_s": env["prep_s"]}
    rows = [[r["name"], r["output_tok_s"], r["ratio_to_base"] if r["ratio_to_base"] is not None else "-",
             r["limit_ratio"] if r["limit_ratio"] is not None else "-",
             r["ttft_p50_ms"], r["ttft_p99_ms"], r["itl_p50_ms"], r["itl_p99_ms"], r["requests"],
             f"{r['loadavg_1m_before']:.1f}/{r['loadavg_1m_after']:.1f}"] for r in results]
    md = sc.md_table(["config", "out tok/s", "× base", "bytes limit", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
                      "ITL p99 ms", "requests", "load 1m before/after"], rows)
    md += "\n\n" + sc.md_table(["server", "startup s"], [[k, v["startup_s"]] for k, v in servers.items()])
    md += "\n\n" + sc.md_table(["ratio / target", "value"], [[k, v] for k, v in {**ratios, **targets}.items()])
    md += f"\n\nTotal wall time {total_s:.0f} s. Distinct shards used by k=3 plans: {distinct}.\n"
    paths = sc.write_results(args.out, data, md)
    plot(results, paths["png"], data)
    print(md)
    print(json.dumps(paths))


def plot(results, path, data):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in results]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.8))
    ax[0].bar(names, [r["output_tok_s"] for r in results], color="tab:blue")
    for i, r in enumerate(results):
        if r.get("ratio_to_base") is not None:
            ax[0].text(i, r["output_tok_s"], f"{r['ratio_to_base']:.2f}×", ha="center", va="bottom", fontsize=8)
    ax[0].set_ylabel("output tokens/s")
    ax[0].set_title("throughput (label: × base)")
    x = range(len(names))
    ax[1].bar([i - 0.2 for i in x], [r["ttft_p50_ms"] for r in results], 0.4, label="p50")
    ax[1].bar([i + 0.2 for i in x], [r["ttft_p99_ms"] for r in results], 0.4, label="p99")
    ax[1].set_ylabel("ms"); ax[1].set_title("TTFT"); ax[1].legend()
    ax[2].bar([i - 0.2 for i in x], [r["itl_p50_ms"] for r in results], 0.4, label="p50")
    ax[2].bar([i + 0.2 for i in x], [r["itl_p99_ms"] for r in results], 0.4, label="p99")
    ax[2].set_ylabel("ms"); ax[2].set_title("inter-token latency"); ax[2].legend()
    for a in ax:
        a.set_xticks(list(x)); a.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    s = data["settings"]
    fig.suptitle(f"{s['model']} | S={s['shards']} shards r={s['rank']} | N={s['clients']} clients | "
                 f"{s['max_tokens']} out tok | {data['machine']['cpu'][:40]} GPU={data['machine']['gpu']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
