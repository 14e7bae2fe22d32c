"""Crash points: named steps of a write where a test can stop the writer and SIGKILL it.

tests/test_store_crash.py sets $WRAG_STORE_CRASH_AT to a point's name; the writer that reaches it
touches $WRAG_STORE_CRASH_SIGNAL (if set) and sleeps, so the test kills it at a known step. When
unused, a point costs one dict lookup.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

_CRASH_ENV = "WRAG_STORE_CRASH_AT"  # name of the point where the writer stops and sleeps
_CRASH_SIGNAL_ENV = "WRAG_STORE_CRASH_SIGNAL"  # file touched when the writer reaches that point


def crash_point(name: str) -> None:
    """Stop here (sleep) when $WRAG_STORE_CRASH_AT names this point."""
    if os.environ.get(_CRASH_ENV) == name:
        sig = os.environ.get(_CRASH_SIGNAL_ENV)
        if sig:
            Path(sig).write_text(name)
        time.sleep(3600)
