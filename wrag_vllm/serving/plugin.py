"""`vllm.general_plugins` entry point: runs in every vLLM process (API server, engine core, workers).

Must be cheap and idempotent. WRAG_ENABLED=0 turns the whole plugin off for a process tree;
`--additional-config '{"wrag": {"enabled": false}}'` turns it off per server (the layers and the
scheduler then behave exactly like vLLM's own).

WRAG fills its per-step metadata from vLLM's V1 model runner (hooks/runner.py), the runner the CPU
tests exercise; the V2 runner's hook has not run on a GPU yet, so the plugin selects the V1 runner
(VLLM_USE_V2_MODEL_RUNNER=0) unless the environment already chose.
"""
from __future__ import annotations

import logging
import os

from .config import parse_bool

log = logging.getLogger("vllm.wrag")


def register() -> None:
    if not parse_bool(os.environ.get("WRAG_ENABLED", "1") or "1"):
        return
    from .hooks import install

    if "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        log.info("WRAG: VLLM_USE_V2_MODEL_RUNNER=0 (WRAG's step hook is verified on vLLM's V1 model runner)")
    install()
