"""`wrag train`: train an FFN-only LoRA shard on a text corpus, on CPU, resumably.

Objective: next-token cross-entropy on the corpus, with the frozen base W and, per decoder layer
l and projection p in (gate_proj, up_proj, down_proj),

    W'_{l,p} = W_{l,p} + s · B_{l,p} A_{l,p},   A (r × d_in) random init, B (d_out × r) = 0, s = α / r

so the shard starts as the exact base model. Only A and B are trained (PEFT LoRA, AdamW, linear
warm-up then cosine decay to 10 % of the peak rate, gradient norm clipped at 1).

Data: every text is tokenized, followed by EOS, concatenated and cut into blocks of `seq_len`
tokens (packing: no padding is computed). The order is a pure function of (seed, step): block
indices come from one seeded permutation per epoch, so a resumed run sees exactly the batches an
uninterrupted run would, and resuming reproduces the uninterrupted result.

Resumption: every `checkpoint_every` steps the adapter, optimizer and scheduler state go to
`<work_dir>/checkpoint.pt` (written atomically); `<work_dir>/run.json` records what the run is
(base, corpus hash, hyper-parameters) and a rerun with the same inputs continues from the last
checkpoint, while a rerun with different inputs is refused rather than silently mixed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import jsonio
from .errors import WragError
from .shard import FFN_MODULES, Factors, Shard, check_modules

_TORCH_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainConfig:
    """How a shard is trained; the field defaults are the one place of the training defaults.

    What is trained (base, corpus, shard id, output, work dir) are train_shard's other arguments.
    """
    rank: int = 8
    alpha: float | None = None        # LoRA alpha; None: 2 * rank (scale = alpha / rank)
    steps: int = 100
    lr: float = 2e-3                  # peak rate
    batch_size: int = 4
    seq_len: int = 256                # tokens per packed block
    seed: int = 0                     # LoRA A init and batch order
    warmup: int | None = None         # warm-up steps; None: min(10, max(1, steps // 10))
    checkpoint_every: int = 25
    dtype: str = "bfloat16"           # compute dtype of the frozen base
    factor_dtype: str = "bfloat16"    # dtype of the shard's A and B
    target_modules: tuple[str, ...] = FFN_MODULES
    allow_attention: bool = False     # research override: also accept attention targets
    threads: int | None = None        # torch threads during the run; None: leave as is

    def check(self) -> None:
        """Raise ShardError for refused targets and WragError for bad hyper-parameters."""
        check_modules(list(self.target_modules), self.allow_attention)  # attention only with the override
        if self.rank < 1 or self.steps < 1 or self.batch_size < 1 or self.seq_len < 2 or self.lr <= 0:
            raise WragError("rank, steps, batch size must be >= 1, seq_len >= 2 and lr > 0")
        if self.dtype not in _TORCH_DTYPES or self.factor_dtype not in _TORCH_DTYPES:
            raise WragError(f"dtype must be one of {sorted(_TORCH_DTYPES)}")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else 2 * self.rank)

    @property
    def warmup_steps(self) -> int:
        return min(10, max(1, self.steps // 10)) if self.warmup is None else self.warmup

    def hparams(self) -> dict:
        """What run.json records (a rerun must match it) and the shard's provenance repeats."""
        return dict(rank=self.rank, alpha=self.lora_alpha, steps=self.steps, lr=self.lr,
                    batch_size=self.batch_size, seq_len=self.seq_len, seed=self.seed, dtype=self.dtype,
                    warmup=self.warmup_steps, target_modules=list(self.target_modules))


