"""`wrag`: the command line over a shard store.

    wrag add PATH [--id ID] [--description TEXT] [--samples FILE] [--queries FILE] [--base DIR] [--overwrite]
                                                                      shard file or PEFT directory
    wrag extract --base DIR --finetuned DIR --id ID (--rank R | --energy E)
    wrag ls | show ID | rm ID | export ID --out DIR
    wrag search TEXT|- [-k N] [--threshold P] [--top-k N]       what the server would retrieve and apply
    wrag merge / train / serve / demo                                 (registered by their modules)

Every command takes --store PATH (default $WRAG_STORE, else ~/.local/share/wrag/store) and --json.
User errors print `error: ...` and exit 2; the store is left as it was.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from . import jsonio
from .errors import StoreError, WragError
from .store import default_store_path

# Modules that add their own subcommands through register_cli(sub).
PLUGGED_COMMANDS = ("wrag_vllm.compose.cli", "wrag_vllm.train", "wrag_vllm.serving.cli", "wrag_vllm.demo")


def _open(args):
    from .store import ShardStore

    return ShardStore(args.store)


def _print(args, obj, text: str) -> None:
    print(json.dumps(obj, indent=2, default=str) if args.json else text)


def _read_texts(path: str | None, what: str, by_line: bool) -> list[str]:
    """Texts from a .jsonl file (one object with a string "text" per line) or a text file (one per
    line when `by_line`, else paragraphs split by blank lines); WragError naming the file (and
    line) otherwise. `what` names the file in messages ("samples", "queries")."""
    if not path:
        return []
    p = Path(path)
    if not p.is_file():
        raise WragError(f"{what} file not found: {path}")
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise WragError(f"{what} file {path}: cannot read it as UTF-8 text ({e})") from None
    if p.suffix == ".jsonl":
        out = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            obj = jsonio.loads(line, f"{path}:{n}")
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise WragError(f"{path}:{n}: each line must be a JSON object with a string field \"text\"")
            out.append(obj["text"])
        return out
    chunks = [c.strip() for c in (raw.splitlines() if by_line else raw.split("\n\n"))]
    return [c for c in chunks if c]


def _read_samples(path: str | None) -> list[str]:
    """Sample texts: paragraphs of a text file, or a .jsonl file's "text" fields."""
    return _read_texts(path, "samples", by_line=False)


def read_queries(path: str | None) -> list[str]:
    """Queries: one per line of a text file, or a .jsonl file's "text" fields."""
    return _read_texts(path, "queries", by_line=True)


def _base_for_add(store, base_dir: str | None):
    """The base a new shard is checked against: the store's, with the facts (name, weight_rms)
    of --base DIR filled in; StoreError if DIR is another model than the store's base."""
    from .fingerprint import fingerprint_dir

    if not base_dir:
        return store.base
    try:
        given = fingerprint_dir(base_dir)
    except (OSError, ValueError) as e:
        raise WragError(f"--base {base_dir}: not a readable model folder ({e})") from None
    if store.base is None:
        return given
    if (why := store.base.mismatch(given)) is not None:
        raise StoreError(f"--base {base_dir} is not the base model of store {store.root}: {why}")
    return store.base.merged(given)


# ------------------------------------------------------------------ commands
def cmd_add(args) -> int:
    from .peft_io import shard_from_path

    store = _open(args)
    shard = shard_from_path(args.path, _base_for_add(store, args.base), shard_id=args.id,
                            description=args.description, samples=_read_samples(args.samples),
                            queries=read_queries(args.queries), allow_attention=args.allow_attention)
    row = store.add(shard, allow_attention=args.allow_attention, overwrite=args.overwrite)
    _print(args, row, f"added {row['id']} (rank {shard.rank}, {len(shard.factors)} projections, "
                      f"{shard.nbytes() / 1e6:.2f} MB)")
    return 0


def cmd_extract(args) -> int:
    from .extract import extract

    shard, report = extract(args.base, args.finetuned, args.id, rank=args.rank, energy=args.energy,
                            max_rank=args.max_rank, description=args.description or "",
                            samples=_read_samples(args.samples))
    if args.out:
        shard.save(args.out)
        where = f"wrote {args.out}"
    else:
        _open(args).add(shard)
        where = f"added {shard.id} to {args.store}"
    rows = [r.__dict__ for r in report]
    text = "\n".join(f"layer {r.layer:3d} {r.module:9s} rank {r.rank:3d} energy kept {r.energy_kept:.3f}"
                     for r in report)
    _print(args, {"id": shard.id, "layers": rows}, f"{text}\n{where}")
    return 0


def cmd_ls(args) -> int:
    rows = _open(args).list()
    text = "\n".join(f"{r['id']:24s} r={r.get('rank', '?'):<3} {str(r.get('description', ''))[:70]}"
                     for r in rows) or "(store is empty)"
    _print(args, rows, text)
    return 0


def cmd_show(args) -> int:
    meta = _open(args).get_meta(args.id)
    _print(args, meta, "\n".join(f"{k}: {v}" for k, v in meta.items()))
    return 0


def cmd_rm(args) -> int:
    _open(args).remove(args.id)
    _print(args, {"removed": args.id}, f"removed {args.id}")
    return 0


