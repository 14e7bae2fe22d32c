"""ShardStore: shards for one base model, searchable by text; a library, no server.

A store is a folder (the default, below) or a PostgreSQL database (`postgresql://USER@HOST/DB`:
pg_catalog.py holds the rows and the shard files' bytes; each process keeps the FAISS index file and
the files it read in a local cache folder, location.cache_folder). A store folder holds
    catalog.sqlite  the catalog (sqlite_catalog.py): every shard's metadata, relevance head and
                    text vectors, the base model, the embedder, the generation. The source of truth.
    shards/         one safetensors file per shard (files.py)
    index.faiss     a cache of the FAISS index of the relevance heads (index.py)
    .lock           what the writers of all processes serialise on
ShardStore composes them and keeps them consistent. A search scores every shard by the
probability that the text belongs to its domain (relevance.py).

Crash safety: a SIGKILL at any instant leaves a consistent store. A write runs under the
catalog's write lock and
    1. writes each new shard file (atomically) and fsyncs the folder;
    2. commits ONE catalog transaction: rows in, replaced rows out, generation + 1. The commit is
       the moment the write happens;
    3. deletes the files of the replaced or removed rows, and updates the in-memory index.
A kill before 2 commits leaves only files no row names, which the next opener deletes (under the
write lock, so never a file a live writer is about to commit); a kill after 2 leaves, at worst,
such files too. The index file may lag the catalog by any number of commits: the opener diffs it.

Memory: the index is the only per-shard state a process holds (index.py: float32 heads up to
COMPRESS_AT shards, 4-bit codes past it), and it is loaded by the first search, so a process that
only loads shards by id (an engine core behind a front end) holds none.

Readers in other processes call `refresh()`; when nothing was committed it costs one cheap query.

Locks: `_mu` guards the in-memory index and what `_sync` sets. It is taken after the write lock,
never before: writing the index file takes the write lock, without `_mu`.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..embed import Embedder, get_embedder, normalize_rows
from ..errors import StoreError, WragError
from ..fingerprint import BaseFingerprint
from ..shard import Shard, id_problem, load_shard
from .catalog import Catalog, Entry, Row
from .crash import crash_point
from .embedding import centroid, embed_source, given_embeddings, stored_rows, text_vectors
from .files import SHARDS, CachedShardFiles, ShardFiles
from .index import INDEX, IndexCache
from .relevance import (NEIGHBOURS, background_vectors, cosine_head, fit_head, head_dim, probability,
                        query_rows)
from .location import cache_folder, default_store_path, redact, store_location
from .sqlite_catalog import SqliteCatalog

log = logging.getLogger("wrag.store")
HINT_MAX = 10_000  # stores up to this size suggest near ids for an unknown one
WATCH_WARN_EVERY_S = 60.0  # while the catalog cannot be read, the watcher warns this often
WATCH_POLL_S = 1.0  # how often a watcher looks when it hears nothing (the fallback of LISTEN/NOTIFY)


class ShardStore:
    """Shards for one base model, searchable by text. Safe across threads and processes."""

    def __init__(self, root: str | os.PathLike | None = None, embedder: Embedder | None = None,
                 create: bool = True):
        loc = store_location(root) if root is not None else default_store_path()
        self.location = loc  # what reopens the store: its folder, or its database URL
        self._mu = threading.RLock()  # guards the index and what _sync sets
        self._closed = False
        self._watcher: threading.Thread | None = None
        self._stopping = False  # close() asks the watcher to stop
        self._catalog: Catalog
        if isinstance(loc, str):  # a database URL
            from .pg_catalog import PgCatalog  # psycopg only where a database store is opened

            self.where, self.root = redact(loc), cache_folder(loc)  # root: the local cache
            self._catalog = PgCatalog(loc, embedder, create)
            self.root.mkdir(parents=True, exist_ok=True)
        else:
            self.where, self.root = str(loc), loc
            self._catalog = SqliteCatalog(loc, embedder, create)
        st = self._catalog.state()
        self._emb_name, self._emb_dim, self._base = st.embedder_name, st.embedder_dim, st.base
        if embedder is not None:
            self._check_embedder(embedder)
        self._embedder = embedder
        self._files = (CachedShardFiles(self.root / SHARDS, self._catalog) if self._catalog.holds_files
                       else ShardFiles(self.root / SHARDS))
        self._index = IndexCache(self.root / INDEX, head_dim(self._emb_dim))  # loaded by the first search
        self._gen = st.generation  # the catalog generation this instance reflects
        self._cleanup()
        if st.stale_heads:
            self._upgrade()
        with self._mu:
            self._sync()

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
        with self._catalog.write_lock():
            cur = self._catalog.state().base
            if cur is not None and (why := cur.mismatch(base)) is not None:
                raise StoreError(f"store {self.where} is bound to another base model: {why}")
            new = base if cur is None else cur.merged(base)
            if cur is None or new.to_dict() != cur.to_dict():
                self._catalog.set_base(new)
            self._base = new

    # ------------------------------------------------------------------ public properties
    @property
    def base(self) -> BaseFingerprint | None:
        return self._base

    @property
    def generation(self) -> int:
        """Catalog generation this instance reflects; bumps on every add/remove/reindex commit."""
        return self._gen

    @property
    def embedder(self) -> Embedder:
        """The embedder that built this store's index (the registry's, loaded lazily, if none given)."""
        if self._embedder is None:
            try:
                emb = get_embedder(self._emb_name)
            except WragError as e:
                raise StoreError(f"store {self.where} was indexed with embedder {self._emb_name!r}, which "
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
        return self._catalog.count()

    def __contains__(self, shard_id: str) -> bool:
        return self._row(shard_id, required=False) is not None

    def __enter__(self) -> "ShardStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardStore({self.where!r}, shards={len(self)}, generation={self.generation})"

    def close(self) -> None:
        """Persist the index cache if it is behind, and release the catalog."""
        if self._closed:
            return
        if self._index.stale:
            with contextlib.suppress(OSError):
                self._persist_index()
        if self._watcher is not None:
            self._stopping = True  # the watcher stops at its next wake-up
            self._watcher.join(timeout=WATCH_POLL_S + 5)
        with self._mu:
            if self._closed:
                return
            self._catalog.close()
            self._closed = True

    # ------------------------------------------------------------------ writes
    def add(self, shard: Shard, allow_attention: bool = False, overwrite: bool = False,
            embedding: np.ndarray | None = None) -> dict:
        """Validate, store and index one shard; returns its meta row.

        embedding: optional precomputed (dim,) vector (e.g. bulk imports); it is normalised and
        scored by the fixed cosine head (relevance.py). The shard still needs a description,
        samples or queries (they are what `reindex` re-embeds).
        """
        embs = None if embedding is None else np.asarray(embedding, dtype=np.float32).reshape(1, -1)
        return self.add_many([shard], allow_attention=allow_attention, overwrite=overwrite,
                             embeddings=embs)[0]

    def add_many(self, shards: Iterable[Shard], allow_attention: bool = False, overwrite: bool = False,
                 embeddings: np.ndarray | None = None) -> list[dict]:
        """Add shards all-or-nothing in one transaction (one generation bump); embeddings (n, dim)
        optional. Texts are embedded in one batched call, and each shard's relevance head is fitted
        against the background and its neighbours. Returns the meta rows in order."""
        shards = list(shards)
        if not shards:
            return []
        self._check(shards, allow_attention)  # no lock yet: nothing is touched
        vecs, texts, sources = self._embed(shards, embeddings)
        with self._catalog.write_lock():
            base, replaced = self._check_locked(shards, overwrite)
            files = self._files.write(shards, [replaced[s.id].file if s.id in replaced else None
                                               for s in shards])
            try:
                gen, fids = self._commit_add(shards, files, vecs, texts, sources, allow_attention, base,
                                             replaced)
            except BaseException:
                self._files.unlink(name for name, _ in files)  # nothing committed: the new files are garbage
                raise
            crash_point("add:after_commit")
            self._files.unlink(r.file for r in replaced.values())  # new files never take an old name
            self._update_index(gen, [r.fid for r in replaced.values()], fids, vecs)
            return [self.get_meta(s.id) for s in shards]

    def _check(self, shards: list[Shard], allow_attention: bool) -> None:
        """The checks that need no lock: cheap to fail early, nothing is touched yet."""
        for sh in shards:
            if not isinstance(sh, Shard):
                raise StoreError(f"expected a Shard, got {type(sh).__name__}")
        base = self._catalog.state().base  # the catalog's: another process may have bound it
        seen = set()
        for sh in shards:
            self._check_base(sh, base or shards[0].base)  # an empty store takes the first one's base
            # ShardError: ids, texts, shapes, NaN/Inf, delta magnitudes (vs the store's base), targets
            sh.validate(allow_attention, base=base)
            if sh.id in seen:
                raise StoreError(f"shard id {sh.id!r} appears twice in one add")
            seen.add(sh.id)
            if not embed_source(sh.description, sh.samples, sh.queries):
                raise StoreError(f"shard {sh.id!r} has an empty description and no samples or queries: the store "
                                 f"retrieves shards by these texts; give it a description, samples "
                                 f"or queries")

    def _embed(self, shards: list[Shard],
               embeddings: np.ndarray | None) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
        """The shards' heads (n, dim + 1), text vectors (m_i, dim) and how each was made: given,
        or by the embedding rule."""
        if embeddings is not None:
            vecs = given_embeddings(embeddings, len(shards), self._emb_dim, self._emb_name)
            return np.stack([cosine_head(v) for v in vecs]), [v[None] for v in vecs], ["given"] * len(shards)
        items = [(s.description, s.samples, s.queries) for s in shards]
        tvs = text_vectors(self.embedder, items)
        heads = self._fit_heads(tvs, [bool(d.strip()) for d, _, _ in items], {s.id for s in shards})
        return heads, [stored_rows(t) for t in tvs], [embed_source(*it) for it in items]

    def _fit_heads(self, tvs: list[np.ndarray], has_desc: list[bool], new_ids: set[str],
                   existing: bool = True, embedder: Embedder | None = None) -> np.ndarray:
        """Heads (n, dim + 1) of shards with text vectors tvs: negatives are the background, the
        texts of the NEIGHBOURS shards of the store whose heads score each centroid highest (when
        `existing`; the shards of `new_ids` excepted), and those of the NEIGHBOURS nearest centroids
        among tvs themselves. `embedder`: the one tvs come from (default: the store's)."""
        bg = background_vectors(embedder or self.embedder)
        cents = np.stack([centroid(tv, d) for tv, d in zip(tvs, has_desc)])
        near_new = _nearest_rows(cents, NEIGHBOURS)
        near_old: list[list[int]] = [[] for _ in tvs]
        old_texts: dict[int, np.ndarray] = {}
        if existing:
            skip = {r.fid for r in self._catalog.rows(sorted(new_ids))}  # rows an overwrite replaces
            with self._mu:
                near, _ = self._ready_index().search(query_rows(cents), NEIGHBOURS + len(skip), self._catalog)
            near_old = [[f for f, _ in row if f not in skip][:NEIGHBOURS] for row in near]
            old_texts = self._catalog.text_vectors(sorted({f for row in near_old for f in row}))
        heads = []
        for i, tv in enumerate(tvs):
            neg = [bg] + [old_texts[f] for f in near_old[i] if f in old_texts] + [tvs[j] for j in near_new[i]]
            heads.append(fit_head(tv, np.concatenate(neg)))
        return np.stack(heads)

    def _check_locked(self, shards: list[Shard],
                      overwrite: bool) -> tuple[BaseFingerprint | None, dict[str, Row]]:
        """The checks against the catalog as the write lock holds it: its base, the rows the shards
        would replace. Returns (base, id -> row replaced)."""
        base = self._catalog.state().base
        for sh in shards:
            self._check_base(sh, base or shards[0].base)
        replaced = {r.id: r for r in self._catalog.rows([s.id for s in shards])}
        if replaced and not overwrite:
            raise StoreError(f"shard id {sorted(replaced)[0]!r} already exists in store {self.where}; "
                             f"remove it first or pass overwrite=True (--overwrite)")
        return base, replaced

    def _commit_add(self, shards: list[Shard], files: list[tuple[str, int]], vecs: np.ndarray,
                    texts: list[np.ndarray], sources: list[str], allow_attention: bool,
                    base: BaseFingerprint | None,
                    replaced: dict[str, Row]) -> tuple[int, list[int]]:
        """The catalog transaction: rows in, replaced rows out; an empty store is bound to the
        shards' base, and facts its record lacks are filled in. Returns (generation, fids)."""
        merged = base or shards[0].base
        for sh in shards:
            merged = merged.merged(sh.base)
        record = None if base is not None and merged.to_dict() == base.to_dict() else merged
        entries = [Entry(id=sh.id, file=name, name=sh.name or sh.id, description=sh.description,
                         samples=list(sh.samples), queries=list(sh.queries), rank=sh.rank,
                         targets=sh.target_modules,
                         layers=sorted({l for l, _ in sh.factors}), bytes=nbytes, provenance=sh.provenance,
                         allow_attention=bool(allow_attention), embed_source=src)
                   for sh, (name, nbytes), src in zip(shards, files, sources)]
        gen, fids = self._catalog.add(entries, vecs, texts, replace=list(replaced), base=record,
                                      payloads=self._files.payloads([name for name, _ in files]))
        self._base = record or base
        return gen, fids

    def _update_index(self, gen: int, removed: list[int], added: list[int], vecs: np.ndarray | None) -> None:
        """After our own commit (fids removed, fids added with heads vecs): a loaded index at the
        generation before it is updated in place, else caught up by a diff."""
        with self._mu:
            if self._index.loaded and gen == self._index.generation + 1:
                self._index.apply(gen, removed, added, vecs, self._catalog)
                self._gen = gen
            else:
                self._sync()

    def remove(self, shard_id: str) -> None:
        """Delete a shard (row, index entry, file). StoreError if unknown."""
        with self._catalog.write_lock():
            row = self._row(shard_id)
            gen = self._catalog.remove(row.fid)
            crash_point("remove:after_commit")
            self._files.unlink([row.file])
            self._update_index(gen, [row.fid], [], None)

    def reindex(self, embedder: Embedder | None = None) -> int:
        """Re-embed every shard's texts with `embedder` (default: the store's), refit every head with
        the whole store as neighbours, and switch the store to the embedder. Precomputed ('given')
        embeddings are replaced by text embeddings. Returns the count."""
        with self._catalog.write_lock():
            n = self._reindex_locked(embedder or self.embedder)
        self._persist_index()
        return n

    def _reindex_locked(self, emb: Embedder) -> int:
        rows = self._catalog.rows()
        items = [(r.description, r.samples, r.queries) for r in rows]
        tvs = text_vectors(emb, items) if rows else []
        heads = self._fit_heads(tvs, [bool(d.strip()) for d, _, _ in items], set(), existing=False,
                                embedder=emb) if rows else []
        self._catalog.reembed(emb, [(r.fid, h, stored_rows(t), embed_source(*it))
                                    for r, h, t, it in zip(rows, heads, tvs, items)])
        with self._mu:  # the store switches embedder only once the catalog has
            self._embedder, self._emb_name, self._emb_dim = emb, emb.name, int(emb.dim)
            self._sync()
        return len(rows)

    def _upgrade(self) -> None:
        """Fit the heads of a store upgraded from schema 1 (once, by the first opener)."""
        with self._catalog.write_lock():
            if self._catalog.state().stale_heads:
                self._reindex_locked(self.embedder)

    # ------------------------------------------------------------------ reads
    def list(self) -> list[dict]:
        """Meta rows of all shards, oldest first."""
        return [self._meta(r) for r in self._catalog.rows()]

    def get_meta(self, shard_id: str) -> dict:
        return self._meta(self._row(shard_id))

    def load(self, shard_id: str) -> Shard:
        """The shard, read from its file (validated)."""
        row = self._row(shard_id)
        return load_shard(self._files.local(row.file), allow_attention=row.allow_attention)

    def text_vectors(self, shard_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """shard id -> the text vectors (≤ STORED_ROWS, dim) the catalog keeps of it (embedding.py)."""
        rows = self._catalog.rows(list(shard_ids))
        tv = self._catalog.text_vectors([r.fid for r in rows])
        return {r.id: tv[r.fid] for r in rows if r.fid in tv}

    def path(self, shard_id: str) -> Path:
        """Path of the shard's safetensors file (of a database store: its cached copy)."""
        return self._files.local(self._row(shard_id).file)

    def search(self, text: str, k: int = 5) -> list[tuple[str, float]]:
        """(id, p) of the k shards most likely to own `text`, best first; p is the probability of
        the shard's relevance head (relevance.py)."""
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
        with self._mu:
            index = self._ready_index()  # first: loading it may take another process's reindex
            if q.ndim != 2 or q.shape[1] != self._emb_dim:
                raise StoreError(f"query vectors have shape {tuple(q.shape)}, store expects (n, {self._emb_dim})")
            if not np.isfinite(q).all():
                raise StoreError("query vector contains NaN or Inf values")
            hits, names = index.search(query_rows(normalize_rows(q)), k, self._catalog)
        return [[(names[f], probability(z)) for f, z in row] for row in hits]

    def load_index(self) -> None:
        """Load the search index now rather than at the first search (a server, before its first
        request), and write its file if that was behind."""
        with self._mu:
            self._ready_index()
        if self._index.stale:
            with contextlib.suppress(OSError):
                self._persist_index()

    def refresh(self) -> bool:
        """Catch up with commits of other processes/connections. True if anything changed."""
        with self._mu:
            if self._catalog.generation() == self._gen:
                return False
            self._sync()
            return True

    def watch(self, on_change: Callable[[], None] | None = None, poll_s: float = WATCH_POLL_S) -> None:
        """Keep this instance in step with other processes' commits from a background thread, so
        requests find the index current: a database store hears of each commit at once
        (LISTEN/NOTIFY), a folder store looks every `poll_s` seconds. `on_change()` runs after each
        catch-up. Readers still call `refresh()` before a read that must see the latest commit."""
        with self._mu:
            if self._watcher is not None:
                return
            self._watcher = threading.Thread(target=self._watch, args=(on_change, poll_s), daemon=True,
                                             name="wrag-store-watch")
            self._watcher.start()

    def _watch(self, on_change: Callable[[], None] | None, poll_s: float) -> None:
        failing_since = None  # monotonic time of the first failure of the current outage
        warned = 0.0
        while not self._stopping:
            self._catalog.wait(poll_s)
            if self._stopping:
                return
            try:
                changed = self.refresh()
            except Exception:  # noqa: BLE001 - a database gone for a while: the next round retries
                now = time.monotonic()
                if failing_since is None or now - warned >= WATCH_WARN_EVERY_S:  # not once a poll
                    failing_since = failing_since or now
                    warned = now
                    log.warning("WRAG: store %s: could not catch up with other processes' commits for %.0f s; "
                                "retrying every %.0f s", self.where, now - failing_since, poll_s, exc_info=True)
                continue
            if failing_since is not None:
                log.warning("WRAG: store %s: caught up again after %.0f s", self.where,
                            time.monotonic() - failing_since)
                failing_since = None
            if changed and on_change is not None:
                on_change()

    def disk_usage(self) -> dict:
        """Bytes on disk: shard files, catalog (+WAL), index cache, and the total."""
        shards, cat, idx = self._files.nbytes(), self._catalog.nbytes(), self._index.nbytes()
        return {"shards": shards, "catalog": cat, "index": idx, "total": shards + cat + idx}

    def verify(self) -> list[str]:
        """Consistency problems (empty list = consistent): rows without files, files without rows,
        index entries != catalog rows, embeddings of the wrong size. Holds the writer lock, so a
        live writer's not-yet-committed file is never reported."""
        problems = []
        with self._catalog.write_lock(), self._mu:
            with self._catalog.snapshot():
                rows = self._catalog.rows()
                gen = self._catalog.state().generation
                bad = dict(self._catalog.bad_embeddings(head_dim(self._emb_dim)))
            files = self._files.names()
            for r in rows:
                if r.file not in files:
                    problems.append(f"shard {r.id!r}: file {r.file} missing")
                if r.id in bad:
                    problems.append(f"shard {r.id!r}: embedding has {bad[r.id]} bytes, expected "
                                    f"{4 * head_dim(self._emb_dim)}")
            for f in sorted(files - {r.file for r in rows}):
                problems.append(f"orphan file shards/{f}")
            idx = self._ready_index()
            if gen == idx.generation:
                idx_ids, cat = set(idx.fids().tolist()), {r.fid for r in rows}
                ntotal = idx.index.ntotal
                if idx_ids != cat or ntotal != len(rows):
                    problems.append(f"index holds {ntotal} entries, catalog {len(rows)} rows "
                                    f"({len(cat - idx_ids)} missing, {len(idx_ids - cat)} extra)")
            else:
                problems.append(f"instance at generation {idx.generation}, catalog at {gen}: "
                                f"call refresh()")
        return problems

    # ------------------------------------------------------------------ internals
    def _check_embedder(self, emb: Embedder) -> None:
        if (emb.name, int(emb.dim)) != (self._emb_name, self._emb_dim):
            raise StoreError(
                f"store {self.where} was indexed with embedder {self._emb_name!r} (dim {self._emb_dim}); "
                f"refusing to mix in embedder {emb.name!r} (dim {emb.dim}): vectors of different "
                f"embedders are not comparable. Open the store without an embedder, or re-embed every "
                f"shard with ShardStore.reindex(embedder).")

    def _check_base(self, sh: Shard, base: BaseFingerprint | None) -> None:
        if base is not None and (why := base.mismatch(sh.base)) is not None:
            raise StoreError(f"shard {sh.id!r} was made for a different base model than store {self.where}: "
                             f"{why}")

    def _row(self, shard_id: str, required: bool = True) -> Row | None:
        """The catalog row of `shard_id` (None if absent and not required). A string that is no
        valid id is refused (StoreError) or absent: it never reaches a query or a path."""
        if (why := id_problem(shard_id)) is not None:
            if required:
                raise StoreError(why)
            return None
        rows = self._catalog.rows([shard_id])
        if not rows and required:
            # a hint compares every id (Python, O(n)): only where that stays cheap
            near = (difflib.get_close_matches(str(shard_id), list(self._catalog.ids().values()), n=3)
                    if self._catalog.count() <= HINT_MAX else [])
            hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
            raise StoreError(f"unknown shard id {shard_id!r} in store {self.where}{hint}")
        return rows[0] if rows else None

    def _meta(self, r: Row) -> dict:
        return {"id": r.id, "name": r.name, "description": r.description, "samples": r.samples,
                "queries": r.queries,
                "rank": r.rank, "targets": r.targets, "layers": r.layers, "bytes": r.bytes,
                "added_at": r.added_at, "provenance": r.provenance, "allow_attention": r.allow_attention,
                "embed_source": r.embed_source, "path": str(self._files.path(r.file))}

    def _cleanup(self) -> None:
        """Delete what killed writers left: shard files no row names, index temp files. Only when
        no writer holds the lock: a live writer's not-yet-committed file is not garbage."""
        with self._catalog.write_lock(wait=False) as held:
            if held:
                self._files.sweep(keep=self._catalog.files())
                self._index.sweep()

    def _ready_index(self) -> IndexCache:
        """The index, loaded on first use: its file, caught up with the catalog (caller holds _mu).
        A process that never searches (an engine core behind a front end) never holds it."""
        if not self._index.loaded:
            self._index.load()
            try:
                self._sync()
            except BaseException:  # e.g. the database went away: unloaded again, the next call retries
                self._index.index = None
                raise
        return self._index

    def _sync(self) -> None:
        """Take the catalog's generation, embedder and base, and bring a loaded index to its state
        (caller holds _mu)."""
        st = self._index.sync(self._catalog) if self._index.loaded else self._catalog.state()
        self._gen = st.generation
        if (st.embedder_name, st.embedder_dim) != (self._emb_name, self._emb_dim):
            self._emb_name, self._emb_dim = st.embedder_name, st.embedder_dim
            self._embedder = None  # reindexed by another process: ours no longer fits
        self._base = st.base

    def _persist_index(self) -> None:
        """Write the index cache. Call without _mu held (lock order: the write lock, then _mu)."""
        with self._mu:
            if not self._index.loaded:
                return
            state, data = self._index.image()
        with self._catalog.write_lock():
            self._index.write(state, data)


def _nearest_rows(c: np.ndarray, k: int) -> list[list[int]]:
    """For each unit row of c (n, dim), the indices of the (at most) k other rows of highest cosine."""
    out = []
    for i in range(0, len(c), 1024):
        sims = c[i:i + 1024] @ c.T  # (≤1024, n)
        for r, row in enumerate(sims):
            row[i + r] = -np.inf
            kk = min(k, len(c) - 1)
            top = np.argpartition(-row, kk - 1)[:kk] if kk > 0 else np.empty(0, dtype=np.int64)
            out.append(top[np.argsort(-row[top])].tolist())
    return out
