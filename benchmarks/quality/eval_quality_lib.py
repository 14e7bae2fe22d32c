"""Building blocks of benchmarks/quality/eval_quality.py: per-text NLL, dense deltas, retrieval plans,
evaluation text sets, the attention-ablation trainer and the instruction-following check.

Per-text negative log-likelihood. A text t (tokens x_1..x_n, n ≤ max_tokens) is read after one
EOS token — the separator every training block puts between texts (wrag_vllm.train.pack) — and

    NLL(m, t) = Σ_{i=1..n} −log p_m(x_i | EOS, x_<i),     ppl(m, T) = exp( Σ_t NLL / Σ_t n_t )

i.e. a token-weighted perplexity over a text set T. Every model (base, shard, composite) scores the
same tokens, so differences are differences of the model only.

A shard or composite is applied densely: W_{l,p} ← W_{l,p} + s·B·A for each of its factors (FFN
and, for the ablation, attention projections), computed in fp32 and rounded once to the model
dtype, and restored bit-exactly afterwards. The serving path computes the same sum without
materialising it (tested equal elsewhere).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path

import torch

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


# ------------------------------------------------------------------------------------ caching
class JsonCache:
    """A dict persisted as JSON (atomic rewrite), so an interrupted run resumes where it stopped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self._dirty = 0

    def get(self, key, default=None):
        return self.data.get(key, default)

    def __contains__(self, key) -> bool:
        return key in self.data

    def put(self, key, value, flush_every: int = 1) -> None:
        self.data[key] = value
        self._dirty += 1
        if self._dirty >= flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)
        self._dirty = 0


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------ deltas
def _linear(model, layer: int, module: str):
    blk = model.model.layers[layer]
    return getattr(blk.self_attn if module in ATTN else blk.mlp, module)


class DenseDelta:
    """Context manager: W += s·B·A for every factor of `shard` (None = no change), restored exactly."""

    def __init__(self, model, shard):
        self.model, self.shard, self.saved = model, shard, {}

    def __enter__(self):
        if self.shard is None:
            return self.model
        for (l, mod), f in self.shard.factors.items():
            lin = _linear(self.model, l, mod)
            self.saved[(l, mod)] = lin.weight.data
            # (d_out, d_in): fp32 sum, one rounding to the model dtype
            lin.weight.data = (lin.weight.data.float() + f.delta()).to(lin.weight.dtype)
        return self.model

    def __exit__(self, *exc):
        for (l, mod), w in self.saved.items():
            _linear(self.model, l, mod).weight.data = w
        self.saved = {}


