"""Where a store lives: a folder (SQLite catalog beside the shard files) or a PostgreSQL database.

Every reader of a location (ShardStore, the CLI's --store, $WRAG_STORE, `wrag serve`) goes through
`store_location`, so a URL of a scheme we do not serve is refused in one place instead of being
taken for a folder named "mysql:".

A PostgreSQL store keeps its source of truth in the database (catalog, vectors, shard bytes); each
process that opens it keeps a local cache beside it (the FAISS index file and the shard files it
has read), in `cache_folder(url)`: $WRAG_CACHE_DIR (default ~/.cache/wrag) / stores / a hash of the
URL without its password, so the replicas of one machine share one cache and two databases never do.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ..errors import StoreError

_URL = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://")  # a scheme, as in postgresql://host/db
POSTGRES_SCHEMES = ("postgresql", "postgres")


def store_location(value: str | os.PathLike) -> Path | str:
    """The folder a store location names (a Path), or a PostgreSQL URL (the str itself);
    StoreError for a URL of another scheme."""
    text = os.fspath(value)
    if m := _URL.match(text):
        if m.group(1).lower() in POSTGRES_SCHEMES:
            return text
        raise StoreError(f"store URLs with scheme {m.group(1)!r} are not supported; a store is a folder "
                         f"path or a postgresql://USER@HOST/DB URL (got {redact(text)!r})")
    return Path(value).expanduser()


def default_store_path() -> Path | str:
    """$WRAG_STORE, else ~/.local/share/wrag/store."""
    env = os.environ.get("WRAG_STORE")
    return store_location(env) if env else Path.home() / ".local" / "share" / "wrag" / "store"


def redact(url: str) -> str:
    """The URL without its password (what messages and logs show)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def cache_folder(url: str) -> Path:
    """The local cache of the database store at `url` (module docstring)."""
    root = Path(os.environ.get("WRAG_CACHE_DIR") or Path.home() / ".cache" / "wrag").expanduser()
    return root / "stores" / hashlib.sha256(redact(url).encode()).hexdigest()[:16]
