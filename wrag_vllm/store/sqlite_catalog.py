"""The catalog in SQLite: catalog.sqlite in the store's folder, with `.lock` beside it.

Tables:
    meta     key -> value: schema_version, base (fingerprint JSON), embedder_name, embedder_dim,
             epoch, generation, stale_heads (after an upgrade from schema 1)
    shards   one row per shard: its Entry (lists and dicts as JSON), fid (INTEGER PRIMARY KEY
             AUTOINCREMENT: never reused, assigned in commit order), added_at, the index vector
             (`embedding`: float32 (dim + 1), the relevance head) and the text vectors (float16
             (m, dim))

Schema 1 (cosine centroids, no queries) is upgraded in place on open: the new columns are added
and stale_heads set, and ShardStore refits every head from the rows' texts (`reindex`).

The journal is a WAL, so readers never block the writer. Writers of all processes serialise on an
fcntl.flock of `.lock`, plus a threading.Lock, because flock does not exclude the threads of one
process. `generation()` asks `PRAGMA data_version` first, which changes only when another
connection committed, so a reader that polls an unchanged store runs one cheap query.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..embed import Embedder, get_embedder
from ..errors import StoreError
from ..fingerprint import BaseFingerprint
from .catalog import (COLUMNS, INSERTED, Catalog, CatalogState, Entry, Row, decode_candidates, decode_row,
                      decode_vectors, embedder_meta, encode_entry, f16, f32, new_meta, now_utc, state_from_meta)
from .crash import crash_point

CATALOG = "catalog.sqlite"
LOCK = ".lock"
SCHEMA_VERSION = 2
_CHUNK = 500  # values per IN (...) list, below SQLite's limit on query parameters

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards (
    fid INTEGER PRIMARY KEY AUTOINCREMENT,   -- the FAISS id (AUTOINCREMENT: never reused)
    id TEXT NOT NULL UNIQUE,
    file TEXT NOT NULL UNIQUE,               -- name inside shards/
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    samples TEXT NOT NULL,                   -- JSON list
    queries TEXT NOT NULL DEFAULT '[]',      -- JSON list
    rank INTEGER NOT NULL,
    targets TEXT NOT NULL,                   -- JSON list of module names
    layers TEXT NOT NULL,                    -- JSON list of layer indices
    bytes INTEGER NOT NULL,                  -- file size
    provenance TEXT NOT NULL,                -- JSON
    allow_attention INTEGER NOT NULL,
    embed_source TEXT NOT NULL,              -- the texts embedded, or given
    added_at TEXT NOT NULL,                  -- ISO 8601 UTC
    embedding BLOB NOT NULL,                 -- float32 (dim + 1,): the relevance head [w, b]
    text_vectors BLOB                        -- float16 (m, dim), NULL until reindex after an upgrade
);
"""
_COLS = COLUMNS
_INSERT = f"INSERT INTO shards ({INSERTED}) VALUES ({','.join('?' * 16)})"
_UPGRADE_1 = ("ALTER TABLE shards ADD COLUMN queries TEXT NOT NULL DEFAULT '[]'",
              "ALTER TABLE shards ADD COLUMN text_vectors BLOB")


