"""CPU benchmark of the multi-shard FFN delta (wrag_kernels torch path) against alternatives.

Per FFN layer and step, for a batch of requests each carrying K shards (rank r):
    gate_up: y (T, 2F) += Σ_j w_j B_j (A_j x)      down: y (T, H) += Σ_j w_j B_j (A_j x')
Methods (all compute the same delta; times are for gate_up + down together):
  ours          apply_delta on the CPU's default backend (the native op; the torch path where it
                cannot be built)
  ours_torch    apply_delta on the torch backend (dense groups + slot buckets, torch ops)
  concat        the equivalent single concatenated adapter per request group, plain torch:
                A_cat = [A_1;…;A_K], B_cat = [w_1B_1 … w_KB_K] prebuilt, 2 GEMMs per group  (target)
  ours_k1       apply_delta fed that concatenated adapter as one rank-Kr slot per request
  inductor      the static-shape gather formulation compiled by torch.compile (Inductor, C++ codegen):
                per token, gather its K slots' full-rank factors and contract — what tracing the
                delta into vLLM's compiled graph would generate (decode layouts only: the gathered
                factors grow with tokens × K)
  naive         per-request, per-shard loop: y_q += w (x_q Aᵀ) Bᵀ
  vllm          vllm.lora.ops.torch_ops (sgmv/bgmv shrink + expand_slice) on the concatenated adapter
  merged        per-request dense merge W_q = W + Σ w B A, then x_q W_qᵀ (base included; compared
                with base + ours)
  base          the base FFN GEMMs alone (context: delta overhead relative to the layer)
Writes benchmarks/results/kernels_cpu.{json,md,png}. Timings: median of interleaved repetitions
(methods alternate, so load from other processes hits all of them alike).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import RESULTS
from benchmarks.machine import describe
from wrag_kernels import DeltaMeta, apply_delta

SHAPES = {  # name: (hidden, ffn, rank)
    "tiny": (64, 128, 8),
    "smollm2-135m": (576, 1536, 8),          # rank 8: the demo shards'
    "llama3.2-3b": (3072, 8192, 16),
}
# (layout, num_seqs, tokens per seq); llama-sized runs keep the pools small.
SCENARIOS = {
    "tiny": [("decode", 16, 1), ("decode", 64, 1), ("prefill", 4, 64)],
    "smollm2-135m": [("decode", 8, 1), ("decode", 16, 1), ("decode", 64, 1), ("prefill", 4, 64)],
    "llama3.2-3b": [("decode", 16, 1), ("prefill", 2, 64)],
}
KS = [1, 3, 8]
SHARINGS = ["shared", "distinct"]       # all requests use the same K shards / each its own K


class Case:
    """One benchmark problem: pools, metadata and the equivalent concatenated adapters."""

    def __init__(self, shape: str, layout: str, n_seqs: int, seq_len: int, K: int, sharing: str,
                 dtype=torch.float32, seed: int = 0):
        H, F, r = SHAPES[shape]
        g = torch.Generator().manual_seed(seed)
        self.n_seqs, self.seq_len, self.K, self.r = n_seqs, seq_len, K, r
        self.T = T = n_seqs * seq_len
        n_distinct = K if sharing == "shared" else n_seqs * K
        self.slots = (torch.arange(K).repeat(n_seqs, 1) if sharing == "shared"
                      else torch.arange(n_seqs * K).reshape(n_seqs, K))                 # (n_seqs, K)
        self.weights = (torch.rand(K, generator=g).repeat(n_seqs, 1) if sharing == "shared"
                        else torch.rand(n_seqs, K, generator=g))                          # (n_seqs, K)
        self.qsl = torch.arange(n_seqs + 1) * seq_len
        rnd = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(dtype)  # noqa: E731
        self.x = rnd(T, H)
        self.h_act = rnd(T, F)                      # stands in for act(gate)*up, the down input
        self.y_gu = torch.zeros(T, 2 * F, dtype=dtype)
        self.y_d = torch.zeros(T, H, dtype=dtype)
        # a_pool, b_pool; b_pool in the serving layout (d_out contiguous, see serving/pool.py)
        self.gu = (rnd(2, n_distinct, r, H), rnd(2, n_distinct, r, F).transpose(2, 3))
        self.dn = (rnd(1, n_distinct, r, F), rnd(1, n_distinct, r, H).transpose(2, 3))
        # Bytes a step must read: the base FFN weights, and the factors of each distinct slot once.
        el = torch.finfo(dtype).bits // 8
        self.base_bytes = 3 * H * F * el
        self.factor_bytes = n_distinct * r * (2 * (H + F) + (F + H)) * el
        self.ranks = torch.full((n_distinct,), r, dtype=torch.int32)
        self.meta = DeltaMeta(T, n_seqs, K, "cpu")
        self.meta.fill(self.qsl, self.slots, self.weights)
        self.meta_torch = DeltaMeta(T, n_seqs, K, "cpu", backend="torch")
        self.meta_torch.fill(self.qsl, self.slots, self.weights)
        # Concatenated single adapter per distinct request group (weights folded into B_cat).
        groups: dict[tuple, list[int]] = {}
        for q in range(n_seqs):
            groups.setdefault((tuple(self.slots[q].tolist()), tuple(self.weights[q].tolist())), []).append(q)
        self.groups = []
        for (sl, ws), qs in groups.items():
            sl_t, w_t = torch.tensor(sl), torch.tensor(ws, dtype=dtype)
            cat = lambda a, b: (a[:, sl_t].flatten(1, 2),                                # noqa: E731
                                (b[:, sl_t] * w_t[None, :, None, None]).permute(0, 2, 1, 3).flatten(2, 3))
            self.groups.append((qs, cat(*self.gu), cat(*self.dn)))
        # The same adapters as one rank-K·r slot per request, for apply_delta (ours_k1).
        n_g = len(self.groups)
        self.gu_cat = (torch.stack([c[1][0] for c in self.groups], 1), torch.stack([c[1][1] for c in self.groups], 1))
        self.dn_cat = (torch.stack([c[2][0] for c in self.groups], 1), torch.stack([c[2][1] for c in self.groups], 1))
        self.ranks_cat = torch.full((n_g,), K * r, dtype=torch.int32)
        seq_group = torch.zeros(n_seqs, dtype=torch.int64)
        for gi, (qs, _, _) in enumerate(self.groups):
            seq_group[qs] = gi
        self.seq_group = seq_group
        self.meta_cat = DeltaMeta(T, n_seqs, 1, "cpu")
        self.meta_cat.fill(self.qsl, seq_group[:, None], torch.ones(n_seqs, 1))
        self.W_gu = rnd(2 * F, H)
        self.W_d = rnd(H, F)

        if seq_len == 1:
            self.token_slots = self.meta.token_slots[:T]            # (T, K) int32, −1 = none
            self.token_weights = self.meta.token_weights[:T]        # (T, K) float32

    def inductor(self):
        self.y_gu.copy_(_inductor_delta(self.y_gu, self.x, *self.gu, self.token_slots, self.token_weights))
        self.y_d.copy_(_inductor_delta(self.y_d, self.h_act, *self.dn, self.token_slots, self.token_weights))

    def rows(self, q: int) -> slice:
        return slice(q * self.seq_len, (q + 1) * self.seq_len)

    # ---- methods ----
    def ours(self):
        apply_delta(self.y_gu, self.x, *self.gu, self.ranks, self.meta)
        apply_delta(self.y_d, self.h_act, *self.dn, self.ranks, self.meta)

    def ours_torch(self):
        apply_delta(self.y_gu, self.x, *self.gu, self.ranks, self.meta_torch)
        apply_delta(self.y_d, self.h_act, *self.dn, self.ranks, self.meta_torch)

    def ours_k1(self):
        apply_delta(self.y_gu, self.x, *self.gu_cat, self.ranks_cat, self.meta_cat)
        apply_delta(self.y_d, self.h_act, *self.dn_cat, self.ranks_cat, self.meta_cat)

    def concat(self):
        for qs, (a_gu, b_gu), (a_d, b_d) in self.groups:
            contiguous = qs == list(range(qs[0], qs[-1] + 1))
            rows = (slice(qs[0] * self.seq_len, (qs[-1] + 1) * self.seq_len) if contiguous
                    else torch.cat([torch.arange(self.rows(q).start, self.rows(q).stop) for q in qs]))
            for y, x, a, b in ((self.y_gu, self.x, a_gu, b_gu), (self.y_d, self.h_act, a_d, b_d)):
                d = b.shape[1]
                for i in range(a.shape[0]):
                    if contiguous:
                        y[rows, i * d:(i + 1) * d].addmm_(x[rows] @ a[i].t(), b[i].t())
                    else:
                        y[:, i * d:(i + 1) * d].index_add_(0, rows, (x[rows] @ a[i].t()) @ b[i].t())

    def naive(self):
        for q in range(self.n_seqs):
            rows = self.rows(q)
            for s, w in zip(self.slots[q].tolist(), self.weights[q].tolist()):
                for y, x, (a, b) in ((self.y_gu, self.x, self.gu), (self.y_d, self.h_act, self.dn)):
                    d = b.shape[2]
                    for i in range(a.shape[0]):
                        y[rows, i * d:(i + 1) * d] += w * ((x[rows] @ a[i, s].t()) @ b[i, s].t())

    def vllm(self):
        from vllm.lora.ops.torch_ops import bgmv_expand_slice, bgmv_shrink, sgmv_expand_slice, sgmv_shrink
        idx = self.seq_group
        for y, x, (a, b) in ((self.y_gu, self.x, self.gu_cat), (self.y_d, self.h_act, self.dn_cat)):
            d = b.shape[2]
            for i in range(a.shape[0]):
                buf = torch.zeros(self.T, a.shape[2], dtype=x.dtype)
                if self.seq_len == 1:
                    bgmv_shrink(x, a[i], buf, idx, 1.0)
                    bgmv_expand_slice(buf, b[i], y, idx, i * d, d, True)
                else:
                    lens = torch.full((self.n_seqs,), self.seq_len)
                    sgmv_shrink(x, a[i], buf, self.qsl[:-1], lens, idx, self.n_seqs, self.seq_len, self.T, 1.0)
                    sgmv_expand_slice(buf, b[i], y, self.qsl[:-1], lens, idx, self.n_seqs, self.seq_len,
                                      self.T, i * d, d, True)

    def base(self):
        gu = self.x @ self.W_gu.t()
        F = gu.shape[1] // 2
        return (torch.nn.functional.silu(gu[:, :F]) * gu[:, F:]) @ self.W_d.t()

    def base_plus_ours(self):
        gu = self.x @ self.W_gu.t()
        apply_delta(gu, self.x, *self.gu, self.ranks, self.meta)
        F = gu.shape[1] // 2
        act = torch.nn.functional.silu(gu[:, :F]) * gu[:, F:]
        out = act @ self.W_d.t()
        apply_delta(out, act, *self.dn, self.ranks, self.meta)
        return out

    def merged(self):
        F = self.W_gu.shape[0] // 2
        out = torch.empty(self.T, self.W_d.shape[0], dtype=self.x.dtype)
        for q in range(self.n_seqs):
            rows = self.rows(q)
            W_gu, W_d = self.W_gu.clone(), self.W_d.clone()
            for s, w in zip(self.slots[q].tolist(), self.weights[q].tolist()):
                for i in range(2):
                    W_gu[i * F:(i + 1) * F].addmm_(self.gu[1][i, s], self.gu[0][i, s], alpha=w)
                W_d.addmm_(self.dn[1][0, s], self.dn[0][0, s], alpha=w)
            gu = self.x[rows] @ W_gu.t()
            out[rows] = (torch.nn.functional.silu(gu[:, :F]) * gu[:, F:]) @ W_d.t()
        return out


def _gather_delta(y, x, a_pool, b_pool, token_slots, token_weights):
    """y + Σ_j w_j B[s_j] (A[s_j] x) per token, as gathers and contractions with static shapes
    (full pool rank R: a traced graph cannot slice to each slot's rank). y (T, ns·d_out),
    x (T, d_in), a_pool (ns, S, R, d_in), b_pool (ns, S, d_out, R), token_slots/weights (T, K)."""
    s = token_slots.clamp_min(0).long()                                  # (T, K)
    w = torch.where(token_slots >= 0, token_weights, 0.0)                # (T, K)
    h = torch.einsum("ntkrd,td->ntkr", a_pool[:, s].float(), x.float()) * w[None, :, :, None]
    out = torch.einsum("ntkor,ntkr->tno", b_pool[:, s].float(), h)      # (T, ns, d_out) fp32
    return (y.float() + out.reshape(y.shape)).to(y.dtype)


_inductor_delta = torch.compile(_gather_delta, dynamic=False, fullgraph=True)
torch._dynamo.config.recompile_limit = 1024   # one specialisation per benchmark shape
torch._dynamo.config.accumulated_recompile_limit = 1024


def time_methods(fns: dict, reps: int, budget_s: float) -> dict:
    times = {k: [] for k in fns}
    for f in fns.values():
        f()                                            # warm-up
    t_end = time.perf_counter() + budget_s
    for i in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() > t_end:
            break
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def check_case(c: Case, method: str = "ours") -> float:
    """Relative error of `method` vs the concatenated computation (sanity, both from zero)."""
    c.y_gu.zero_(); c.y_d.zero_(); getattr(c, method)()
    ours = torch.cat([c.y_gu, c.y_d], 1).clone()
    c.y_gu.zero_(); c.y_d.zero_(); c.concat()
    ref = torch.cat([c.y_gu, c.y_d], 1)
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def run(shapes, ks, sharings, reps: int, budget_s: float, merged_limit: float, dtype=torch.float32,
        log=print) -> list[dict]:
    try:
        import vllm.lora.ops.torch_ops  # noqa: F401
        have_vllm = True
    except Exception:  # noqa: BLE001
        have_vllm = False
    rows = []
    for shape in shapes:
        for layout, n_seqs, seq_len in SCENARIOS[shape]:
            for K in ks:
                for sharing in sharings:
                    c = Case(shape, layout, n_seqs, seq_len, K, sharing, dtype=dtype)
                    err = check_case(c)
                    fns = {"ours": c.ours, "ours_torch": c.ours_torch, "concat": c.concat, "ours_k1": c.ours_k1,
                           "naive": c.naive}
                    if have_vllm:
                        fns["vllm"] = c.vllm
                    errs = {}
                    if c.seq_len == 1:
                        fns["inductor"] = c.inductor
                        errs["inductor"] = check_case(c, "inductor")
                    t = time_methods(fns, reps, budget_s)
                    H, F, _ = SHAPES[shape]
                    if n_seqs * (3 * H * F) * K <= merged_limit:
                        t.update(time_methods({"base": c.base, "base_plus_ours": c.base_plus_ours,
                                               "merged": c.merged}, max(3, reps // 2), budget_s))
                    else:
                        t.update(time_methods({"base": c.base, "base_plus_ours": c.base_plus_ours},
                                              max(3, reps // 2), budget_s))
                    row = dict(shape=shape, layout=layout, n_seqs=n_seqs, seq_len=seq_len, tokens=c.T, K=K,
                               sharing=sharing, distinct_shards=c.ranks.numel(), rank=c.r, rel_err=err,
                               rel_err_other=errs,
                               ms=t, ratio_ours_vs_concat=t["ours"] / t["concat"],
                               ratio_ours_vs_ours_k1=t["ours"] / t["ours_k1"],
                               backend=c.meta.backend, delta_vs_base=t["ours"] / t["base"],
                               limit_delta_vs_base=c.factor_bytes / c.base_bytes)
                    rows.append(row)
                    log(f"{shape:13s} {layout:7s} seqs={n_seqs:3d} T={c.T:4d} K={K} {sharing:8s} "
                        + " ".join(f"{k}={v:.3f}" for k, v in t.items())
                        + f"  ours/concat={row['ratio_ours_vs_concat']:.2f}"
                        + f"  ours/base={row['delta_vs_base']:.2f} (bytes limit {row['limit_delta_vs_base']:.3f})")
    return rows


def write_markdown(rows, info, path: Path) -> None:
    methods = ["ours", "ours_torch", "inductor", "concat", "ours_k1", "naive", "vllm", "base", "base_plus_ours",
               "merged"]
    lines = [f"# wrag_kernels CPU benchmark (delta for gate_up + down, one layer, {info['dtype']}, ms)", "",
             "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), "",
             f"`ours` runs the CPU's default backend ({rows[0]['backend'] if rows else '?'}). `ours/base`: the "
             "delta's time over the base FFN GEMMs' (gate_up + down); `bytes limit`: the same ratio if both "
             "only streamed their bytes (distinct slots' factors once ÷ the base FFN weights).", "",
             "| shape | layout | seqs×len | K | shards | " + " | ".join(methods)
             + " | ours/concat | inductor/ours | naive/ours | vllm/ours | merged/(base+ours) | ours/base | bytes limit |",
             "|" + "---|" * (len(methods) + 12)]
    for r in rows:
        ms = r["ms"]
        cell = lambda k: f"{ms[k]:.3f}" if k in ms else "—"  # noqa: E731
        ratio = lambda a, b: f"{ms[a] / ms[b]:.2f}" if a in ms and b in ms else "—"  # noqa: E731
        lines.append(f"| {r['shape']} | {r['layout']} | {r['n_seqs']}×{r['seq_len']} | {r['K']} | "
                     f"{r['distinct_shards']} ({r['sharing']}) | " + " | ".join(cell(m) for m in methods)
                     + f" | **{r['ratio_ours_vs_concat']:.2f}** | {ratio('inductor', 'ours')} | {ratio('naive', 'ours')} | "
                     f"{ratio('vllm', 'ours')} | {ratio('merged', 'base_plus_ours')} | "
                     f"**{r['delta_vs_base']:.2f}** | {r['limit_delta_vs_base']:.3f} |")
    k3 = [r["ratio_ours_vs_concat"] for r in rows if r["K"] == 3]
    if k3:
        lines += ["", f"K=3 ours/concat: median {statistics.median(k3):.2f}, "
                      f"min {min(k3):.2f}, max {max(k3):.2f} over {len(k3)} cases."]
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rs = [r for r in rows if r["shape"] == shape]
        labels = [f"{r['layout'][0]}{r['n_seqs']}x{r['seq_len']}\nK{r['K']} {r['sharing'][0]}" for r in rs]
        xs = range(len(rs))
        for m, style in (("concat", "k-"), ("ours_k1", "c:"), ("naive", "r--"), ("vllm", "g-."),
                         ("merged", "m:")):
            ys = [(r["ms"][m] / r["ms"]["base_plus_ours" if m == "merged" else "ours"]) if m in r["ms"]
                  else float("nan") for r in rs]
            ax.plot(xs, ys, style, marker="o", ms=3, label=f"{m} / ours" if m != "merged" else "merged / (base+ours)")
        ax.axhline(1.0, color="b", lw=1)
        ax.axhline(1 / 1.2, color="b", lw=0.8, ls="--", label="ours = 1.2 × concat")
        ax.set_yscale("log")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=6, rotation=90)
        ax.set_title(f"{shape} (H={SHAPES[shape][0]}, F={SHAPES[shape][1]}, r={SHAPES[shape][2]})")
        ax.set_ylabel("time relative to ours (>1: ours faster)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("wrag_kernels CPU torch path: FFN delta (gate_up+down) time ratios; d=decode p=prefill, "
                 "s=shared shards d=distinct")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--ks", nargs="+", type=int, default=KS)
    ap.add_argument("--sharing", nargs="+", default=SHARINGS, choices=SHARINGS)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--budget-s", type=float, default=0.8, help="time budget per timing group")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: stable numbers on a shared host; OpenMP spin-waits "
                         "collapse when cores are oversubscribed)")
    ap.add_argument("--merged-limit", type=float, default=4e8,
                    help="skip the dense-merge baseline above seqs*K*3*H*F elements")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                    help="bfloat16: what the demo serves")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="kernels_cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = describe("cpu", args.threads)
    info["dtype"] = args.dtype
    t0 = time.time()
    rows = run(args.shapes, args.ks, args.sharing, args.reps, args.budget_s, args.merged_limit,
               getattr(torch, args.dtype))
    info["bench_seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    write_markdown(rows, info, out / f"{args.name}.md")
    write_plot(rows, out / f"{args.name}.png")
    print(f"wrote {out / args.name}.{{json,md,png}} in {info['bench_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
