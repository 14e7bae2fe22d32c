"""The shard store: shard files, a SQLite catalog and a FAISS index of shard embeddings, no server.

Layout of a store directory:
    catalog.sqlite   SQLite (WAL). Table `shards`: one row per shard with its metadata AND its
                     embedding (float32 blob). Table `meta`: base fingerprint, embedder name/dim,
                     generation counter, index epoch. The catalog is the source of truth.
    shards/<id>.safetensors   the shard files (after an overwrite, `<id>@<token>.safetensors`;
                     '@' cannot occur in an id, so names never collide)
    index.faiss      a cache of the FAISS index: header (magic, epoch, generation, ntotal, dim) +
                     faiss.serialize_index bytes. Rebuilt or updated from the catalog when stale.
    .lock            fcntl.flock target that serialises writers across processes

Retrieval. Every vector is L2-normalised, so the inner product is the cosine:
    score(q, s) = e(q)·v_s = cos(e(q), v_s)
and search returns the k shards of highest score (IndexIDMap2 over IndexFlatIP: exact search).

Shard embedding rule (`shard_embedding`): with d = description.strip() and S = the first 32
non-blank samples, e(·) the embedder (unit rows),
    v = normalize(½·e(d) + ½·mean_i e(S_i))   if d and S
    v = e(d)                                  if only d
    v = normalize(mean_i e(S_i))              if only S
i.e. the centroid of the texts where the description weighs as much as all samples together (so
many samples cannot drown the author's description). No text at all is refused: the text is also
what `reindex` re-embeds when the store moves to another embedder.

Crash safety (a SIGKILL at any instant leaves a consistent store). A write runs under a threading
lock + an exclusive flock on `.lock`:
    1. write each new shard file atomically (Shard.save: temp file, fsync, rename) + fsync the dir;
    2. ONE SQLite transaction inserts the rows (metadata + embedding), deletes replaced rows and
       bumps the generation; the commit is the moment the add happens;
    3. unlink files of replaced/removed rows; update the in-memory index.
A kill before 2 commits leaves only unreferenced files, which the next opener deletes (under the
flock, so never a file a live writer is about to commit). A kill after 2 leaves the new rows with
their files and, at worst, stale files (deleted the same way). The FAISS file is only a cache keyed
by (epoch, generation); faiss ids are the catalog's AUTOINCREMENT `fid`s, never reused, so a stale
cache is brought up to date by a diff against the catalog (remove gone ids, add new rows' vectors).

Readers in other processes call `refresh()`: `PRAGMA data_version` (changes only when another
connection committed) makes the no-change path a few microseconds.
"""
from __future__ import annotations

import contextlib
import difflib
import fcntl
import json
import os
import re
import secrets
import sqlite3
import struct
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .embed import Embedder, get_embedder, normalize_rows
from .errors import StoreError, WragError
from .fingerprint import BaseFingerprint
from .shard import Shard, id_problem, load_shard

