"""`wrag serve MODEL [vLLM args...]`: a thin wrapper over `vllm serve`.

It only (1) allow-lists the WRAG endpoint plugin (VLLM_PLUGINS gains "wrag"), (2) passes the store
path (--store / $WRAG_STORE) and the --wrag-* options as WRAG_* environment variables, then execs
`vllm serve MODEL ...` with the remaining arguments untouched. The plain equivalent is

    VLLM_PLUGINS=wrag vllm serve MODEL --additional-config '{"wrag": {"store": "...", "top_k": 3}}'
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

_OPTS = (("top_k", int, "WRAG_TOP_K"), ("threshold", float, "WRAG_THRESHOLD"),
         ("temperature", float, "WRAG_TEMPERATURE"), ("method", str, "WRAG_METHOD"),
         ("slots", int, "WRAG_SLOTS"), ("max_rank", int, "WRAG_MAX_RANK"))


def build_command(args) -> tuple[list[str], dict]:
    env = dict(os.environ)
    plugins = [p for p in (env.get("VLLM_PLUGINS") or "").split(",") if p]
    if "wrag" not in plugins:
        plugins.append("wrag")
    env["VLLM_PLUGINS"] = ",".join(plugins)
    if getattr(args, "store", None):
        env["WRAG_STORE"] = str(args.store)
    for name, _, var in _OPTS:
        v = getattr(args, f"wrag_{name}", None)
        if v is not None:
            env[var] = str(v)
    if getattr(args, "wrag_off", False):
        env["WRAG_ENABLED"] = "0"
    vllm = shutil.which("vllm") or os.path.join(os.path.dirname(sys.executable), "vllm")
    return [vllm, "serve", args.model, *args.vllm_args], env


def run_serve(args) -> int:
    cmd, env = build_command(args)
    print("+ " + " ".join(cmd), file=sys.stderr)
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


def register_cli(sub) -> None:
    p = sub.add_parser("serve", help="run `vllm serve MODEL` with WRAG enabled (other args go to vLLM)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="base model (HF folder or name) — the one the store's shards were made for")
    for name, typ, var in _OPTS:
        p.add_argument(f"--wrag-{name.replace('_', '-')}", dest=f"wrag_{name}", type=typ, default=None,
                       help=f"sets {var}")
    p.add_argument("--wrag-off", action="store_true", help="serve the base model only (WRAG_ENABLED=0)")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="passed to `vllm serve` unchanged")
    p.set_defaults(func=run_serve)