def cmd_search(args) -> int:
    """For each text, the k best shards with their relevance p and whether (and at what weight) a
    server of this environment's settings (WRAG_*; --threshold / --top-k override) applies them."""
    import dataclasses

    from .serving.config import WragConfig
    from .serving.controls import RequestControls
    from .serving.resolver import Resolver, query_tail

    if args.k < 1:
        raise WragError("-k must be at least 1")
    texts = [t for t in sys.stdin.read().splitlines() if t.strip()] if args.text == "-" else [args.text]
    store = _open(args)
    cfg = WragConfig.from_sources(environ={**os.environ, "WRAG_STORE": str(store.location)})
    over = {k: v for k, v in (("threshold", args.threshold), ("top_k", args.top_k)) if v is not None}
    cfg = dataclasses.replace(cfg, **over, max_top_k=max(cfg.max_top_k, over.get("top_k", 0))).validate()
    resolver = Resolver(cfg, store)
    vecs = store.embedder.embed([query_tail(t, cfg.query_max_tokens) for t in texts]) if texts else []
    out, lines = [], []
    for text, vec in zip(texts, vecs):
        plan = resolver.resolve(text, RequestControls(), vec=vec)
        weight = dict(zip(plan.ids, plan.weights))
        rows = [{"id": i, "score": round(p, 4), "applied": i in weight,
                 "weight": round(weight[i], 4) if i in weight else None}
                for i, p in store.search_vector(vec, k=args.k)]
        out.append(rows)
        if len(texts) > 1:
            lines.append(f"# {text}")
        lines += [f"{r['score']:7.4f}  {r['id']:24s}" + (f" applied, weight {r['weight']:.3f}" if r["applied"] else "")
                  for r in rows] or ["(no shards)"]
    if args.json and args.text == "-":
        print("\n".join(json.dumps(rows) for rows in out))  # one list per text, a line each
    else:
        _print(args, out[0] if out else [], "\n".join(lines))
    return 0


def cmd_export(args) -> int:
    from .peft_io import export_peft

    store = _open(args)
    base_name = store.base.name_or_path if store.base else None  # lets a re-import verify the base
    out = export_peft(store.load(args.id), args.out, base_model_name_or_path=base_name)
    _print(args, {"id": args.id, "out": str(out)}, f"exported {args.id} as a PEFT adapter to {out}")
    return 0


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    def common_options(defaults: bool) -> argparse.ArgumentParser:
        # Subcommands repeat the options with SUPPRESS defaults, so `wrag --store X ls` and
        # `wrag ls --store X` both work (a subparser default would otherwise overwrite X).
        p = argparse.ArgumentParser(add_help=False)
        p.add_argument("--store", default=None if defaults else argparse.SUPPRESS,
                       help="store folder (default: $WRAG_STORE or ~/.local/share/wrag/store)")
        p.add_argument("--json", action="store_true", default=False if defaults else argparse.SUPPRESS,
                       help="machine-readable output")
        return p

    common = common_options(defaults=False)
    parser = argparse.ArgumentParser(prog="wrag", description="Weight-Retrieval-Augmented Generation: "
                                     "a store of low-rank FFN shards, composed per request, served by vLLM.",
                                     parents=[common_options(defaults=True)])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, help):
        p = sub.add_parser(name, help=help, parents=[common])
        p.set_defaults(func=func)
        return p

    p = add("add", cmd_add, "register a shard file or a PEFT LoRA adapter directory")
    p.add_argument("path")
    p.add_argument("--id")
    p.add_argument("--description")
    p.add_argument("--samples", help="texts of the shard's domain: text file (paragraphs separated by blank "
                   "lines) or .jsonl with 'text'")
    p.add_argument("--queries", help="requests the shard should serve, as users ask them: text file (one per "
                   "line) or .jsonl with 'text'; retrieval learns the domain's questions from them")
    p.add_argument("--base", help="base model folder (needed for a PEFT adapter when the store is empty; "
                   "also records the model's name and weight scale in the store)")
    p.add_argument("--overwrite", action="store_true", help="replace a shard of the same id")
    p.add_argument("--allow-attention", action="store_true",
                   help="research only: accept attention targets (they are never served)")

    p = add("extract", cmd_extract, "extract a shard from a full fine-tune (ΔW = W_ft − W_base, truncated SVD)")
    p.add_argument("--base", required=True)
    p.add_argument("--finetuned", required=True)
    p.add_argument("--id", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rank", type=int)
    g.add_argument("--energy", type=float, help="keep this fraction of each ΔW's energy (0-1]")
    p.add_argument("--max-rank", type=int, default=64)
    p.add_argument("--description")
    p.add_argument("--samples")
    p.add_argument("--out", help="write the shard file here instead of adding it to the store")

    add("ls", cmd_ls, "list shards")
    p = add("show", cmd_show, "show one shard's metadata")
    p.add_argument("id")
    p = add("rm", cmd_rm, "remove a shard")
    p.add_argument("id")
    p = add("search", cmd_search, "which shards a text retrieves, and which the server would apply")
    p.add_argument("text", help="the request text, or - to read one text per line from stdin")
    p.add_argument("-k", type=int, default=5, help="hits shown per text")
    p.add_argument("--threshold", type=float, help="relevance p a shard needs to be applied (default: the server's)")
    p.add_argument("--top-k", type=int, help="shards a request may apply (default: the server's)")
    p = add("export", cmd_export, "write a shard as a PEFT LoRA adapter directory")
    p.add_argument("id")
    p.add_argument("--out", required=True)

    for mod in PLUGGED_COMMANDS:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and mod.startswith(e.name):
                continue  # that part is not installed in this build
            raise
        m.register_cli(_WithCommon(sub, common))
    return parser


class _WithCommon:
    """Subparsers that give every plugged-in command the common --store/--json options."""

    def __init__(self, sub, common):
        self._sub, self._common = sub, common

    def add_parser(self, name, **kw):
        kw["parents"] = [self._common, *kw.get("parents", [])]
        return self._sub.add_parser(name, **kw)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "extract" and args.rank is None and args.energy is None:
        args.rank = 16
    try:
        if args.store is None:
            args.store = str(default_store_path())
        return int(args.func(args) or 0)
    except WragError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
