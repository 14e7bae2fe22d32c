"""The shard files: one safetensors file per shard, in the store's shards/ folder (ShardFiles) or
in the database, with a local cache of them (CachedShardFiles).

A shard's file is written before its catalog row commits, and deleted only after no committed row
names it, so every row has its file; what a killed writer can leave behind is files no row names,
which `sweep` deletes. An overwrite writes its file under a new name, `<id>@<token>.safetensors`
('@' cannot occur in an id, so names never collide), which leaves the old file valid until the
new row commits.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import StoreError
from .. import shard as shard_io  # shard_io.write_atomic: the one writer of shard files
from ..shard import Shard
from .catalog import Catalog
from .crash import crash_point

SHARDS = "shards"


class ShardFiles:
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(exist_ok=True)

    def path(self, name: str) -> Path:
        return self.folder / name

    def local(self, name: str) -> Path:
        """The path of file `name`, which must exist (StoreError)."""
        path = self.folder / name
        if not path.exists():
            raise StoreError(f"shard file {path} is missing (removed by another process?)")
        return path

    def payloads(self, names: Sequence[str]) -> None:
        """What the catalog stores of the files: nothing, they are here."""
        return None

    def write(self, shards: Sequence[Shard], current: Sequence[str | None]) -> list[tuple[str, int]]:
        """Write each shard to a new file, never the name of its current file `current[i]` (None
        if it has none), and fsync the folder. Returns (name, size) per shard. On failure the
        files written so far are deleted."""
        names: list[str] = []
        try:
            crash_point("add:before_files")
            for sh, cur in zip(shards, current):
                name = _file_name(sh.id, cur)
                sh.save(self.folder / name)  # atomic: temp file, fsync, rename
                names.append(name)
                crash_point("add:file_written")
            _fsync_dir(self.folder)
            return [(n, (self.folder / n).stat().st_size) for n in names]
        except BaseException:
            self.unlink(names)
            raise

    def unlink(self, names: Iterable[str]) -> None:
        for n in names:
            with contextlib.suppress(OSError):
                (self.folder / n).unlink()

    def sweep(self, keep: set[str]) -> None:
        """Delete every file but `keep`. Call under the catalog's write lock: a live writer's
        not-yet-committed file is not garbage."""
        for e in os.scandir(self.folder):
            if e.name not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(e.path)

    def names(self) -> set[str]:
        return {e.name for e in os.scandir(self.folder)}

    def nbytes(self) -> int:
        return sum(e.stat().st_size for e in os.scandir(self.folder) if e.is_file())



class CachedShardFiles:
    """The files of a store whose catalog holds them (Catalog.holds_files), with a local cache.

    A file is named for its content, `<id>@<first 16 hex of its sha256>.safetensors`, so a cached
    file is right for as long as the catalog names it: the cache needs no invalidation, replicas on
    one machine can share it, and a missing or deleted cache file is fetched again. `write` puts
    the new files in the cache; their bytes go to the catalog in the row's own transaction
    (`payloads`), so a killed writer leaves at most cache files no row names, which `sweep` deletes.
    """

    def __init__(self, folder: Path, catalog: Catalog):
        self.folder, self.catalog = folder, catalog
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.folder / name

    def local(self, name: str) -> Path:
        """The cached file `name`, fetched from the catalog first if it is not here."""
        path = self.folder / name
        if path.exists():
            return path
        data = self.catalog.file_bytes(name)
        if data is None:
            raise StoreError(f"the store holds no shard file {name} (removed by another process?)")
        if _content_name(name.split("@")[0], data) != name:
            raise StoreError(f"shard file {name} from the store does not match its content hash")
        return shard_io.write_atomic(path, data)

    def write(self, shards: Sequence[Shard], current: Sequence[str | None]) -> list[tuple[str, int]]:
        """Cache each shard's file under its content name. Returns (name, size) per shard."""
        out: list[tuple[str, int]] = []
        try:
            crash_point("add:before_files")
            for sh in shards:
                data = sh.to_bytes()
                name = _content_name(sh.id, data)
                shard_io.write_atomic(self.folder / name, data)
                out.append((name, len(data)))
                crash_point("add:file_written")
            return out
        except BaseException:
            self.unlink(n for n, _ in out)
            raise

    def payloads(self, names: Sequence[str]) -> list[bytes]:
        """The bytes of files just written, for the catalog's transaction."""
        return [(self.folder / n).read_bytes() for n in names]

    def unlink(self, names: Iterable[str]) -> None:
        """Drop cached files (the catalog's copies are the catalog's business)."""
        for n in names:
            with contextlib.suppress(OSError):
                (self.folder / n).unlink()

    def sweep(self, keep: set[str]) -> None:
        """Delete every cached file but `keep`."""
        for e in os.scandir(self.folder):
            if e.name not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(e.path)

    def names(self) -> set[str]:
        """The files the store holds (in the catalog)."""
        return self.catalog.file_names()

    def nbytes(self) -> int:
        return self.catalog.files_nbytes()


def _content_name(shard_id: str, data: bytes) -> str:
    return f"{shard_id}@{hashlib.sha256(data).hexdigest()[:16]}.safetensors"

def _file_name(shard_id: str, current: str | None) -> str:
    plain = f"{shard_id}.safetensors"
    return plain if current != plain else f"{shard_id}@{secrets.token_hex(4)}.safetensors"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
