"""All coupling between WRAG and vLLM internals lives in this package; every vLLM symbol it
relies on is listed in symbols.py (a test fails loudly when an upgrade moves one).

    layers.py     hook 1: out-of-tree gate_up_proj / down_proj classes that add the shard delta
    scheduler.py  hook 2: vLLM's chosen scheduler, subclassed with WRAG admission
    runner.py     hook 3: after the runner lays out a step's batch, the pool fills its metadata
    prompts.py    hook 4 (API server): engine request i of a multi-prompt completions request
                  gets prompt i's plan
    symbols.py    the list of vLLM symbols and source facts, and the check

install() runs in every vLLM process (from plugin.register); the runner hooks are installed by
the first WRAG layer, so only in workers; the prompt hook by the front end, so only in API servers.
"""
from __future__ import annotations


def install() -> None:
    from ..rundir import ensure_run_dir
    from ..seal import ensure_key
    from .layers import register_layers
    from .scheduler import install_scheduler_selection

    ensure_run_dir()
    ensure_key()
    register_layers()
    install_scheduler_selection()
