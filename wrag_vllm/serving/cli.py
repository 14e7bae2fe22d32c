"""`wrag serve MODEL [vLLM args...]`: a thin wrapper over `vllm serve`.

It only (1) allow-lists the WRAG endpoint plugin (VLLM_PLUGINS gains "wrag"), (2) passes the store
path (--store / $WRAG_STORE) and the --wrag-* options as WRAG_* environment variables, then execs
`vllm serve MODEL ...` with the remaining arguments untouched. The WRAG options may come before or
after MODEL (`wrag serve MODEL --wrag-top-k 2 --port 8000`). The plain equivalent is

    VLLM_PLUGINS=wrag vllm serve MODEL --additional-config '{"wrag": {"store": "...", "top_k": 3}}'
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from ..errors import WragError

_OPTS = (("top_k", int, "WRAG_TOP_K"), ("threshold", float, "WRAG_THRESHOLD"),
         ("temperature", float, "WRAG_TEMPERATURE"), ("method", str, "WRAG_METHOD"),
         ("slots", int, "WRAG_SLOTS"), ("max_rank", int, "WRAG_MAX_RANK"))
# option -> (dest, type); type None: a flag without a value
_WRAG_OPTIONS = {"--store": ("store", str), "--wrag-off": ("wrag_off", None),
                 **{f"--wrag-{name.replace('_', '-')}": (f"wrag_{name}", typ) for name, typ, _ in _OPTS}}


def split_wrag_args(tokens: list[str]) -> tuple[dict, list[str]]:
    """The WRAG options among the arguments after MODEL (argparse.REMAINDER stops parsing at
    MODEL) as {dest: value}, and every other token, unchanged and in order, for vLLM (which has
    no --store or --wrag-* options). Accepts `--opt VALUE` and `--opt=VALUE`; WragError for a
    missing or malformed value."""
    found, rest = {}, []
    it = iter(tokens)
    for tok in it:
        opt, eq, value = tok.partition("=")
        if opt not in _WRAG_OPTIONS:
            rest.append(tok)
            continue
        dest, typ = _WRAG_OPTIONS[opt]
        if typ is None:
            if eq:
                raise WragError(f"{opt} takes no value")
            found[dest] = True
            continue
        if not eq:
            value = next(it, None)
            if value is None:
                raise WragError(f"{opt} needs a value")
        try:
            found[dest] = typ(value)
        except ValueError:
            raise WragError(f"{opt}: invalid {typ.__name__} value {value!r}") from None
    return found, rest


def build_command(args) -> tuple[list[str], dict]:
    """(`vllm serve MODEL ...` argv, environment) for `args` of `wrag serve`."""
    from ..store import store_location

    found, vllm_args = split_wrag_args(args.vllm_args)
    opts = {dest: found.get(dest, getattr(args, dest, None)) for dest, _ in _WRAG_OPTIONS.values()}
    env = dict(os.environ)
    plugins = [p for p in (env.get("VLLM_PLUGINS") or "").split(",") if p]
    if "wrag" not in plugins:
        plugins.append("wrag")
    env["VLLM_PLUGINS"] = ",".join(plugins)
    if opts["store"]:
        store_location(opts["store"])  # StoreError for a URL we do not serve, before vLLM spends a minute starting
        env["WRAG_STORE"] = str(opts["store"])
    for name, _, var in _OPTS:
        v = opts[f"wrag_{name}"]
        if v is not None:
            env[var] = str(v)
    if opts["wrag_off"]:
        env["WRAG_ENABLED"] = "0"
    vllm = shutil.which("vllm") or os.path.join(os.path.dirname(sys.executable), "vllm")
    return [vllm, "serve", args.model, *vllm_args], env


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
    p.add_argument("vllm_args", nargs=argparse.REMAINDER,
                   help="passed to `vllm serve` unchanged (except --store and --wrag-* options)")
    p.set_defaults(func=run_serve)
