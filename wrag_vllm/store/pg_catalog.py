"""The catalog in PostgreSQL: a store that many servers on many machines share by its URL alone.

Tables (prefixed, so a store can live in a database that holds other things):
    wrag_meta    key -> value, as SQLite's meta: schema_version, base, embedder_name,
                 embedder_dim, epoch, generation
    wrag_shards  one row per shard, the columns of SQLite's `shards`; fid is an identity column
                 (a sequence: never reused; writers hold the write lock from insert to commit, so
                 fids are assigned in commit order, as the Catalog contract needs)
    wrag_files   name -> the shard file's bytes. The catalog holds the files (`holds_files`):
                 a file goes in in its row's transaction and out in the transaction that deletes
                 the last row naming it, so a row never lacks its file and no file outlives its rows.

Locks and visibility:
- The write lock is a session advisory lock (pg_advisory_lock) on a connection of its own, plus a
  threading.Lock for the threads of one process. The server releases it when the session ends,
  so a SIGKILLed writer never leaves the store locked, and its open transaction is rolled back.
- Reads run in autocommit; `snapshot()` is one REPEATABLE READ transaction.
- Every commit that bumps the generation also sends NOTIFY wrag_store (payload: the generation),
  delivered when it commits. `wait()` blocks on LISTEN for it, so a watching server hears of a
  change at once; `generation()` still asks the database (one indexed read), so a request that
  follows a commit always sees it, notification or not.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import threading
import time
from typing import Iterable, Iterator, Sequence

import numpy as np
import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ..embed import Embedder, get_embedder
from ..errors import StoreError
from ..fingerprint import BaseFingerprint
from .catalog import (COLUMNS, INSERTED, Catalog, CatalogState, Entry, Row, decode_candidates, decode_row,
                      decode_vectors, embedder_meta, encode_entry, f16, f32, new_meta, now_utc, state_from_meta)
from .crash import crash_point
from .location import redact

SCHEMA_VERSION = 2  # the same rows as SQLite's schema 2
CHANNEL = "wrag_store"
_LOCK_KEY = 0x77726167  # "wrag": the advisory lock of the store in this database
_CONNECT_TIMEOUT_S = 10

_SCHEMA = """
CREATE TABLE IF NOT EXISTS wrag_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS wrag_shards (
    fid BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    file TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    samples TEXT NOT NULL,
    queries TEXT NOT NULL,
    rank INTEGER NOT NULL,
    targets TEXT NOT NULL,
    layers TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    provenance TEXT NOT NULL,
    allow_attention BOOLEAN NOT NULL,
    embed_source TEXT NOT NULL,
    added_at TEXT NOT NULL,
    embedding BYTEA NOT NULL,
    text_vectors BYTEA
);
CREATE TABLE IF NOT EXISTS wrag_files (name TEXT PRIMARY KEY, data BYTEA NOT NULL);
ALTER TABLE wrag_files ALTER COLUMN data SET STORAGE EXTERNAL
"""  # EXTERNAL: shard bytes do not compress; do not try
_COLS = COLUMNS
_INSERT = f"INSERT INTO wrag_shards ({INSERTED}) VALUES ({','.join(['%s'] * 16)}) RETURNING fid"
_DROP_UNUSED = ("DELETE FROM wrag_files f WHERE f.name = ANY(%s) "
                "AND NOT EXISTS (SELECT 1 FROM wrag_shards s WHERE s.file = f.name)")


class PgCatalog(Catalog):
    holds_files = True

    def __init__(self, url: str, embedder: Embedder | None, create: bool):
        """Open the store in the database at `url`. Where the database or the store's tables do
        not exist, create them when `create`, recording `embedder` (default: the registry's)."""
        self.url, self.where = url, redact(url)
        self._mu = threading.RLock()  # guards self._conn (one transaction at a time)
        self._wmu = threading.Lock()  # serialises writer threads (the advisory lock is per session)
        self._conn = self._connect(create)
        self._lock_conn = self._connect(False)
        self._listen: psycopg.Connection | None = None  # the connection `wait` listens on
        self._init_schema(embedder, create)

    def _connect(self, create: bool) -> psycopg.Connection:
        try:
            return _connect(self.url)
        except psycopg.OperationalError as e:
            failure = e  # libpq gives no SQLSTATE for a refused connection: ask the server why
        name = _dbname(self.url)
        try:
            with _connect(make_conninfo(self.url, dbname="postgres")) as admin:
                if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                    if not create:
                        raise StoreError(f"no shard store at {self.where}: database {name!r} does not exist "
                                         f"(create it with `wrag store init --store URL` or ShardStore.init)")
                    # another process creating it at the same time: either error, and the database is there
                    with contextlib.suppress(pgerrors.DuplicateDatabase, pgerrors.UniqueViolation):
                        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.Error:
            raise StoreError(f"cannot connect to the store database {self.where}: {_first_line(failure)}") from None
        try:  # the database exists now: made here, or by another process since the first try
            return _connect(self.url)
        except psycopg.OperationalError as e:
            raise StoreError(f"cannot connect to the store database {self.where}: {_first_line(e)}") from None

    def _init_schema(self, embedder: Embedder | None, create: bool) -> None:
        meta = self._meta_or_none()
        if meta is None or "epoch" not in meta:
            if not create:
                raise StoreError(f"no shard store at {self.where} (create one with `wrag store init` or "
                                 f"ShardStore.init)")
            with self.write_lock(), self._tx() as c:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                for k, v in new_meta(embedder or get_embedder(), SCHEMA_VERSION):
                    c.execute("INSERT INTO wrag_meta VALUES (%s, %s) ON CONFLICT (key) DO NOTHING", (k, v))
            meta = self._meta_or_none()
        if int(meta["schema_version"]) != SCHEMA_VERSION:
            raise StoreError(f"store {self.where} has catalog schema {meta['schema_version']}, this build "
                             f"reads schema {SCHEMA_VERSION}")

    def _meta_or_none(self) -> dict | None:
        with self._mu:
            try:
                return dict(self._conn.execute("SELECT key, value FROM wrag_meta").fetchall())
            except pgerrors.UndefinedTable:
                return None

    # ------------------------------------------------------------------ locks and transactions
    @contextlib.contextmanager
    def write_lock(self, wait: bool = True) -> Iterator[bool]:
        with self._wmu:
            if wait:
                self._lock_conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
                held = True
            else:
                held = self._lock_conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK_KEY,)).fetchone()[0]
            try:
                yield held
            finally:
                if held:
                    self._lock_conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        with self._mu, self._conn.transaction():
            yield

    @contextlib.contextmanager
    def _tx(self) -> Iterator[psycopg.Connection]:
        with self._mu, self._conn.transaction():
            yield self._conn

    @contextlib.contextmanager
    def _commit(self) -> Iterator[tuple[psycopg.Connection, int]]:
        """A write transaction that bumps the generation and notifies listeners at commit; yields
        (connection, new generation)."""
        with self._tx() as c:
            gen = int(c.execute("SELECT value FROM wrag_meta WHERE key='generation'").fetchone()[0]) + 1
            c.execute("UPDATE wrag_meta SET value = %s WHERE key = 'generation'", (str(gen),))
            c.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(gen)))
            yield c, gen

    # ------------------------------------------------------------------ reads
    def state(self) -> CatalogState:
        with self._mu:
            meta = dict(self._conn.execute("SELECT key, value FROM wrag_meta").fetchall())
        return state_from_meta(meta)

    def generation(self) -> int:
        with self._mu:
            return int(self._conn.execute("SELECT value FROM wrag_meta WHERE key='generation'").fetchone()[0])

    def rows(self, ids: Sequence[str] | None = None) -> list[Row]:
        with self._mu:
            if ids is None:
                rows = self._conn.execute(f"SELECT {_COLS} FROM wrag_shards ORDER BY fid").fetchall()
            else:
                rows = self._conn.execute(f"SELECT {_COLS} FROM wrag_shards WHERE id = ANY(%s) ORDER BY fid",
                                          (list(ids),)).fetchall()
        return [decode_row(r) for r in rows]

    def fids(self, after: int = 0) -> np.ndarray:
        with self._mu:
            rows = self._conn.execute("SELECT fid FROM wrag_shards WHERE fid > %s ORDER BY fid", (after,)).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def ids(self, fids: Sequence[int] | None = None) -> dict[int, str]:
        with self._mu:
            if fids is None:
                return dict(self._conn.execute("SELECT fid, id FROM wrag_shards").fetchall())
            return dict(self._conn.execute("SELECT fid, id FROM wrag_shards WHERE fid = ANY(%s)",
                                           ([int(f) for f in fids],)).fetchall())

    def count(self) -> int:
        with self._mu:
            return self._conn.execute("SELECT count(*) FROM wrag_shards").fetchone()[0]

    # bytea read in binary format: the text format's hex doubles the bytes and costs a parse (a
    # search's 128 candidates: 1.4 ms in text, 0.8 ms binary, measured on 10,000 shards)
    def vectors(self, fids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        with self._mu:
            rows = self._conn.execute("SELECT fid, embedding FROM wrag_shards WHERE fid = ANY(%s)",
                                      ([int(f) for f in fids],), binary=True).fetchall()
        return decode_vectors(rows)

    def candidates(self, fids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        with self._mu:
            rows = self._conn.execute("SELECT fid, embedding, id FROM wrag_shards WHERE fid = ANY(%s)",
                                      ([int(f) for f in fids],), binary=True).fetchall()
        return decode_candidates(rows)

    def text_vectors(self, fids: Sequence[int]) -> dict[int, np.ndarray]:
        with self._mu:
            dim = int(self._conn.execute("SELECT value FROM wrag_meta WHERE key='embedder_dim'").fetchone()[0])
            rows = self._conn.execute("SELECT fid, text_vectors FROM wrag_shards WHERE fid = ANY(%s) AND "
                                      "text_vectors IS NOT NULL", ([int(f) for f in fids],)).fetchall()
        return {f: np.frombuffer(b, dtype=np.float16).reshape(-1, dim).astype(np.float32) for f, b in rows}

    def files(self) -> set[str]:
        with self._mu:
            return {r[0] for r in self._conn.execute("SELECT file FROM wrag_shards")}

    def file_names(self) -> set[str]:
        with self._mu:
            return {r[0] for r in self._conn.execute("SELECT name FROM wrag_files")}

    def file_bytes(self, name: str) -> bytes | None:
        with self._mu:
            r = self._conn.execute("SELECT data FROM wrag_files WHERE name = %s", (name,)).fetchone()
        return None if r is None else bytes(r[0])

    def files_nbytes(self) -> int:
        with self._mu:
            return self._conn.execute("SELECT pg_total_relation_size('wrag_files')").fetchone()[0]

    def bad_embeddings(self, dim: int) -> list[tuple[str, int]]:
        with self._mu:
            return self._conn.execute("SELECT id, length(embedding) FROM wrag_shards WHERE length(embedding) != %s",
                                      (4 * dim,)).fetchall()

    def nbytes(self) -> int:
        with self._mu:
            return self._conn.execute("SELECT pg_total_relation_size('wrag_shards') + "
                                      "pg_total_relation_size('wrag_meta')").fetchone()[0]

    def wait(self, timeout: float) -> None:
        """Block until another session may have committed (a NOTIFY) or `timeout` seconds pass.
        Call from one thread only (a server's watcher); a lost listening connection is reopened on
        the next call, and until then this sleeps: the caller polls."""
        try:
            if self._listen is None:
                self._listen = _connect(self.url)
                self._listen.execute(f"LISTEN {CHANNEL}")
            for _ in self._listen.notifies(timeout=timeout, stop_after=1):
                pass
        except psycopg.Error:
            with contextlib.suppress(psycopg.Error):
                if self._listen is not None:
                    self._listen.close()
            self._listen = None
            time.sleep(timeout)

    # ------------------------------------------------------------------ writes
    def set_base(self, base: BaseFingerprint) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO wrag_meta VALUES ('base', %s) ON CONFLICT (key) DO UPDATE SET value = "
                      "EXCLUDED.value", (json.dumps(base.to_dict()),))

    def add(self, entries: Sequence[Entry], vecs: np.ndarray, texts: Sequence[np.ndarray],
            replace: Sequence[str], base: BaseFingerprint | None,
            payloads: Sequence[bytes] | None = None) -> tuple[int, list[int]]:
        if payloads is None or len(payloads) != len(entries):
            raise StoreError("a database store needs each new shard's file bytes")
        now = now_utc()
        with self._commit() as (c, gen):
            if base is not None:
                c.execute("INSERT INTO wrag_meta VALUES ('base', %s) ON CONFLICT (key) DO UPDATE SET value = "
                          "EXCLUDED.value", (json.dumps(base.to_dict()),))
            old = [r[0] for r in c.execute("SELECT file FROM wrag_shards WHERE id = ANY(%s)", (list(replace),))]
            c.execute("DELETE FROM wrag_shards WHERE id = ANY(%s)", (list(replace),))
            for e, data in zip(entries, payloads):
                c.execute("INSERT INTO wrag_files VALUES (%s, %s) ON CONFLICT (name) DO NOTHING", (e.file, data))
            fids = [c.execute(_INSERT, encode_entry(e, v, t, now)).fetchone()[0] for e, v, t in zip(entries, vecs, texts)]
            c.execute(_DROP_UNUSED, (old,))
            crash_point("add:before_commit")
        return gen, fids

    def remove(self, fid: int) -> int:
        with self._commit() as (c, gen):
            old = [r[0] for r in c.execute("DELETE FROM wrag_shards WHERE fid = %s RETURNING file", (fid,))]
            c.execute(_DROP_UNUSED, (old,))
            crash_point("remove:before_commit")
        return gen

    def reembed(self, embedder: Embedder, updates: Iterable[tuple[int, np.ndarray, np.ndarray, str]]) -> int:
        with self._commit() as (c, gen):
            with c.cursor() as cur:
                cur.executemany("UPDATE wrag_shards SET embedding = %s, text_vectors = %s, embed_source = %s "
                                "WHERE fid = %s", [(f32(v), f16(t), src, fid) for fid, v, t, src in updates])
            c.execute("DELETE FROM wrag_meta WHERE key = 'stale_heads'")
            for k, v in embedder_meta(embedder):
                c.execute("UPDATE wrag_meta SET value = %s WHERE key = %s", (v, k))
        return gen

    def close(self) -> None:
        with self._mu:
            for conn in (self._conn, self._lock_conn, self._listen):
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()


def _connect(url: str) -> psycopg.Connection:
    conn = psycopg.connect(url, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S, application_name="wrag")
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ  # snapshot() and writes
    return conn


def _dbname(url: str) -> str:
    params = conninfo_to_dict(url)
    return params.get("dbname") or params.get("user") or getpass.getuser()  # libpq's defaults


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


