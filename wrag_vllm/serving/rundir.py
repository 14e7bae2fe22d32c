"""The run directory: one folder shared by the processes of one server (API server, engine core,
workers) for slot payload files and engine/worker stats.

The first process that loads the plugin (the API server, or the offline `LLM`'s process) creates
it and names it in WRAG_RUN_DIR, which the processes it starts inherit; it is removed when that
process exits.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

ENV = "WRAG_RUN_DIR"


def ensure_run_dir() -> str:
    d = os.environ.get(ENV)
    if d and os.path.isdir(d):
        return d
    d = tempfile.mkdtemp(prefix="wrag-run-")
    os.environ[ENV] = d
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(d, ignore_errors=True))
    return d
