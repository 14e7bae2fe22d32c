"""Where a store lives: the folder a store location names, and the default location.

Every reader of a location (ShardStore, the CLI's --store, $WRAG_STORE) goes through
`store_location`, so a value that looks like a URL is refused in one place instead of being taken
for a folder named "postgresql:".
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import StoreError

_URL = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://")  # a scheme, as in postgresql://host/db


def store_location(value: str | os.PathLike) -> Path:
    """The folder a store location names; StoreError for a URL (a scheme:// prefix)."""
    if m := _URL.match(os.fspath(value)):
        raise StoreError(f"store URLs with scheme {m.group(1)!r} are not supported; a store is a folder "
                         f"path (got {os.fspath(value)!r})")
    return Path(value).expanduser()


def default_store_path() -> Path:
    """$WRAG_STORE, else ~/.local/share/wrag/store."""
    env = os.environ.get("WRAG_STORE")
    return store_location(env) if env else Path.home() / ".local" / "share" / "wrag" / "store"
