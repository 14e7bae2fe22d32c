"""`wrag merge`: write a fixed composition as a PEFT LoRA adapter directory.

    wrag merge ID... --weights W... [--method NAME] --out DIR [--rank N] [--energy F] [--param k=v]...

Any LoRA-capable server (vLLM --lora-modules, LoRAX, PEFT) can then serve the composite as one
ordinary adapter. Register in wrag_vllm/cli.py via PLUGGED_COMMANDS ("wrag_vllm.compose.cli").
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ComposeError
from ..shard import Shard
from .composite import compose
from .registry import DEFAULT_METHOD, METHODS

PROVENANCE_FILE = "wrag_composition.json"


def merge_to_peft(shards: list[Shard], weights: list[float], method: str, out_dir, **params) -> Shard:
    """compose() then export_peft(composite, out_dir); also writes out_dir/wrag_composition.json.

    Returns the composite Shard. ComposeError for bad input or a non-empty out_dir.
    """
    from ..peft_io import export_peft

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ComposeError(f"{out_dir}: output path exists and is not an empty directory")
    composite = compose(shards, weights, method, **params)
    export_peft(composite, out_dir)
    (out_dir / PROVENANCE_FILE).write_text(json.dumps(composite.meta(), indent=2, default=str))
    return composite


def parse_param(text: str) -> tuple[str, object]:
    """'k=v' → (k, v) with v read as JSON when it parses (1.5, 8, true, null), else a string."""
    if "=" not in text:
        raise ComposeError(f"--param {text!r}: expected NAME=VALUE, e.g. --param lam=1.5")
    k, v = text.split("=", 1)
    k = k.strip().replace("-", "_")
    try:
        val = json.loads(v)
    except RecursionError:
        raise ComposeError(f"--param {k}: JSON value nested too deeply") from None
    except ValueError:  # not JSON (or an integer beyond the digit limit): the text itself
        val = v
    return k, val


def parse_weights(items: list[str]) -> list[float]:
    """'0.5 0.3' or '0.5,0.3' (or a mix) → floats."""
    out = []
    for it in items:
        for p in str(it).split(","):
            if p.strip():
                try:
                    out.append(float(p))
                except ValueError:
                    raise ComposeError(f"--weights: {p!r} is not a number") from None
    return out


def run_merge(args) -> int:
    from ..store import ShardStore

    store = ShardStore(args.store, create=False)
    try:
        shards = [store.load(i) for i in args.ids]
    finally:
        store.close()
    params = dict(parse_param(p) for p in (args.param or []))
    if args.rank is not None:
        params["max_rank"] = args.rank
    if args.energy is not None:
        params["energy"] = args.energy
    params.setdefault("progress", not args.json)
    composite = merge_to_peft(shards, parse_weights(args.weights), args.method, args.out, **params)
    info = {"id": composite.id, "out": str(Path(args.out).resolve()), "method": args.method,
            "params": composite.provenance["composed"]["params"],
            "inputs": composite.provenance["composed"]["inputs"],
            "rank": composite.rank, "projections": len(composite.factors)}
    if args.json:
        print(json.dumps(info, default=str))
    else:
        ins = ", ".join(f"{d['id']}×{d['weight']:g}" for d in info["inputs"])
        print(f"wrote {info['out']}: {composite.id} = {args.method}({ins}), rank ≤ {composite.rank}, "
              f"{info['projections']} projections (PEFT LoRA; serve with e.g. vllm --lora-modules)")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("merge", help="compose shards into one PEFT LoRA adapter directory",
                       description="Compose stored shards with weights into a fixed composite and write it "
                                   "as a PEFT LoRA adapter directory that vLLM, LoRAX or PEFT can serve.")
    p.add_argument("ids", nargs="+", metavar="ID", help="shard ids in the store")
    p.add_argument("--weights", nargs="+", required=True, metavar="W",
                   help="one weight ≥ 0 per shard (space- or comma-separated)")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS),
                   help="composition method (default: svd-centered)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--rank", type=int, help="cap the composite rank per projection (max_rank)")
    p.add_argument("--energy", type=float, help="keep this fraction (0-1] of each composite ΔW's energy")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="method parameter, repeatable, e.g. --param lam=1.5 --param rho=8")
    p.set_defaults(func=run_merge)
