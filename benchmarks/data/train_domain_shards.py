"""Train the four committed domain shards (rank 8, FFN-only) on SmolLM2-135M-Instruct, on CPU.

    python -m benchmarks.data.train_domain_shards            # all four, the committed settings
    python -m benchmarks.data.train_domain_shards --domains law --steps 20 --out-dir /tmp/x   # a quick try

Writes wrag_vllm/data/shards/<domain>.safetensors (bf16 factors, ~3 MB each) and
benchmarks/results/train_domain_shards.{json,md} (time per shard, loss at start and end, machine).
Interrupted runs continue from their checkpoints in $WRAG_CACHE/train/ when rerun.
The shards are a pure function of (base model, corpus, settings, seed) up to CPU float
non-determinism across machines and thread counts.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks import REPO, RESULTS
from benchmarks.machine import describe
from wrag_vllm.basemodel import ensure_base_model
from wrag_vllm.domains import DOMAINS, build_domain
from wrag_vllm.train import TrainConfig, train_shard

SETTINGS = dict(rank=8, steps=80, lr=2e-3, batch_size=4, seq_len=256, seed=0, dtype="bfloat16",
                factor_dtype="bfloat16")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--domains", nargs="*", default=list(DOMAINS))
    ap.add_argument("--steps", type=int, default=SETTINGS["steps"])
    ap.add_argument("--out-dir", type=Path, default=REPO / "wrag_vllm" / "data" / "shards")
    ap.add_argument("--results", type=Path, default=RESULTS)
    # 1 thread: on a shared 2-core host, 2 OpenMP threads stall at barriers whenever another
    # process holds a core (measured 20-40 s/step vs 3.5 s/step with 1 thread under load).
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    base = ensure_base_model()
    settings = {**SETTINGS, "steps": a.steps}
    rows = []
    for name in a.domains:
        d = build_domain(name)
        t0 = time.time()
        shard = train_shard(base, d.train_texts, TrainConfig(**settings, threads=a.threads),
                            out_path=a.out_dir / f"{name}.safetensors", shard_id=name,
                            description=d.description, samples=d.samples)
        p = shard.provenance
        rows.append({"domain": name, "wall_seconds": round(time.time() - t0, 1),
                     "train_seconds": p["train_seconds"], "steps": p["steps"], "tokens_seen": p["tokens_seen"],
                     "train_texts": len(d.train_texts), "blocks": p["n_blocks"], "loss_first10": p["loss_first10"],
                     "loss_last10": p["loss_last10"], "bytes": shard.nbytes(),
                     "file_bytes": (a.out_dir / f"{name}.safetensors").stat().st_size})
        print(json.dumps(rows[-1]), flush=True)
    out = {"settings": {**settings, "threads": a.threads}, "machine": describe(), "shards": rows,
           "total_wall_seconds": round(sum(r["wall_seconds"] for r in rows), 1),
           "command": "python -m benchmarks.data.train_domain_shards " + " ".join(argv or sys.argv[1:])}
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / "train_domain_shards.json").write_text(json.dumps(out, indent=2))
    md = ["| domain | steps | tokens | train s | wall s | loss start | loss end | file MB |", "|---" * 8 + "|"]
    md += [f"| {r['domain']} | {r['steps']} | {r['tokens_seen']} | {r['train_seconds']} | {r['wall_seconds']} | "
           f"{r['loss_first10']} | {r['loss_last10']} | {r['file_bytes'] / 1e6:.2f} |" for r in rows]
    m = out["machine"]
    md.append(f"\nTotal {out['total_wall_seconds']} s on {m['cpu']} ({m['cores']} cores, torch {m['torch']}); "
              f"settings {json.dumps(settings)}")
    (a.results / "train_domain_shards.md").write_text("\n".join(md) + "\n")
    plot(out, a.results / "train_domain_shards.png")
    print("\n".join(md))
    return 0


def plot(out: dict, path: Path) -> None:
    """Wall time per shard and the training loss at start and end."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["shards"]
    names = [r["domain"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    a1.bar(names, [r["wall_seconds"] / 60 for r in rows], color="tab:blue")
    a1.set_ylabel("minutes")
    a1.set_title(f"training time per shard (total {out['total_wall_seconds'] / 60:.1f} min)")
    x = range(len(rows))
    a2.bar([i - 0.2 for i in x], [r["loss_first10"] for r in rows], 0.4, label="first 10 steps")
    a2.bar([i + 0.2 for i in x], [r["loss_last10"] for r in rows], 0.4, label="last 10 steps")
    a2.set_xticks(list(x), names)
    a2.set_ylabel("train loss")
    a2.legend()
    fig.suptitle(f"{out['machine']['cpu']}, {out['machine']['cores']} cores; rank 8, "
                 f"{out['settings']['steps']} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
