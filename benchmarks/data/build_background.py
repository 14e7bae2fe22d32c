"""Embed the background corpus with the default embedder and ship the vectors with the package.

    python -m benchmarks.data.build_background

Writes wrag_vllm/data/background/minilm-<sha of general.jsonl>.npy (float16, one row per text),
which store/relevance.py loads instead of embedding the corpus on every `wrag add`; older files of
another corpus version are deleted. Run it after editing general.jsonl.
"""
from __future__ import annotations

import numpy as np

from wrag_vllm.embed import get_embedder
from wrag_vllm.store import relevance


def main() -> int:
    emb = get_embedder()
    out = relevance.BACKGROUND / f"{emb.name}-{relevance.background_digest()}.npy"
    for old in relevance.BACKGROUND.glob(f"{emb.name}-*.npy"):
        if old != out:
            old.unlink()
    vecs = emb.embed(relevance.background_texts())
    np.save(out, vecs.astype(np.float16))
    print(f"wrote {out} {vecs.shape}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