# ------------------------------------------------------------------------------------ corpus
def load_texts(path: str | os.PathLike) -> list[str]:
    """A corpus file: .jsonl (one object per line with "text") or text (paragraphs split by blank lines)."""
    path = Path(path)
    if not path.is_file():
        raise WragError(f"corpus file {path} not found")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            obj = jsonio.loads(line, f"{path}:{n}")
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise WragError(f"{path}:{n}: each line must be an object with a string field \"text\"")
            texts.append(obj["text"])
    else:
        texts = [p.strip() for p in raw.replace("\r\n", "\n").split("\n\n")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise WragError(f"corpus file {path} holds no text")
    return texts


def corpus_questions(path: str | os.PathLike) -> list[str]:
    """The questions a .jsonl corpus carries ("prompt" or "question" string fields): kept as the
    shard's queries, so retrieval learns how the domain is asked about, not only its documents."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return []
    from .shard import MAX_SAMPLE_CHARS, MAX_SAMPLE_COUNT

    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        obj = jsonio.loads(line, f"{path}:{n}") if line.strip() else {}
        q = next((obj[k] for k in ("prompt", "question") if isinstance(obj.get(k), str) and obj[k].strip()), None)
        if q and len(q.strip()) <= MAX_SAMPLE_CHARS:  # within a shard's bounds: an over-long one is skipped
            out.append(q.strip())
    return out[:MAX_SAMPLE_COUNT]


def corpus_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()[:16]


def pack(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Token blocks (n_blocks, seq_len) int64: texts + EOS, concatenated, cut (the tail is dropped)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise WragError("the tokenizer has no EOS token: cannot separate corpus texts")
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise WragError(f"corpus is too small: {len(ids)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def batch_indices(step: int, batch_size: int, n_blocks: int, seed: int) -> torch.Tensor:
    """Block indices of batch `step` (batch_size,): a pure function, so resumption is exact."""
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(i, n_blocks)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n_blocks, generator=g)[j]))
    return torch.tensor(out, dtype=torch.long)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Multiplier of the peak rate at `step`: linear warm-up, then cosine to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


# ------------------------------------------------------------------------------------ adapter -> shard
def adapter_to_shard(peft_model, base, shard_id: str, description: str, samples, factor_dtype: torch.dtype,
                     provenance: dict, allow_attention: bool = False, queries=None) -> Shard:
    """The trained PEFT adapter as a validated Shard (the one place that knows how to convert).

    Goes through the PEFT directory format and `peft_io.import_peft` (scale = lora_alpha / r), the
    same path as `wrag add <peft dir>`, so training and import can never disagree.
    """
    from .peft_io import import_peft

    with tempfile.TemporaryDirectory(prefix="wrag-train-") as d:
        peft_model.save_pretrained(d, safe_serialization=True)
        shard = import_peft(d, base, shard_id=shard_id, description=description, samples=samples,
                            allow_attention=allow_attention)
    for k, f in shard.factors.items():
        shard.factors[k] = Factors(f.A.detach().to(factor_dtype).contiguous(),
                                   f.B.detach().to(factor_dtype).contiguous(), f.scale)
    shard.provenance = {**provenance, "source": "wrag train"}
    shard.queries = list(queries or [])
    return shard.validate(allow_attention)


# ------------------------------------------------------------------------------------ training
def _run_config(base_fp, chash: str, n_texts: int, **hp) -> dict:
    return {"base": base_fp.identity(), "corpus_hash": chash, "n_texts": n_texts, **hp}


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def default_work_dir(shard_id: str, run_key: str) -> Path:
    from .basemodel import cache_root

    return cache_root() / "train" / f"{shard_id}-{run_key}"


def train_shard(base_dir: str | os.PathLike, texts: list[str], cfg: TrainConfig = TrainConfig(), *,
                out_path: str | os.PathLike | None = None, shard_id: str = "trained", description: str = "",
                samples: list[str] | None = None, work_dir: str | os.PathLike | None = None,
                restart: bool = False, progress: bool = True, stop_after: int | None = None,
                queries: list[str] | None = None) -> Shard:
    """Train an FFN-only LoRA on `texts` over the HF model in `base_dir` as `cfg` says; return it as a Shard.

    `stop_after` ends the process-local run after that many steps (the checkpoint stays: a later
    call continues); it exists to test and to split long runs. Returns the shard (also saved to
    `out_path` when given); raises WragError for bad inputs and ShardError for refused targets.
    """
    cfg.check()
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise WragError("empty corpus")
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(base_dir, texts, cfg, out_path=out_path, shard_id=shard_id, description=description,
                      samples=samples, work_dir=work_dir, restart=restart, progress=progress,
                      stop_after=stop_after, queries=queries)
    finally:
        torch.set_num_threads(threads_before)


def _train(base_dir, texts: list[str], cfg: TrainConfig, *, out_path, shard_id: str, description: str, samples,
           work_dir, restart: bool, progress: bool, stop_after: int | None, queries=None) -> Shard:
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .fingerprint import fingerprint_model

    t_load = time.time()
    base_dir = Path(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=_TORCH_DTYPES[cfg.dtype])
    base_fp = fingerprint_model(model)
    blocks = pack(tok, texts, cfg.seq_len)  # (n_blocks, seq_len)
    hp = cfg.hparams()
    run = _run_config(base_fp, corpus_hash(texts), len(texts), **hp)
    run_key = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:12]
    work = Path(work_dir) if work_dir else default_work_dir(shard_id, run_key)
    work.mkdir(parents=True, exist_ok=True)
    run_file, ckpt_file = work / "run.json", work / "checkpoint.pt"
    if restart:
        for f in (run_file, ckpt_file):
            f.unlink(missing_ok=True)
    if run_file.exists():
        old = json.loads(run_file.read_text())
        if old != run:
            diff = sorted(k for k in set(old) | set(run) if old.get(k) != run.get(k))
            raise WragError(f"work dir {work} belongs to a different run (differs in {', '.join(diff)}); "
                            f"use another --work-dir or --restart")
    else:
        run_file.write_text(json.dumps(run, indent=1, sort_keys=True))

    steps, warmup = cfg.steps, cfg.warmup_steps
    torch.manual_seed(cfg.seed)  # LoRA A init
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.target_modules),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))

    start, losses, train_s = 0, [], 0.0
    if ckpt_file.exists():
        ck = torch.load(ckpt_file, weights_only=True)
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, ck["lora"])
        opt.load_state_dict(ck["optim"])
        sched.load_state_dict(ck["sched"])
        start, losses, train_s = int(ck["step"]), list(ck["losses"]), float(ck["train_s"])

    def checkpoint(step: int) -> None:
        from peft import get_peft_model_state_dict
        _atomic_torch_save({"step": step, "lora": get_peft_model_state_dict(model), "optim": opt.state_dict(),
                            "sched": sched.state_dict(), "losses": losses, "train_s": train_s}, ckpt_file)

    end = steps if stop_after is None else min(steps, start + stop_after)
    if progress and start:
        print(f"wrag train: resuming {shard_id} at step {start}/{steps} from {work}", flush=True)
    load_s = time.time() - t_load
    model.train()
    bar = tqdm(range(start, end), initial=start, total=steps, desc=f"train {shard_id}", unit="step",
               disable=not progress, dynamic_ncols=True)
    for step in bar:
        t0 = time.time()
        batch = blocks[batch_indices(step, cfg.batch_size, len(blocks), cfg.seed)]  # (batch, seq_len)
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        train_s += time.time() - t0
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            checkpoint(step + 1)
    bar.close()
    if end < steps:
        raise TrainingPaused(end, steps, work)

    model.eval()
    prov = {"corpus_hash": run["corpus_hash"], "n_texts": len(texts), "n_blocks": len(blocks),
            "tokens_seen": steps * cfg.batch_size * cfg.seq_len, **hp,
            "loss_first10": _mean(losses[:10]), "loss_last10": _mean(losses[-10:]),
            "train_seconds": round(train_s, 1), "load_seconds": round(load_s, 1),
            "threads": torch.get_num_threads(), "work_dir": str(work)}
    shard = adapter_to_shard(model, base_fp, shard_id, description, samples,
                             _TORCH_DTYPES[cfg.factor_dtype], prov,
                             allow_attention=any(m not in FFN_MODULES for m in cfg.target_modules),
                             queries=queries)
    if out_path is not None:
        shard.save(out_path)
    return shard


class TrainingPaused(WragError):
    """Raised when `stop_after` ends a run early; the checkpoint lets a rerun continue."""

    def __init__(self, step, steps, work):
        super().__init__(f"training paused at step {step}/{steps}; rerun the same command to continue "
                         f"(checkpoint in {work})")


def _mean(xs) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


# ------------------------------------------------------------------------------------ CLI
def register_cli(sub) -> None:
    p = sub.add_parser("train", help="train an FFN-only LoRA shard on a text corpus (CPU) and register it")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", help="text file (paragraphs separated by blank lines) or .jsonl with \"text\"")
    src.add_argument("--domain", help="a built-in domain corpus (wrag_vllm.domains): "
                                      "medicine, computing, law, history")
    p.add_argument("--id", help="shard id (default: the corpus file name or the domain)")
    p.add_argument("--description", help="what the shard knows (embedded for retrieval)")
    p.add_argument("--samples", help="texts of the shard's domain (embedded for retrieval): text file or .jsonl")
    p.add_argument("--queries", help="requests the shard should serve, one per line (or .jsonl 'text'); "
                   "default: a --domain's everyday queries, or the 'prompt'/'question' fields of a .jsonl corpus")
    p.add_argument("--base", help="base model folder (default: the converted SmolLM2-135M-Instruct)")
    d = TrainConfig()  # the CLI defaults are the config's
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, help="LoRA alpha (default 2*rank; scale = alpha/rank)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float32"],
                   help="compute dtype of the frozen base (bf16 is faster on CPUs with AVX512-BF16)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--work-dir", help="checkpoint folder; rerunning with it continues an interrupted run")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--restart", action="store_true", help="discard the work dir's checkpoint")
    p.add_argument("--out", help="also write the shard file here")
    p.add_argument("--no-register", action="store_true", help="do not add the shard to the store")
    p.add_argument("--overwrite", action="store_true", help="replace a shard with the same id in the store")
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    from .cli import read_queries

    samples = None
    if args.domain:
        from .domains import build_domain
        d = build_domain(args.domain)
        texts, shard_id = d.train_texts, args.id or d.name
        description, samples, queries = args.description or d.description, d.samples, d.queries
    else:
        texts, queries = load_texts(args.corpus), corpus_questions(args.corpus)
        shard_id = args.id or Path(args.corpus).stem
        description = args.description or ""
    if args.samples:
        samples = load_texts(args.samples)
    if args.queries:
        queries = read_queries(args.queries)
    from .shard import check_texts
    check_texts("", description, samples or [], {}, "wrag train", queries or [])  # before a long run, not after
    if args.no_register and not args.out:
        raise WragError("--no-register needs --out PATH, or the trained shard would be lost")
    if not args.no_register and not (description or samples or queries):
        raise WragError("registering needs --description, --samples or --queries (they are what retrieval embeds)")
    if args.base:
        base_dir = Path(args.base)
    else:
        from .basemodel import ensure_base_model
        base_dir = ensure_base_model()
    store = None
    if not args.no_register:  # fail before a long run, not after it
        from .store import ShardStore
        store = ShardStore(args.store)
        if shard_id in store and not args.overwrite:
            raise WragError(f"store {args.store} already has a shard {shard_id!r}; pass --overwrite or --id")
    cfg = TrainConfig(rank=args.rank, alpha=args.alpha, steps=args.steps, lr=args.lr,
                      batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                      checkpoint_every=args.checkpoint_every, dtype=args.dtype, threads=args.threads)
    shard = train_shard(base_dir, texts, cfg, out_path=args.out, shard_id=shard_id, description=description,
                        samples=samples, work_dir=args.work_dir, restart=args.restart, progress=not args.json,
                        queries=queries)
    row = store.add(shard, overwrite=args.overwrite) if store is not None else shard.meta()
    info = {"id": shard.id, "rank": shard.rank, "bytes": shard.nbytes(), "out": args.out,
            "registered": store is not None, "train_seconds": shard.provenance.get("train_seconds"),
            "loss_first10": shard.provenance.get("loss_first10"),
            "loss_last10": shard.provenance.get("loss_last10")}
    if args.json:
        print(json.dumps({**info, "meta": row}, default=str))
    else:
        where = f"store {args.store}" if store is not None else args.out
        print(f"trained {shard.id}: rank {shard.rank}, {shard.nbytes() / 1e6:.2f} MB, loss "
              f"{info['loss_first10']} -> {info['loss_last10']} in {info['train_seconds']} s; saved to {where}")
    return 0
