"""The catalog: the store's source of truth, and the interface ShardStore reads and writes it through.

The catalog holds one row per shard (its metadata, its index vector — the relevance head of
relevance.py — and its text vectors) and the store's own facts:
the base model it is bound to, the embedder that made its vectors, an epoch and a generation.

- Each row has a `fid`, the shard's id in the FAISS index. fids are never reused and are assigned
  in commit order, so the rows committed after a reader last looked all have fids above the
  largest it knows: an index catches up by a diff (index.py).
- The generation counts the commits that change the rows; `generation()` is what a reader polls.
- The epoch changes when every vector is replaced (reindex): an index of another epoch is rebuilt.

Every write runs under `write_lock()`, which excludes the writers of all processes, and is one
transaction that bumps the generation, so a reader sees a write entirely or not at all.
SqliteCatalog (sqlite_catalog.py, a store folder) and PgCatalog (pg_catalog.py, a PostgreSQL
database that holds the shard files too) implement the interface.
"""
from __future__ import annotations

import abc
import json
import secrets
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Sequence

import numpy as np

from ..embed import Embedder
from ..fingerprint import BaseFingerprint


@dataclass(frozen=True)
class Entry:
    """What the catalog records about one shard, besides its embedding."""
    id: str
    file: str  # the shard's file in the store's shards/ folder
    name: str
    description: str
    samples: list[str]
    queries: list[str]  # requests the shard should serve, as users phrase them
    rank: int
    targets: list[str]  # module names
    layers: list[int]
    bytes: int  # file size
    provenance: dict
    allow_attention: bool
    embed_source: str  # the texts embedded ("description+samples+queries", ...) or "given"


@dataclass(frozen=True)
class Row(Entry):
    """An entry as stored: with the fid and the time the catalog gave it."""
    fid: int
    added_at: str  # ISO 8601 UTC


@dataclass(frozen=True)
class CatalogState:
    """The store's own facts, as of one read."""
    generation: int
    epoch: str
    embedder_name: str
    embedder_dim: int
    base: BaseFingerprint | None
    stale_heads: bool = False  # rows of an older schema whose heads `reindex` must fit


