"""all-MiniLM-L6-v2 in a few lines of torch: the default embedder without transformers or
sentence-transformers, so that `wrag search` and the API server's retrieval start in about a second.

The model is a BERT encoder (6 layers, hidden 384, 12 heads, GELU FFN of 1536, post-LayerNorm,
eps 1e-12). For a text of tokens t_1..t_n (the model's own WordPiece tokenizer.json, [CLS] … [SEP],
truncated to MAX_TOKENS = 256 as sentence-transformers' max_seq_length):

    h⁰_i  = LN(E_word[t_i] + E_pos[i] + E_type[0])
    a     = softmax(Q Kᵀ / √d_head + mask) V          per head, Q/K/V/O linear maps of hⁱ
    h'    = LN(hⁱ + O(a));   hⁱ⁺¹ = LN(h' + W₂ gelu(W₁ h'))
    e     = normalize(Σ_i m_i h⁶_i / Σ_i m_i)          mean pooling over real tokens, unit L2 norm

exactly what SentenceTransformer(Transformer → Pooling(mean) → Normalize) computes from the same
files (tests/test_embed.py compares the two, to 1e-5).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

MAX_TOKENS = 256


class MiniLM:
    """Weights and tokenizer read once from the model folder; `encode` is thread-safe."""

    def __init__(self, folder: Path):
        import torch
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        cfg = json.loads((folder / "config.json").read_text())
        self.heads, self.eps = cfg["num_attention_heads"], cfg["layer_norm_eps"]
        self.layers = cfg["num_hidden_layers"]
        self.w = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tok.enable_truncation(MAX_TOKENS)
        self.tok.enable_padding(pad_id=cfg.get("pad_token_id", 0))
        self._lock = threading.Lock()  # the tokenizer's padding state is shared
        self.torch = torch

    def _ln(self, x, name):
        F = self.torch.nn.functional
        return F.layer_norm(x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def _lin(self, x, name):
        return self.torch.nn.functional.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def encode(self, texts: list[str]):
        """texts (n,) -> (n, 384) float32 numpy, unit rows."""
        torch, F, w = self.torch, self.torch.nn.functional, self.w
        with self._lock:
            enc = self.tok.encode_batch(texts)
        ids = torch.tensor([e.ids for e in enc])                 # (n, L)
        mask = torch.tensor([e.attention_mask for e in enc])     # (n, L)
        n, L = ids.shape
        with torch.inference_mode():
            h = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:L] \
                + w["embeddings.token_type_embeddings.weight"][0]
            h = self._ln(h, "embeddings.LayerNorm")               # (n, L, 384)
            bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min  # (n, 1, 1, L)
            dh = h.shape[-1] // self.heads
            for i in range(self.layers):
                p = f"encoder.layer.{i}"
                q, k, v = (self._lin(h, f"{p}.attention.self.{m}").view(n, L, self.heads, dh).transpose(1, 2)
                           for m in ("query", "key", "value"))  # (n, heads, L, dh)
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # softmax(QKᵀ/√d_head + mask) V
                a = a.transpose(1, 2).reshape(n, L, -1)
                h = self._ln(h + self._lin(a, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
                f = self._lin(F.gelu(self._lin(h, f"{p}.intermediate.dense")), f"{p}.output.dense")
                h = self._ln(h + f, f"{p}.output.LayerNorm")
            m = mask[..., None].float()
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return F.normalize(e, dim=-1).numpy()