# ------------------------------------------------------------------------------------ NLL
def encode_texts(tok, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids per text: [EOS] + the first max_tokens tokens of the text."""
    eos = tok.eos_token_id
    return [[eos] + ids[:max_tokens] for ids in tok(texts, add_special_tokens=False)["input_ids"]]


@torch.no_grad()
def nll_many(model, seqs: list[list[int]], batch: int = 4) -> list[tuple[float, int]]:
    """(Σ −log p, n predicted tokens) per sequence; batched by length with right padding."""
    out: list[tuple[float, int] | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        L = max(len(seqs[i]) for i in idx)
        x = torch.zeros(len(idx), L, dtype=torch.long)          # (b, L)
        mask = torch.zeros(len(idx), L, dtype=torch.long)       # (b, L) 1 = real token
        for j, i in enumerate(idx):
            x[j, :len(seqs[i])] = torch.tensor(seqs[i])
            mask[j, :len(seqs[i])] = 1
        logits = model(input_ids=x, attention_mask=mask).logits[:, :-1].float()   # (b, L-1, V)
        lp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None])[..., 0]      # (b, L-1)
        m = mask[:, 1:].float()
        for j, i in enumerate(idx):
            out[i] = (float(-(lp[j] * m[j]).sum()), int(m[j].sum()))
    return out  # type: ignore[return-value]


def ppl(pairs) -> float:
    """exp(Σ NLL / Σ tokens) over (nll, n) pairs."""
    pairs = list(pairs)
    return math.exp(sum(p[0] for p in pairs) / max(1, sum(p[1] for p in pairs)))


# ------------------------------------------------------------------------------------ retrieval
def plan(hits, threshold: float, temperature: float, decimals: int = 3):
    """The server's rule (wrag_vllm.serving.resolver): keep hits of relevance p ≥ threshold, weights =
    softmax(logit(p) / T); weights rounded like the server's CompositionCache key (decimals=3).
    Returns a tuple of (id, weight) pairs, best first ( () = nothing retrieved → base model)."""
    from wrag_vllm.serving.resolver import retrieval_weights

    kept = [(i, float(s)) for i, s in hits if float(s) >= threshold]
    w = retrieval_weights([s for _, s in kept], temperature)
    return tuple((i, round(x, decimals)) for (i, _), x in zip(kept, w))


# ------------------------------------------------------------------------------------ text sets
FORTUNE_DIR = Path("/usr/share/games/fortunes")
# everyday-English categories of the Debian `fortunes` package; categories that overlap the four
# domains (computers, linux, law, medicine, science, politics, education, startrek...) are left out
FORTUNE_FILES = ("wisdom", "food", "pets", "sports", "love", "people", "literature", "humorists")


def general_texts(n: int, chars: int = 900, files: tuple[str, ...] = FORTUNE_FILES) -> list[dict]:
    """n passages of general, out-of-domain English: consecutive fortunes (quotations, jokes,
    short anecdotes) of one category joined into ≈`chars`-character passages, round-robin over
    `files` (default FORTUNE_FILES). Needs the Debian package `fortunes` (BSD licence)."""
    from wrag_vllm.errors import WragError

    if not FORTUNE_DIR.is_dir():
        raise WragError(f"general text needs the Debian package 'fortunes' ({FORTUNE_DIR} missing): "
                        f"apt-get install fortunes, or pass --no-general")
    per_file: dict[str, list[str]] = {}
    for name in files:
        raw = (FORTUNE_DIR / name).read_text(encoding="utf-8", errors="replace")
        items = [re.sub(r"[ \t]+", " ", f).strip() for f in raw.split("\n%\n")]
        items = [f for f in items if 40 <= len(f) <= 600]
        passages, cur = [], ""
        for f in items:
            cur = f"{cur}\n\n{f}" if cur else f
            if len(cur) >= chars:
                passages.append(cur)
                cur = ""
        per_file[name] = passages
    out, j = [], 0
    while len(out) < n and any(j < len(p) for p in per_file.values()):
        for name, p in per_file.items():
            if j < len(p) and len(out) < n:
                out.append({"id": f"fortunes/{name}/{j}", "text": p[j]})
        j += 1
    return out


def pubmedqa_items(path: Path, heldout_ids: list[str]) -> list[dict]:
    """PQA-L items of the medicine domain's held-out split: question, context, answer."""
    data = json.loads(Path(path).read_text())
    out = []
    for hid in heldout_ids:
        pid = hid.split(":", 1)[1] if ":" in hid else hid
        if pid in data:
            d = data[pid]
            ctx = d["CONTEXTS"]
            ctx = " ".join(ctx) if isinstance(ctx, list) else str(ctx)
            out.append({"id": pid, "question": d["QUESTION"], "context": ctx, "answer": d["final_decision"]})
    return out


OPTIONS = ("yes", "no", "maybe")


@torch.no_grad()
def pubmedqa_scores(model, tok, items: list[dict], max_context_tokens: int = 320) -> list[list[float]]:
    """log p(" yes" / " no" / " maybe" | prompt) per item; each option is one token, so one forward
    pass per item scores all three. Prompt: "Context: … Question: … Answer (yes, no or maybe):"."""
    opt_ids = [tok.encode(" " + o, add_special_tokens=False) for o in OPTIONS]
    if any(len(o) != 1 for o in opt_ids):
        raise RuntimeError(f"options are not single tokens: {opt_ids}")
    opt = torch.tensor([o[0] for o in opt_ids])
    out = []
    for it in items:
        ctx = tok.encode(it["context"], add_special_tokens=False)[:max_context_tokens]
        ids = ([tok.eos_token_id] + tok.encode("Context: ", add_special_tokens=False) + ctx
               + tok.encode(f"\nQuestion: {it['question']}\nAnswer (yes, no or maybe):", add_special_tokens=False))
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()       # (V,)
        out.append(torch.log_softmax(logits, -1)[opt].tolist())
    return out


# ------------------------------------------------------------------------------------ ablation training
def train_lora(base_dir: Path, texts: list[str], targets: list[str], out_dir: Path, steps: int,
               rank: int = 8, lr: float = 2e-3, batch_size: int = 4, seq_len: int = 256, seed: int = 0,
               warmup: int | None = None) -> dict:
    """Train a PEFT LoRA with wrag train's exact recipe (same packing, batch order, AdamW, warm-up +
    cosine schedule, clipping; alpha = 2r) but any `targets` — wrag train refuses attention targets
    even with allow_attention=True, so the ablation trains both variants here with one code path.
    Writes a PEFT directory (adapter_config.json + adapter_model.safetensors) to out_dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wrag_vllm.train import batch_indices, lr_factor, pack

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    blocks = pack(tok, texts, seq_len)  # (n_blocks, seq_len)
    warmup = min(10, max(1, steps // 10)) if warmup is None else warmup
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2.0 * rank, target_modules=list(targets),
                                             lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    model.train()
    losses, t0 = [], time.time()
    for step in range(steps):
        batch = blocks[batch_indices(step, batch_size, len(blocks), seed)]  # (batch, seq_len)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == steps - 1:
            print(f"  train {'+'.join(targets)} step {step + 1}/{steps} loss {losses[-1]:.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    info = {"targets": list(targets), "steps": steps, "rank": rank, "lr": lr, "batch_size": batch_size,
            "seq_len": seq_len, "seed": seed, "trainable_params": sum(p.numel() for p in params),
            "loss_first10": sum(losses[:10]) / len(losses[:10]), "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
            "train_seconds": round(time.time() - t0, 1)}
    (out_dir / "wrag_ablation.json").write_text(json.dumps(info, indent=1))
    return info


# ------------------------------------------------------------------------------------ instruction following
CHAT_PROMPTS = [
    "Give me three tips for sleeping better.",
    "Write a haiku about autumn leaves.",
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Suggest a name for a small bakery.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
    "List four fruits that are yellow.",
    "Write a short thank-you note to a neighbour who watered my plants.",
    "What is 12 times 7?",
    "Give me a one-sentence summary of the story of Cinderella.",
    "What should I pack for a weekend hiking trip?",
    "Describe a cat to someone who has never seen one, in two sentences.",
    "Recommend a good habit for staying focused while studying.",
    "Write a polite email subject line asking for a meeting.",
    "What are the primary colors?",
    "Tell me a fun fact about octopuses.",
    "How many days are there in a leap year?",
    "Give me a simple recipe for a fruit salad.",
    "What is a good way to start learning to play the guitar?",
]
_ROLE = re.compile(r"(<\|im_start\|>|<\|endoftext\|>|^\s*(user|assistant|system)\s*$)", re.M)


def _degenerate(text: str) -> bool:
    """A word 4-gram repeated ≥ 3 times: the looping that breaks a chat answer."""
    w = text.split()
    grams = [tuple(w[i:i + 4]) for i in range(len(w) - 3)]
    return any(grams.count(g) >= 3 for g in set(grams))


@torch.no_grad()
def chat_generate(model, tok, prompts: list[str], max_new_tokens: int = 96, batch: int = 10) -> list[dict]:
    """Greedy answers to chat prompts (chat template, left padding). Per answer: stopped = the model
    emitted <|im_end|> before the limit; clean = no role markers / special tokens in the text and no
    degenerate repetition; follows = stopped and clean."""
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.pad_token_id if tok.pad_token_id is not None else end_id
    tok.padding_side = "left"
    out = []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) for p in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end_id,
                             pad_token_id=pad)
        for p, g in zip(chunk, gen[:, enc["input_ids"].shape[1]:].tolist()):
            stopped = end_id in g
            body = g[:g.index(end_id)] if stopped else g
            text = tok.decode(body, skip_special_tokens=False)
            clean = not _ROLE.search(text) and not _degenerate(text) and bool(text.strip())
            out.append({"prompt": p, "answer": text, "tokens": len(body), "stopped": stopped, "clean": clean,
                        "follows": stopped and clean})
    return out