SCHEMA_VERSION = 1
CATALOG = "catalog.sqlite"
INDEX = "index.faiss"
LOCK = ".lock"
SHARDS = "shards"
MAX_SAMPLES = 32  # samples embedded per shard (bounded cost per add)
_HEADER = struct.Struct("<8s32sqqi")  # magic, epoch (hex), generation, ntotal, dim
_MAGIC = b"WRAGIDX1"
# FAISS threads for small query batches (retrieval is nq≈1): OpenMP fan-out costs more than the
# 10k×384 dot products it splits and, on a busy host, makes p99 spike ~10× (a descheduled worker
# stalls the barrier). Measured on 2 shared cores: p50 0.6→0.23 ms, p99 61→4.5 ms at 10k shards.
FAISS_THREADS = int(os.environ.get("WRAG_FAISS_THREADS", "1"))
_BIG_BATCH = 32  # query batches at least this large use all cores
_CRASH_ENV = "WRAG_STORE_CRASH_AT"  # test hook: name of a point where the writer stops and sleeps
_CRASH_SIGNAL_ENV = "WRAG_STORE_CRASH_SIGNAL"  # file touched when the writer reaches that point
_URL = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://")  # a scheme, as in postgresql://host/db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards (
    fid INTEGER PRIMARY KEY AUTOINCREMENT,   -- the FAISS id (AUTOINCREMENT: never reused)
    id TEXT NOT NULL UNIQUE,
    file TEXT NOT NULL UNIQUE,               -- name inside shards/
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    samples TEXT NOT NULL,                   -- JSON list
    rank INTEGER NOT NULL,
    targets TEXT NOT NULL,                   -- JSON list of module names
    layers TEXT NOT NULL,                    -- JSON list of layer indices
    bytes INTEGER NOT NULL,                  -- file size
    provenance TEXT NOT NULL,                -- JSON
    allow_attention INTEGER NOT NULL,
    embed_source TEXT NOT NULL,              -- description | samples | description+samples | given
    added_at TEXT NOT NULL,                  -- ISO 8601 UTC
    embedding BLOB NOT NULL                  -- float32 (dim,), unit norm
);
"""
_META_COLS = ("fid, id, file, name, description, samples, rank, targets, layers, bytes, provenance, "
              "allow_attention, embed_source, added_at")


def store_location(value: str | os.PathLike) -> Path:
    """The folder a store location names. The one place that reads a location (ShardStore, the
    CLI's --store, $WRAG_STORE): a value that looks like a URL is refused rather than taken for a
    folder named "postgresql:"; other backends (PostgreSQL) will be dispatched on the scheme here."""
    if m := _URL.match(os.fspath(value)):
        raise StoreError(f"store URLs with scheme {m.group(1)!r} are not supported; a store is a folder "
                         f"path (got {os.fspath(value)!r})")
    return Path(value).expanduser()


def default_store_path() -> Path:
    """$WRAG_STORE, else ~/.local/share/wrag/store."""
    env = os.environ.get("WRAG_STORE")
    return store_location(env) if env else Path.home() / ".local" / "share" / "wrag" / "store"


def _crash_point(name: str) -> None:
    """Test hook: stop here (sleep) when $WRAG_STORE_CRASH_AT names this point, so a test can
    SIGKILL the process at a known step. One dict lookup when unused."""
    if os.environ.get(_CRASH_ENV) == name:
        sig = os.environ.get(_CRASH_SIGNAL_ENV)
        if sig:
            Path(sig).write_text(name)
        time.sleep(3600)


# ------------------------------------------------------------------------------ embedding rule
def _shard_texts(description: str, samples: Sequence[str]) -> tuple[str, list[str]]:
    d = (description or "").strip()
    s = [t.strip() for t in (samples or []) if isinstance(t, str) and t.strip()][:MAX_SAMPLES]
    return d, s


def embed_source(description: str, samples: Sequence[str]) -> str:
    d, s = _shard_texts(description, samples)
    return "+".join(p for p, ok in (("description", d), ("samples", s)) if ok)


def shard_embeddings(embedder: Embedder, items: Sequence[tuple[str, Sequence[str]]]) -> np.ndarray:
    """(description, samples) pairs -> (n, dim) float32 unit rows, one embedder call for all texts.

    v = normalize(½·e(d) + ½·mean_i e(s_i)), or the one part present (see module docstring).
    """
    texts: list[str] = []
    spans = []
    for desc, samples in items:
        d, s = _shard_texts(desc, samples)
        if not d and not s:
            raise StoreError("empty description and no samples: nothing to embed")
        i = len(texts)
        texts.extend(([d] if d else []) + s)
        spans.append((i, bool(d), len(s)))
    e = np.asarray(embedder.embed(texts), dtype=np.float32)  # (len(texts), dim)
    if e.shape != (len(texts), embedder.dim):
        raise StoreError(f"embedder {embedder.name!r} returned shape {e.shape}, expected "
                         f"({len(texts)}, {embedder.dim})")
    out = np.empty((len(items), embedder.dim), dtype=np.float32)
    for row, (i, has_d, ns) in enumerate(spans):
        parts = []
        if has_d:
            parts.append(e[i])
        if ns:
            j = i + int(has_d)
            parts.append(normalize_rows(e[j:j + ns].mean(axis=0))[0])
        out[row] = parts[0] if len(parts) == 1 else 0.5 * (parts[0] + parts[1])
    return normalize_rows(out)


def shard_embedding(embedder: Embedder, description: str, samples: Sequence[str] = ()) -> np.ndarray:
    """One shard's embedding (dim,) float32, unit norm."""
    return shard_embeddings(embedder, [(description, samples)])[0]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# ------------------------------------------------------------------------------------- the store
class ShardStore:
    """Shards for one base model, searchable by text. Safe across threads and processes."""

    def __init__(self, root: str | os.PathLike | None = None, embedder: Embedder | None = None,
                 create: bool = True):
        import faiss  # fail early with a clear ImportError if missing

        self._faiss = faiss

        self.root = store_location(root) if root is not None else default_store_path()
        self._mu = threading.RLock()  # guards the connection, the index and the id map
        self._wmu = threading.Lock()  # serialises writer threads (flock does not, within a process)
        catalog = self.root / CATALOG
        if not catalog.exists():
            if not create:
                raise StoreError(f"no shard store at {self.root} (create one with `wrag store init` or "
                                 f"ShardStore.init)")
            if self.root.exists() and not self.root.is_dir():
                raise StoreError(f"store path {self.root} exists and is not a directory")
            (self.root / SHARDS).mkdir(parents=True, exist_ok=True)
        (self.root / SHARDS).mkdir(exist_ok=True)
        self._lockfd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        self._conn = sqlite3.connect(str(catalog), isolation_level=None, check_same_thread=False,
                                     timeout=60.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives any process crash; only an OS crash/power loss may
        # lose the last commits, never consistency (files are written before their rows).
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._init_schema(embedder)
        self._embedder = embedder
        self._index = None
        self._fid2id: dict[int, str | None] = {}
        self._generation = -1
        self._data_version = None
        self._epoch = ""
        self._persisted = None  # (epoch, generation) the index file holds
        self._cleanup()
        self._open_index()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def init(cls, root: str | os.PathLike | None = None, base: BaseFingerprint | None = None,
             embedder: Embedder | None = None) -> "ShardStore":
        """Create (or open) a store and bind it to `base` (StoreError if bound to another base)."""
        store = cls(root, embedder=embedder, create=True)
        if base is not None:
            store.bind_base(base)
        return store

    def bind_base(self, base: BaseFingerprint) -> None:
        """Bind the store to `base` if it has no base yet, else record the optional facts
        (name_or_path, weight_rms) its record lacks; StoreError if it is bound to another base.
        Recorded facts are never replaced."""
        with self._write_lock():
            with self._tx() as c:
                cur = self._read_base(c)
                if cur is not None and (why := cur.mismatch(base)) is not None:
                    raise StoreError(f"store {self.root} is bound to another base model: {why}")
                new = base if cur is None else cur.merged(base)
                if cur is None or new.to_dict() != cur.to_dict():
                    c.execute("INSERT OR REPLACE INTO meta VALUES ('base', ?)", (json.dumps(new.to_dict()),))
                self._base = new

    def _init_schema(self, embedder: Embedder | None) -> None:
        try:  # an existing store: read only (no lock, no write transaction)
            meta = dict(self._conn.execute("SELECT key, value FROM meta"))
        except sqlite3.OperationalError:
            meta = {}
        if "epoch" not in meta:  # new (or half-created) store: create under the writer lock
            with self._write_lock(), self._tx() as c:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                emb = embedder or get_embedder()
                for k, v in (("schema_version", str(SCHEMA_VERSION)), ("generation", "0"),
                             ("embedder_name", emb.name), ("embedder_dim", str(emb.dim)),
                             ("epoch", secrets.token_hex(16))):
                    c.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (k, v))
                meta = dict(c.execute("SELECT key, value FROM meta"))
        if int(meta["schema_version"]) != SCHEMA_VERSION:
            raise StoreError(f"store {self.root} has catalog schema {meta['schema_version']}, this build "
                             f"reads schema {SCHEMA_VERSION}")
        self._emb_name, self._emb_dim = meta["embedder_name"], int(meta["embedder_dim"])
        self._base = BaseFingerprint.from_dict(json.loads(meta["base"])) if "base" in meta else None
        if embedder is not None:
            self._check_embedder(embedder)

    def _check_embedder(self, emb: Embedder) -> None:
        if (emb.name, int(emb.dim)) != (self._emb_name, self._emb_dim):
            raise StoreError(
                f"store {self.root} was indexed with embedder {self._emb_name!r} (dim {self._emb_dim}); "
                f"refusing to mix in embedder {emb.name!r} (dim {emb.dim}): vectors of different "
                f"embedders are not comparable. Open the store without an embedder, or re-embed every "
                f"shard with ShardStore.reindex(embedder).")

    # ------------------------------------------------------------------ locks and transactions
    @contextlib.contextmanager
    def _write_lock(self):
        """Exclusive across threads (threading.Lock) and processes (flock on .lock)."""
        with self._wmu:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lockfd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _tx(self, mode: str = "IMMEDIATE"):
        with self._mu:
            self._conn.execute(f"BEGIN {mode}")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # ------------------------------------------------------------------ public properties
    @property
    def base(self) -> BaseFingerprint | None:
        return self._base

    @property
    def generation(self) -> int:
        """Catalog generation this instance reflects; bumps on every add/remove/reindex commit."""
        return self._generation

    @property
    def embedder(self) -> Embedder:
        """The embedder that built this store's index (the registry's, loaded lazily, if none given)."""
        if self._embedder is None:
            try:
                emb = get_embedder(self._emb_name)
            except WragError as e:
                raise StoreError(f"store {self.root} was indexed with embedder {self._emb_name!r}, which "
                                 f"this process cannot provide: {e}") from e
            self._check_embedder(emb)
            self._embedder = emb
        return self._embedder

    @property
    def embedder_name(self) -> str:
        return self._emb_name

    @property
    def dim(self) -> int:
        return self._emb_dim

    def __len__(self) -> int:
        with self._mu:
            return len(self._fid2id)

    def __contains__(self, shard_id: str) -> bool:
        return self._row(shard_id, required=False) is not None

    def __enter__(self) -> "ShardStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardStore({str(self.root)!r}, shards={len(self)}, generation={self._generation})"

    def close(self) -> None:
        """Persist the index cache if it is behind, and release the catalog connection."""
        if self._conn is None:
            return
        if self._persisted != (self._epoch, self._generation):
            with contextlib.suppress(OSError):
                self._persist_index()
        with self._mu:
            if self._conn is None:
                return
            self._conn.close()
            self._conn = None
            os.close(self._lockfd)

    # ------------------------------------------------------------------ writes
    def add(self, shard: Shard, allow_attention: bool = False, overwrite: bool = False,
            embedding: np.ndarray | None = None) -> dict:
        """Validate, store and index one shard; returns its meta row.

        embedding: optional precomputed (dim,) vector (e.g. bulk imports); it is normalised. The
        shard still needs a description or samples (they are what `reindex` re-embeds).
        """
        embs = None if embedding is None else np.asarray(embedding, dtype=np.float32).reshape(1, -1)
        return self.add_many([shard], allow_attention=allow_attention, overwrite=overwrite,
                             embeddings=embs)[0]

    def add_many(self, shards: Iterable[Shard], allow_attention: bool = False, overwrite: bool = False,
                 embeddings: np.ndarray | None = None) -> list[dict]:
        """Add shards all-or-nothing in one transaction (one generation bump); embeddings (n, dim)
        optional. Texts are embedded in one batched call. Returns the meta rows in order."""
        shards = list(shards)
        if not shards:
            return []
        # --- checks that need no lock (cheap to fail early, nothing touched yet)
        for sh in shards:
            if not isinstance(sh, Shard):
                raise StoreError(f"expected a Shard, got {type(sh).__name__}")
        with self._mu:
            base = self._read_base(self._conn)  # the catalog's: another process may have bound it
        seen = set()
        for sh in shards:
            self._check_base(sh, base or shards[0].base)  # an empty store takes the first one's base
            # ShardError: ids, texts, shapes, NaN/Inf, delta magnitudes (vs the store's base), targets
            sh.validate(allow_attention, base=base)
            if sh.id in seen:
                raise StoreError(f"shard id {sh.id!r} appears twice in one add")
            seen.add(sh.id)
            if not embed_source(sh.description, sh.samples):
                raise StoreError(f"shard {sh.id!r} has an empty description and no samples: the store "
                                 f"retrieves shards by embedding these texts; give it a description "
                                 f"or sample prompts")
        if embeddings is not None:
            vecs = np.asarray(embeddings, dtype=np.float32)
            if vecs.ndim != 2 or vecs.shape != (len(shards), self._emb_dim):
                raise StoreError(f"embeddings have shape {tuple(vecs.shape)}, expected "
                                 f"({len(shards)}, {self._emb_dim}) for embedder {self._emb_name!r}")
            if not np.isfinite(vecs).all():
                raise StoreError("embeddings contain NaN or Inf values")
            if (np.linalg.norm(vecs, axis=1) == 0).any():
                raise StoreError("an embedding is the zero vector")
            vecs = normalize_rows(vecs)
            sources = ["given"] * len(shards)
        else:
            vecs = shard_embeddings(self.embedder, [(s.description, s.samples) for s in shards])
            sources = [embed_source(s.description, s.samples) for s in shards]

        with self._write_lock():
            with self._mu:
                base = self._read_base(self._conn)
                old = self._existing(self._conn, [s.id for s in shards])
            for sh in shards:
                self._check_base(sh, base or shards[0].base)
            if old and not overwrite:
                raise StoreError(f"shard id {sorted(old)[0]!r} already exists in store {self.root}; "
                                 f"remove it first or pass overwrite=True (--overwrite)")
            written: list[Path] = []
            try:
                _crash_point("add:before_files")
                files = []
                for sh in shards:
                    fname = self._file_name(sh.id, old.get(sh.id, (None, None))[1])
                    path = self.root / SHARDS / fname
                    sh.save(path)
                    written.append(path)
                    files.append((fname, path.stat().st_size))
                    _crash_point("add:file_written")
                self._fsync_dir(self.root / SHARDS)
                now = _now()
                with self._tx() as c:
                    gen0 = int(c.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
                    # bind an empty store to the shards' base; fill in facts its record lacks
                    new_base = base or shards[0].base
                    for sh in shards:
                        new_base = new_base.merged(sh.base)
                    if base is None or new_base.to_dict() != base.to_dict():
                        c.execute("INSERT OR REPLACE INTO meta VALUES ('base', ?)",
                                  (json.dumps(new_base.to_dict()),))
                        base = new_base
                    if old:
                        c.executemany("DELETE FROM shards WHERE id = ?", [(i,) for i in old])
                    new_fids = []
                    for sh, (fname, nbytes), v, src in zip(shards, files, vecs, sources):
                        cur = c.execute(
                            "INSERT INTO shards (id, file, name, description, samples, rank, targets, layers,"
                            " bytes, provenance, allow_attention, embed_source, added_at, embedding)"
                            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                            (sh.id, fname, sh.name or sh.id, sh.description, json.dumps(list(sh.samples)),
                             sh.rank, json.dumps(sh.target_modules),
                             json.dumps(sorted({l for l, _ in sh.factors})), nbytes,
                             json.dumps(sh.provenance), int(allow_attention), src, now,
                             np.ascontiguousarray(v, dtype=np.float32).tobytes()))
                        new_fids.append(cur.lastrowid)
                    c.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(gen0 + 1),))
                    _crash_point("add:before_commit")
            except BaseException:
                for p in written:  # nothing committed: the new files are garbage
                    with contextlib.suppress(OSError):
                        p.unlink()
                raise
            _crash_point("add:after_commit")
            self._base = base
            for sid, (fid, fname) in old.items():
                if fname not in {f for f, _ in files}:
                    with contextlib.suppress(OSError):
                        (self.root / SHARDS / fname).unlink()
            with self._mu:
                self._apply_write(gen0, [fid for fid, _ in old.values()],
                                  list(zip(new_fids, [s.id for s in shards])), vecs)
            return [self.get_meta(s.id) for s in shards]

    def remove(self, shard_id: str) -> None:
        """Delete a shard (row, index entry, file). StoreError if unknown."""
        with self._write_lock():
            row = self._row(shard_id)
            fid, fname = row["fid"], row["file"]
            with self._tx() as c:
                gen0 = int(c.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
                c.execute("DELETE FROM shards WHERE fid = ?", (fid,))
                c.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(gen0 + 1),))
                _crash_point("remove:before_commit")
            _crash_point("remove:after_commit")
            with contextlib.suppress(OSError):
                (self.root / SHARDS / fname).unlink()
            with self._mu:
                self._apply_write(gen0, [fid], [], None)

    def reindex(self, embedder: Embedder | None = None) -> int:
        """Re-embed every shard's texts with `embedder` (default: the store's) and switch the store to
        it. Precomputed ('given') embeddings are replaced by text embeddings. Returns the count."""
        emb = embedder or self.embedder
        with self._write_lock():
            with self._mu:
                rows = self._conn.execute("SELECT fid, description, samples FROM shards ORDER BY fid").fetchall()
            vecs = (shard_embeddings(emb, [(d, json.loads(s)) for _, d, s in rows]) if rows
                    else np.zeros((0, emb.dim), np.float32))
            with self._tx() as c:
                gen0 = int(c.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
                c.executemany("UPDATE shards SET embedding = ?, embed_source = ? WHERE fid = ?",
                              [(v.tobytes(), embed_source(d, json.loads(s)), fid)
                               for (fid, d, s), v in zip(rows, vecs)])
                for k, v in (("embedder_name", emb.name), ("embedder_dim", str(emb.dim)),
                             ("epoch", secrets.token_hex(16)), ("generation", str(gen0 + 1))):
                    c.execute("UPDATE meta SET value = ? WHERE key = ?", (v, k))
            self._emb_name, self._emb_dim, self._embedder = emb.name, int(emb.dim), emb
            with self._mu:
                self._sync()
        self._persist_index()
        return len(rows)

    # ------------------------------------------------------------------ reads
    def list(self) -> list[dict]:
        """Meta rows of all shards, oldest first."""
        with self._mu:
            rows = self._conn.execute(f"SELECT {_META_COLS} FROM shards ORDER BY fid").fetchall()
        return [self._meta_row(r) for r in rows]

    def get_meta(self, shard_id: str) -> dict:
        return self._meta_row(self._row(shard_id))

    def load(self, shard_id: str) -> Shard:
        """The shard, read from its file (validated)."""
        row = self._row(shard_id)
        path = self.root / SHARDS / row["file"]
        if not path.exists():
            raise StoreError(f"shard {shard_id!r} has no file {path} (removed by another process?)")
        return load_shard(path, allow_attention=bool(row["allow_attention"]))

    def path(self, shard_id: str) -> Path:
        """Path of the shard's safetensors file."""
        return self.root / SHARDS / self._row(shard_id)["file"]

    def search(self, text: str, k: int = 5) -> list[tuple[str, float]]:
        """(id, cosine score) of the k shards nearest to `text`, best first."""
        return self.search_many([text], k)[0]

    def search_many(self, texts: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
        """One batched embedding call for all texts, one FAISS search."""
        texts = list(texts)
        if not texts:
            return []
        return self._search(self.embedder.embed(texts), k)

    def search_vector(self, vec: np.ndarray, k: int = 5) -> list[tuple[str, float]]:
        """Search with a query embedding vec (dim,) (normalised here)."""
        q = np.asarray(vec, dtype=np.float32).reshape(1, -1)
        return self._search(q, k)[0]

    def search_vectors(self, vecs: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """Search with query embeddings vecs (n, dim)."""
        return self._search(np.asarray(vecs, dtype=np.float32), k)

    def _search(self, q: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        # q: (n, dim)
        if q.ndim != 2 or q.shape[1] != self._emb_dim:
            raise StoreError(f"query vectors have shape {tuple(q.shape)}, store expects (n, {self._emb_dim})")
        if not np.isfinite(q).all():
            raise StoreError("query vector contains NaN or Inf values")
        q = normalize_rows(q)
        with self._mu:
            n = self._index.ntotal
            if n == 0 or k <= 0:
                return [[] for _ in range(len(q))]
            # per call: OpenMP thread counts are per calling thread (server threads differ)
            self._faiss.omp_set_num_threads(FAISS_THREADS if len(q) < _BIG_BATCH else (os.cpu_count() or 1))
            scores, fids = self._index.search(q, min(int(k), n))
            m = self._fid2id
            return [[(m[f], float(s)) for s, f in zip(srow, frow) if f >= 0 and m.get(f)]
                    for srow, frow in zip(scores.tolist(), fids.tolist())]

    def refresh(self) -> bool:
        """Catch up with commits of other processes/connections. True if anything changed.

        No-change path: one `PRAGMA data_version` (a few µs)."""
        with self._mu:
            dv = self._conn.execute("PRAGMA data_version").fetchone()[0]
            if dv == self._data_version:
                return False
            self._data_version = dv
            gen = int(self._conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
            if gen == self._generation:
                return False
            self._sync()
            return True

    def disk_usage(self) -> dict:
        """Bytes on disk: shard files, catalog (+WAL), index cache, and the total."""
        shards = sum(e.stat().st_size for e in os.scandir(self.root / SHARDS) if e.is_file())
        cat = sum(p.stat().st_size for p in self.root.glob(CATALOG + "*"))
        idx = (self.root / INDEX).stat().st_size if (self.root / INDEX).exists() else 0
        return {"shards": shards, "catalog": cat, "index": idx, "total": shards + cat + idx}

    def verify(self) -> list[str]:
        """Consistency problems (empty list = consistent): rows without files, files without rows,
        index entries != catalog rows, embeddings of the wrong size. Holds the writer lock, so a
        live writer's not-yet-committed file is never reported."""
        problems = []
        with self._write_lock(), self._mu:
            self._conn.execute("BEGIN")
            try:
                rows = self._conn.execute("SELECT fid, id, file, length(embedding) FROM shards").fetchall()
                gen = int(self._conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
            finally:
                self._conn.execute("COMMIT")
            files = {e.name for e in os.scandir(self.root / SHARDS)}
            for fid, sid, fname, nb in rows:
                if fname not in files:
                    problems.append(f"shard {sid!r}: file {fname} missing")
                if nb != 4 * self._emb_dim:
                    problems.append(f"shard {sid!r}: embedding has {nb} bytes, expected {4 * self._emb_dim}")
            for f in sorted(files - {r[2] for r in rows}):
                problems.append(f"orphan file shards/{f}")
            if gen == self._generation:
                idx_ids = set(self._index_ids())
                cat = {r[0] for r in rows}
                if idx_ids != cat or self._index.ntotal != len(rows):
                    problems.append(f"index holds {self._index.ntotal} entries, catalog {len(rows)} rows "
                                    f"({len(cat - idx_ids)} missing, {len(idx_ids - cat)} extra)")
                if {f: s for f, s in self._fid2id.items()} != {r[0]: r[1] for r in rows}:
                    problems.append("id map differs from catalog")
            else:
                problems.append(f"instance at generation {self._generation}, catalog at {gen}: call refresh()")
        return problems

    # ------------------------------------------------------------------ internals: catalog
    def _read_base(self, c) -> BaseFingerprint | None:
        r = c.execute("SELECT value FROM meta WHERE key='base'").fetchone()
        return BaseFingerprint.from_dict(json.loads(r[0])) if r else None

    def _check_base(self, sh: Shard, base: BaseFingerprint | None) -> None:
        if base is not None and (why := base.mismatch(sh.base)) is not None:
            raise StoreError(f"shard {sh.id!r} was made for a different base model than store {self.root}: "
                             f"{why}")

    def _existing(self, c, ids: list[str]) -> dict[str, tuple[int, str]]:
        out = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            q = f"SELECT id, fid, file FROM shards WHERE id IN ({','.join('?' * len(chunk))})"
            out.update({sid: (fid, f) for sid, fid, f in c.execute(q, chunk)})
        return out

    @staticmethod
    def _file_name(shard_id: str, old_file: str | None) -> str:
        plain = f"{shard_id}.safetensors"
        # An overwrite writes a new name so the old file stays valid until the new row commits.
        return plain if old_file != plain else f"{shard_id}@{secrets.token_hex(4)}.safetensors"

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _row(self, shard_id: str, required: bool = True):
        """The catalog row of `shard_id` (None if absent and not required). A string that is no
        valid id is refused (StoreError) or absent: it never reaches a query or a path."""
        if (why := id_problem(shard_id)) is not None:
            if required:
                raise StoreError(why)
            return None
        with self._mu:
            self._conn.row_factory = sqlite3.Row
            try:
                r = self._conn.execute(f"SELECT {_META_COLS} FROM shards WHERE id = ?", (shard_id,)).fetchone()
            finally:
                self._conn.row_factory = None
            if r is None and required:
                ids = [x[0] for x in self._conn.execute("SELECT id FROM shards")]
                near = difflib.get_close_matches(str(shard_id), ids, n=3)
                hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
                raise StoreError(f"unknown shard id {shard_id!r} in store {self.root}{hint}")
        return r

    def _meta_row(self, r) -> dict:
        (fid, sid, fname, name, desc, samples, rank, targets, layers, nbytes, prov, attn, src,
         added) = tuple(r)
        return {"id": sid, "name": name, "description": desc, "samples": json.loads(samples),
                "rank": rank, "targets": json.loads(targets), "layers": json.loads(layers),
                "bytes": nbytes, "added_at": added, "provenance": json.loads(prov),
                "allow_attention": bool(attn), "embed_source": src,
                "path": str(self.root / SHARDS / fname)}

    def _cleanup(self) -> None:
        """Delete shard files no row references and temp files, left by killed writers. Only when
        the flock is free: a live writer's not-yet-committed file must not be taken for garbage."""
        try:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        try:
            with self._mu:
                referenced = {r[0] for r in self._conn.execute("SELECT file FROM shards")}
            for e in os.scandir(self.root / SHARDS):
                if e.name not in referenced:
                    with contextlib.suppress(OSError):
                        os.unlink(e.path)
            for p in self.root.glob(INDEX + ".tmp-*"):
                with contextlib.suppress(OSError):
                    p.unlink()
        finally:
            fcntl.flock(self._lockfd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ internals: index cache
    def _new_index(self):
        import faiss

        return faiss.IndexIDMap2(faiss.IndexFlatIP(self._emb_dim))

    def _index_ids(self) -> np.ndarray:
        import faiss

        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def _open_index(self) -> None:
        with self._mu:
            loaded = self._read_index_file()
            if loaded is not None:
                self._index, self._epoch, gen = loaded
                self._persisted = (self._epoch, gen)
                self._fid2id = dict.fromkeys(self._index_ids().tolist())  # ids filled in by _sync
                self._ids_known = False
            else:
                self._index, self._fid2id, self._ids_known = self._new_index(), {}, True
            self._sync()
        if self._persisted != (self._epoch, self._generation):
            with contextlib.suppress(OSError):
                self._persist_index()

    def _read_index_file(self):
        import faiss

        path = self.root / INDEX
        try:
            data = path.read_bytes()
            magic, epoch, gen, ntotal, dim = _HEADER.unpack_from(data)
            if magic != _MAGIC or dim != self._emb_dim:
                return None
            # deserialize_index returns the owning, already downcast object (wrapping it again with
            # downcast_index would leave a proxy to freed memory once the first one is collected).
            idx = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8, offset=_HEADER.size))
            if not isinstance(idx, faiss.IndexIDMap2) or idx.ntotal != ntotal or idx.d != dim:
                return None
            return idx, epoch.decode(), gen
        except Exception:  # noqa: BLE001 - missing, truncated or foreign file: it is only a cache
            return None

    def _persist_index(self) -> None:
        """Write the index cache atomically (temp file + rename) with the (epoch, generation) it
        reflects; under the flock so the opener's temp-file cleanup never races it.
        Lock order as in writers (_wmu, flock) and _mu only for the snapshot: call without _mu held."""
        import faiss

        with self._mu:
            blob = faiss.serialize_index(self._index)
            header = _HEADER.pack(_MAGIC, self._epoch.encode(), self._generation, self._index.ntotal,
                                  self._emb_dim)
            state = (self._epoch, self._generation)
        tmp = self.root / f"{INDEX}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        with self._wmu:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX)
            try:
                with open(tmp, "wb") as fh:
                    fh.write(header)
                    fh.write(blob.tobytes())
                _crash_point("index:tmp_written")
                os.replace(tmp, self.root / INDEX)
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                fcntl.flock(self._lockfd, fcntl.LOCK_UN)
        self._persisted = state

    def _sync(self) -> None:
        """Bring the in-memory index to the catalog's state by diff (caller holds _mu)."""
        c = self._conn
        self._data_version = c.execute("PRAGMA data_version").fetchone()[0]
        c.execute("BEGIN")  # one read snapshot for ids, vectors and meta
        try:
            meta = dict(c.execute("SELECT key, value FROM meta"))
            if (meta["embedder_name"], int(meta["embedder_dim"])) != (self._emb_name, self._emb_dim):
                self._emb_name, self._emb_dim = meta["embedder_name"], int(meta["embedder_dim"])
                self._embedder = None  # reindexed by another process: ours no longer fits
            if meta["epoch"] != self._epoch or self._index.d != self._emb_dim:
                self._index, self._fid2id, self._epoch = self._new_index(), {}, meta["epoch"]
                self._ids_known = True
            # Fast path (adds only): fids are AUTOINCREMENT and assigned in commit order, so rows
            # newer than ours have fid > our max; if known + newer == count(*), nothing was removed.
            newer = c.execute("SELECT fid, id FROM shards WHERE fid > ?",
                              (max(self._fid2id, default=0),)).fetchall()
            total = c.execute("SELECT count(*) FROM shards").fetchone()[0]
            if self._ids_known and len(self._fid2id) + len(newer) == total:
                cat = self._fid2id
                cat.update(newer)
                gone, new = [], [f for f, _ in newer]
            else:  # removals (or ids unknown after loading the cache file): full diff
                cat = dict(c.execute("SELECT fid, id FROM shards"))
                gone = [f for f in self._fid2id if f not in cat]
                new = [f for f in cat if f not in self._fid2id]
            if gone:
                self._index.remove_ids(np.asarray(gone, dtype=np.int64))
            if new:
                vecs, fids = self._fetch_vectors(c, new, total)
                self._index.add_with_ids(vecs, fids)
            self._fid2id, self._ids_known = cat, True
            self._generation = int(meta["generation"])
            self._base = BaseFingerprint.from_dict(json.loads(meta["base"])) if "base" in meta else None
        finally:
            c.execute("COMMIT")

    def _fetch_vectors(self, c, fids: list[int], total: int) -> tuple[np.ndarray, np.ndarray]:
        want = set(fids)
        if len(fids) * 4 > total:  # most rows are new: one scan beats many IN lists
            rows = [(f, e) for f, e in c.execute("SELECT fid, embedding FROM shards") if f in want]
        else:
            rows = []
            for i in range(0, len(fids), 500):
                chunk = fids[i:i + 500]
                rows += c.execute(f"SELECT fid, embedding FROM shards WHERE fid IN "
                                  f"({','.join('?' * len(chunk))})", chunk).fetchall()
        vecs = np.frombuffer(b"".join(e for _, e in rows), dtype=np.float32).reshape(len(rows), self._emb_dim)
        return np.ascontiguousarray(vecs), np.asarray([f for f, _ in rows], dtype=np.int64)

    def _apply_write(self, gen0: int, removed: list[int], added: list[tuple[int, str]],
                     vecs: np.ndarray | None) -> None:
        """After our own commit: update the index in place if we were current, else full diff."""
        if gen0 != self._generation:
            self._sync()
            return
        if removed:
            self._index.remove_ids(np.asarray(removed, dtype=np.int64))
            for f in removed:
                self._fid2id.pop(f, None)
        if added:
            self._index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32),
                                     np.asarray([f for f, _ in added], dtype=np.int64))
            self._fid2id.update(added)
        self._generation = gen0 + 1