class Catalog(abc.ABC):
    """Rows, embeddings, base, embedder, generation; one write at a time across processes."""

    # Whether the catalog holds the shard files' bytes itself (a database store: `add` takes them
    # as payloads, `file_bytes` gives them back) or they live in the store's folder beside it.
    holds_files: bool = False

    # ------------------------------------------------------------------ locks
    @abc.abstractmethod
    def write_lock(self, wait: bool = True) -> AbstractContextManager[bool]:
        """Exclusive across threads and processes while held; yields whether it is held (always
        when wait). Every write method below is called under it."""

    @abc.abstractmethod
    def snapshot(self) -> AbstractContextManager[None]:
        """The reads inside the block see one state of the catalog."""

    # ------------------------------------------------------------------ reads
    @abc.abstractmethod
    def state(self) -> CatalogState: ...

    @abc.abstractmethod
    def generation(self) -> int:
        """The current generation; cheap when nothing was committed since the last call."""

    @abc.abstractmethod
    def rows(self, ids: Sequence[str] | None = None) -> list[Row]:
        """All rows, oldest first, or the rows of those of `ids` that the catalog holds."""

    @abc.abstractmethod
    def fids(self, after: int = 0) -> np.ndarray:
        """The fids (int64, ascending) of the rows with fid > after."""

    @abc.abstractmethod
    def ids(self, fids: Sequence[int] | None = None) -> dict[int, str]:
        """fid -> shard id of the rows `fids` that the catalog holds (of every row when None)."""

    @abc.abstractmethod
    def count(self) -> int: ...

    @abc.abstractmethod
    def vectors(self, fids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The index vectors of rows `fids`: (vectors (n, dim + 1) float32, their fids (n,) int64)."""

    @abc.abstractmethod
    def candidates(self, fids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """What a search rescores, in one query: vectors(fids) and the shard ids of those rows."""

    @abc.abstractmethod
    def text_vectors(self, fids: Sequence[int]) -> dict[int, np.ndarray]:
        """fid -> the text vectors (m, dim) float32 of those rows `fids` that have them."""

    @abc.abstractmethod
    def files(self) -> set[str]:
        """The file names of all rows."""

    @abc.abstractmethod
    def bad_embeddings(self, dim: int) -> list[tuple[str, int]]:
        """(shard id, size in bytes) of the rows whose index vector is not `dim` float32 values."""

    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes the catalog takes on disk."""

    def wait(self, timeout: float) -> None:
        """Block until another process may have committed, or `timeout` seconds pass (the default
        has no way to hear of commits: it sleeps, and the caller polls)."""
        time.sleep(timeout)

    # ------------------------------------------------------------------ the files (holds_files only)
    def file_names(self) -> set[str]:
        """The names of the files the catalog holds."""
        raise NotImplementedError

    def file_bytes(self, name: str) -> bytes | None:
        """The bytes of file `name`, None if the catalog holds no such file."""
        raise NotImplementedError

    def files_nbytes(self) -> int:
        """Bytes the held files take."""
        raise NotImplementedError

    # ------------------------------------------------------------------ writes (under write_lock)
    @abc.abstractmethod
    def set_base(self, base: BaseFingerprint) -> None:
        """Record `base` as the store's base model (the generation stays)."""

    @abc.abstractmethod
    def add(self, entries: Sequence[Entry], vecs: np.ndarray, texts: Sequence[np.ndarray],
            replace: Sequence[str], base: BaseFingerprint | None,
            payloads: Sequence[bytes] | None = None) -> tuple[int, list[int]]:
        """One transaction: delete the rows of ids `replace`, insert `entries` with their index
        vectors (n, dim + 1) and text vectors (m_i, dim), record `base` unless None; a catalog that
        `holds_files` also stores each entry's file bytes `payloads[i]` and drops the files no row
        names any more. Returns (new generation, the new rows' fids)."""

    @abc.abstractmethod
    def remove(self, fid: int) -> int:
        """Delete row `fid`. Returns the new generation."""

    @abc.abstractmethod
    def reembed(self, embedder: Embedder, updates: Iterable[tuple[int, np.ndarray, np.ndarray, str]]) -> int:
        """Replace every row's index vector, text vectors and embed_source by `updates` (fid,
        vector, text vectors, source), record `embedder`, start a new epoch, clear stale_heads.
        Returns the new generation."""

    @abc.abstractmethod
    def close(self) -> None: ...


# ---------------------------------------------------------------------- the meta table (every SQL catalog)
def embedder_meta(embedder: Embedder) -> list[tuple[str, str]]:
    """The meta rows that bind a store to `embedder`, with a new epoch (every vector is new)."""
    return [("embedder_name", embedder.name), ("embedder_dim", str(embedder.dim)), ("epoch", secrets.token_hex(16))]


def new_meta(embedder: Embedder, schema_version: int) -> list[tuple[str, str]]:
    """The meta rows of a new, empty store."""
    return [("schema_version", str(schema_version)), ("generation", "0"), *embedder_meta(embedder)]


def state_from_meta(meta: dict[str, str]) -> CatalogState:
    """The CatalogState that the meta table's key -> value rows describe."""
    base = BaseFingerprint.from_dict(json.loads(meta["base"])) if "base" in meta else None
    return CatalogState(generation=int(meta["generation"]), epoch=meta["epoch"], base=base,
                        embedder_name=meta["embedder_name"], embedder_dim=int(meta["embedder_dim"]),
                        stale_heads=meta.get("stale_heads") == "1")


# ---------------------------------------------------------------------- row encoding (every SQL catalog)
COLUMNS = ("fid, id, file, name, description, samples, queries, rank, targets, layers, bytes, provenance, "
           "allow_attention, embed_source, added_at")  # what decode_row reads, in order
INSERTED = ("id, file, name, description, samples, queries, rank, targets, layers, bytes, provenance, "
            "allow_attention, embed_source, added_at, embedding, text_vectors")  # what encode_entry gives


def now_utc() -> str:
    """The time a row is added: ISO 8601 UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def f32(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype=np.float32).tobytes()


def f16(t: np.ndarray) -> bytes:
    return np.ascontiguousarray(t, dtype=np.float16).tobytes()


def encode_entry(e: Entry, vec: np.ndarray, texts: np.ndarray, added_at: str) -> tuple:
    """The INSERTED values of one row: lists and dicts as JSON text, the head as float32 bytes,
    the text vectors as float16 bytes."""
    return (e.id, e.file, e.name, e.description, json.dumps(list(e.samples)), json.dumps(list(e.queries)),
            e.rank, json.dumps(e.targets), json.dumps(e.layers), e.bytes, json.dumps(e.provenance),
            bool(e.allow_attention), e.embed_source, added_at, f32(vec), f16(texts))


def decode_vectors(rows: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (n, d) float32, fids (n,) int64) from (fid, float32 bytes, ...) rows; (0, 0) when none."""
    if not rows:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
    return np.ascontiguousarray(vecs), np.asarray([r[0] for r in rows], dtype=np.int64)


def decode_candidates(rows: Sequence[tuple[int, bytes, str]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """candidates() from (fid, float32 bytes, shard id) rows."""
    return (*decode_vectors(rows), [r[2] for r in rows])


def decode_row(r: tuple) -> Row:
    """A Row from the COLUMNS of one row."""
    fid, sid, file, name, desc, samples, queries, rank, targets, layers, nbytes, prov, attn, src, added = r
    return Row(id=sid, file=file, name=name, description=desc, samples=json.loads(samples),
               queries=json.loads(queries), rank=rank,
               targets=json.loads(targets), layers=json.loads(layers), bytes=nbytes,
               provenance=json.loads(prov), allow_attention=bool(attn), embed_source=src, fid=fid,
               added_at=added)
