"""`vllm.general_plugins` entry point: runs in every vLLM process (API server, engine core, workers).

Must be cheap and idempotent. WRAG_ENABLED=0 turns the whole plugin off for a process tree;
`--additional-config '{"wrag": {"enabled": false}}'` turns it off per server (the layers and the
scheduler then behave exactly like vLLM's own).
"""
from __future__ import annotations

import os

from .config import parse_bool


def register() -> None:
    if not parse_bool(os.environ.get("WRAG_ENABLED", "1") or "1"):
        return
    from .hooks import install

    install()
