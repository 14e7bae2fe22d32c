"""Seals on what the API server hands the engine core, so that no client can forge it.

The front end writes the resolved Plan into `extra_args["wrag_plan"]`. Any route of vLLM that
builds a request from client-supplied `extra_args` (today or after an upgrade) could carry a plan
the front end never made. The engine core therefore accepts a plan only with a valid seal:

    sealed = hex(HMAC-SHA256(key, plan_json)) + "." + plan_json

`key` is 32 random bytes made by the first process of a server (the API server) and inherited
by the processes it starts (engine core, workers) through the environment, like the run
directory. A client never sees it; a plan without a valid seal is refused by the engine.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets

ENV = "WRAG_PLAN_KEY"


def ensure_key() -> None:
    """Create this server's key unless an ancestor process already did (call before spawning)."""
    if not os.environ.get(ENV):
        os.environ[ENV] = secrets.token_hex(32)


def _mac(text: str) -> str:
    key = os.environ.get(ENV)
    if not key:
        raise RuntimeError(f"{ENV} is not set: the WRAG general plugin did not run in this process tree")
    return hmac.new(bytes.fromhex(key), text.encode(), hashlib.sha256).hexdigest()


def seal(text: str) -> str:
    return f"{_mac(text)}.{text}"


def unseal(sealed) -> str:
    """The sealed text; ValueError if `sealed` was not made by seal() of this server."""
    if not isinstance(sealed, str) or "." not in sealed:
        raise ValueError("not a sealed WRAG plan")
    mac, text = sealed.split(".", 1)
    if not hmac.compare_digest(mac, _mac(text)):
        raise ValueError("the WRAG plan's seal is not valid (plans are written by the server only)")
    return text