class SqliteCatalog(Catalog):
    def __init__(self, root: Path, embedder: Embedder | None, create: bool):
        """Open the catalog of the store folder `root`. Where there is none, create it when
        `create`, recording `embedder` (default: the registry's) as the store's embedder."""
        self.root = root
        path = root / CATALOG
        if not path.exists():
            if not create:
                raise StoreError(f"no shard store at {root} (create one with `wrag store init` or "
                                 f"ShardStore.init)")
            if root.exists() and not root.is_dir():
                raise StoreError(f"store path {root} exists and is not a directory")
            root.mkdir(parents=True, exist_ok=True)
        self._mu = threading.RLock()  # guards the connection
        self._wmu = threading.Lock()  # serialises writer threads (flock does not, within a process)
        self._lockfd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=60.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives any process crash; only an OS crash/power loss may
        # lose the last commits, never consistency (files are written before their rows).
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._version, self._generation = None, -1  # data_version and generation at the last look
        self._init_schema(embedder)

    def _init_schema(self, embedder: Embedder | None) -> None:
        try:  # an existing store: read only (no lock, no write transaction)
            meta = dict(self._conn.execute("SELECT key, value FROM meta"))
        except sqlite3.OperationalError:
            meta = {}
        if "epoch" not in meta:  # new (or half-created) store: create under the writer lock
            with self.write_lock(), self._tx() as c:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                for k, v in new_meta(embedder or get_embedder(), SCHEMA_VERSION):
                    c.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (k, v))
                meta = dict(c.execute("SELECT key, value FROM meta"))
        if int(meta["schema_version"]) == 1:
            with self.write_lock(), self._tx() as c:
                if c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "1":
                    for stmt in _UPGRADE_1:
                        c.execute(stmt)
                    c.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
                    c.execute("INSERT OR REPLACE INTO meta VALUES ('stale_heads', '1')")
                meta = dict(c.execute("SELECT key, value FROM meta"))
        if int(meta["schema_version"]) != SCHEMA_VERSION:
            raise StoreError(f"store {self.root} has catalog schema {meta['schema_version']}, this build "
                             f"reads schema {SCHEMA_VERSION}")

    # ------------------------------------------------------------------ locks and transactions
    @contextlib.contextmanager
    def write_lock(self, wait: bool = True) -> Iterator[bool]:
        with self._wmu:
            try:
                fcntl.flock(self._lockfd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except BlockingIOError:
                held = False
            try:
                yield held
            finally:
                if held:
                    fcntl.flock(self._lockfd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        with self._mu:
            self._conn.execute("BEGIN")
            try:
                yield
            finally:
                self._conn.execute("COMMIT")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._mu:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextlib.contextmanager
    def _commit(self) -> Iterator[tuple[sqlite3.Connection, int]]:
        """A write transaction that bumps the generation; yields (connection, new generation)."""
        with self._mu:
            with self._tx() as c:
                gen = int(c.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0]) + 1
                c.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(gen),))
                yield c, gen
            self._generation = gen  # our own commits leave data_version as it is

    def _select_in(self, sql: str, values: list) -> list[tuple]:
        """The rows of `sql`, whose "IN ({})" is filled with `values`, _CHUNK per query."""
        out = []
        for i in range(0, len(values), _CHUNK):
            chunk = values[i:i + _CHUNK]
            out += self._conn.execute(sql.format(",".join("?" * len(chunk))), chunk).fetchall()
        return out

    # ------------------------------------------------------------------ reads
    def state(self) -> CatalogState:
        with self._mu:
            meta = dict(self._conn.execute("SELECT key, value FROM meta"))
        return state_from_meta(meta)

    def generation(self) -> int:
        with self._mu:
            version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            if version != self._version:
                self._version = version
                self._generation = int(self._conn.execute(
                    "SELECT value FROM meta WHERE key='generation'").fetchone()[0])
            return self._generation

    def rows(self, ids: Sequence[str] | None = None) -> list[Row]:
        with self._mu:
            if ids is None:
                rows = self._conn.execute(f"SELECT {_COLS} FROM shards ORDER BY fid").fetchall()
            else:
                rows = self._select_in(f"SELECT {_COLS} FROM shards WHERE id IN ({{}})", list(ids))
        return [decode_row(r) for r in rows]

    def fids(self, after: int = 0) -> np.ndarray:
        with self._mu:
            rows = self._conn.execute("SELECT fid FROM shards WHERE fid > ? ORDER BY fid", (after,)).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def ids(self, fids: Sequence[int] | None = None) -> dict[int, str]:
        with self._mu:
            if fids is None:
                return dict(self._conn.execute("SELECT fid, id FROM shards"))
            return dict(self._select_in("SELECT fid, id FROM shards WHERE fid IN ({})", [int(f) for f in fids]))

    def count(self) -> int:
        with self._mu:
            return self._conn.execute("SELECT count(*) FROM shards").fetchone()[0]

    def vectors(self, fids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        with self._mu:  # callers read at most index._BATCH rows at a time
            rows = self._select_in("SELECT fid, embedding FROM shards WHERE fid IN ({})", list(fids))
        return decode_vectors(rows)

    def candidates(self, fids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        with self._mu:
            rows = self._select_in("SELECT fid, embedding, id FROM shards WHERE fid IN ({})", list(fids))
        return decode_candidates(rows)

    def text_vectors(self, fids: Sequence[int]) -> dict[int, np.ndarray]:
        with self._mu:
            dim = int(self._conn.execute("SELECT value FROM meta WHERE key='embedder_dim'").fetchone()[0])
            rows = self._select_in("SELECT fid, text_vectors FROM shards WHERE fid IN ({}) AND "
                                   "text_vectors IS NOT NULL", list(fids))
        return {f: np.frombuffer(b, dtype=np.float16).reshape(-1, dim).astype(np.float32) for f, b in rows}

    def files(self) -> set[str]:
        with self._mu:
            return {r[0] for r in self._conn.execute("SELECT file FROM shards")}

    def bad_embeddings(self, dim: int) -> list[tuple[str, int]]:
        with self._mu:
            return self._conn.execute("SELECT id, length(embedding) FROM shards WHERE length(embedding) != ?",
                                      (4 * dim,)).fetchall()

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob(CATALOG + "*"))

    # ------------------------------------------------------------------ writes
    def set_base(self, base: BaseFingerprint) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO meta VALUES ('base', ?)", (json.dumps(base.to_dict()),))

    def add(self, entries: Sequence[Entry], vecs: np.ndarray, texts: Sequence[np.ndarray],
            replace: Sequence[str], base: BaseFingerprint | None,
            payloads: Sequence[bytes] | None = None) -> tuple[int, list[int]]:
        # payloads: none here, the files are in the store's folder
        now = now_utc()
        with self._commit() as (c, gen):
            if base is not None:
                c.execute("INSERT OR REPLACE INTO meta VALUES ('base', ?)", (json.dumps(base.to_dict()),))
            c.executemany("DELETE FROM shards WHERE id = ?", [(i,) for i in replace])
            fids = [c.execute(_INSERT, encode_entry(e, v, t, now)).lastrowid for e, v, t in zip(entries, vecs, texts)]
            crash_point("add:before_commit")
        return gen, fids

    def remove(self, fid: int) -> int:
        with self._commit() as (c, gen):
            c.execute("DELETE FROM shards WHERE fid = ?", (fid,))
            crash_point("remove:before_commit")
        return gen

    def reembed(self, embedder: Embedder, updates: Iterable[tuple[int, np.ndarray, np.ndarray, str]]) -> int:
        with self._commit() as (c, gen):
            c.executemany("UPDATE shards SET embedding = ?, text_vectors = ?, embed_source = ? WHERE fid = ?",
                          [(f32(v), f16(t), src, fid) for fid, v, t, src in updates])
            c.execute("DELETE FROM meta WHERE key = 'stale_heads'")
            for k, v in embedder_meta(embedder):
                c.execute("UPDATE meta SET value = ? WHERE key = ?", (v, k))
        return gen

    def close(self) -> None:
        with self._mu:
            self._conn.close()
            os.close(self._lockfd)


