"""The shard files: one safetensors file per shard in the store's shards/ folder.

A shard's file is written before its catalog row commits, and deleted only after no committed row
names it, so every row has its file; what a killed writer can leave behind is files no row names,
which `sweep` deletes. An overwrite writes its file under a new name, `<id>@<token>.safetensors`
('@' cannot occur in an id, so names never collide), which leaves the old file valid until the
new row commits.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterable, Sequence

from ..shard import Shard
from .crash import crash_point

SHARDS = "shards"


class ShardFiles:
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(exist_ok=True)

    def path(self, name: str) -> Path:
        return self.folder / name

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


def _file_name(shard_id: str, current: str | None) -> str:
    plain = f"{shard_id}.safetensors"
    return plain if current != plain else f"{shard_id}@{secrets.token_hex(4)}.safetensors"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
