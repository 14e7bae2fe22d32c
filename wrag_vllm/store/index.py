"""The FAISS index of the shards' relevance heads, kept in step with the catalog and cached in index.faiss.

Each row is a head h_s = [w_s, b_s] (dim + 1) and each query row is [e(q), 1] (relevance.py), so the
inner product is the logit of p_s(q), and search returns the k shards of highest logit
(IndexIDMap2 over IndexFlatIP: exact search). The index's ids are the catalog's fids.

The file is only a cache, keyed by the (epoch, generation) it reflects: a header (magic, epoch,
generation, ntotal, dim) then faiss.serialize_index bytes, replaced atomically (temp file, rename).
An index loaded from it, or one that fell behind other processes' commits, is brought to the
catalog's state by a diff: fids are never reused, so the ids the catalog no longer has are removed
and the rows it gained are added. A file of another epoch or dim, or one that cannot be read, is
ignored and the index rebuilt from the catalog.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import struct
from pathlib import Path

import faiss
import numpy as np

from .catalog import Catalog, CatalogState
from .crash import crash_point
from .relevance import head_dim

INDEX = "index.faiss"
FAISS_THREADS = int(os.environ.get("WRAG_FAISS_THREADS", "1"))  # for batches under _BIG_BATCH queries
_BIG_BATCH = 32  # query batches at least this large use all cores
_HEADER = struct.Struct("<8s32sqqi")  # magic, epoch (hex), generation, ntotal, dim
_MAGIC = b"WRAGIDX1"


class IndexCache:
    """The index, its fid -> shard id map, and the (epoch, generation) of the catalog they reflect.
    Not thread-safe: ShardStore serialises the calls."""

    def __init__(self, path: Path, dim: int):
        self.path = path
        self.index, self.epoch, self.generation = _new_index(dim), "", -1
        self.ids: dict[int, str | None] = {}  # fid -> shard id (None: not known yet)
        self.ids_known = True
        self.persisted: tuple[str, int] | None = None  # (epoch, generation) the file holds
        if (loaded := _read(path, dim)) is not None:
            self.index, self.epoch, gen = loaded
            self.persisted = (self.epoch, gen)
            self.ids, self.ids_known = dict.fromkeys(self.fids().tolist()), False  # ids come with sync

    @property
    def stale(self) -> bool:
        """The file does not hold this index."""
        return self.persisted != (self.epoch, self.generation)

    def fids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def search(self, q: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """(shard id, logit) of the k best rows, best first, for each query row of q (n, dim + 1)."""
        m = self.ids
        return [[(m[f], s) for f, s in row if m.get(f)] for row in self._search(q, k)]

    def nearest(self, q: np.ndarray, k: int) -> list[list[int]]:
        """The fids of the k best rows, best first, for each query row of q (n, dim + 1)."""
        return [[f for f, _ in row] for row in self._search(q, k)]

    def _search(self, q: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        n = self.index.ntotal
        if n == 0 or k <= 0:
            return [[] for _ in range(len(q))]
        # per call: OpenMP thread counts are per calling thread (server threads differ)
        faiss.omp_set_num_threads(FAISS_THREADS if len(q) < _BIG_BATCH else (os.cpu_count() or 1))
        scores, fids = self.index.search(q, min(int(k), n))
        return [[(f, s) for s, f in zip(srow, frow) if f >= 0]
                for srow, frow in zip(scores.tolist(), fids.tolist())]

    # ------------------------------------------------------------------ keeping up with the catalog
    def sync(self, catalog: Catalog) -> CatalogState:
        """Bring the index to the catalog's state by a diff; returns that state."""
        with catalog.snapshot():
            st = catalog.state()
            if st.epoch != self.epoch or self.index.d != head_dim(st.embedder_dim):
                self.index, self.ids, self.ids_known = _new_index(head_dim(st.embedder_dim)), {}, True
                self.epoch = st.epoch
            # Adds only (the common case): rows newer than ours have higher fids, so if the known
            # rows plus the newer ones are all the rows, nothing was removed.
            newer = catalog.ids(after=max(self.ids, default=0))
            if self.ids_known and len(self.ids) + len(newer) == catalog.count():
                ids = self.ids
                ids.update(newer)
                gone, new = [], list(newer)
            else:  # removals (or ids unknown after loading the file): full diff
                ids = catalog.ids()
                gone = [f for f in self.ids if f not in ids]
                new = [f for f in ids if f not in self.ids]
            if gone:
                self.index.remove_ids(np.asarray(gone, dtype=np.int64))
            if new:
                self.index.add_with_ids(*catalog.vectors(new))
            self.ids, self.ids_known, self.generation = ids, True, st.generation
        return st

    def apply(self, generation: int, removed: list[int], added: dict[int, str],
              vecs: np.ndarray | None) -> None:
        """Our own commit, the one right after self.generation: fids `removed` out, `added` (fid ->
        shard id, vectors vecs) in."""
        if removed:
            self.index.remove_ids(np.asarray(removed, dtype=np.int64))
            for f in removed:
                self.ids.pop(f, None)
        if added:
            self.index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32),
                                    np.asarray(list(added), dtype=np.int64))
            self.ids.update(added)
        self.generation = generation

    # ------------------------------------------------------------------ the file
    def image(self) -> tuple[tuple[str, int], np.ndarray]:
        """What `write` stores: ((epoch, generation), the file's bytes)."""
        header = _HEADER.pack(_MAGIC, self.epoch.encode(), self.generation, self.index.ntotal, self.index.d)
        data = np.concatenate([np.frombuffer(header, dtype=np.uint8), faiss.serialize_index(self.index)])
        return (self.epoch, self.generation), data

    def write(self, state: tuple[str, int], data: np.ndarray) -> None:
        """Replace the file by an `image()`. Call under the catalog's write lock, which openers
        hold while they delete temp files."""
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            crash_point("index:tmp_written")
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self.persisted = state

    def sweep(self) -> None:
        """Delete temp files of killed writers. Call under the catalog's write lock."""
        for p in self.path.parent.glob(self.path.name + ".tmp-*"):
            with contextlib.suppress(OSError):
                p.unlink()

    def nbytes(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0


def _new_index(dim: int):
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def _read(path: Path, dim: int):
    """(index, epoch, generation) from the file, or None if it is missing, unreadable or of another dim."""
    try:
        data = path.read_bytes()
        magic, epoch, gen, ntotal, d = _HEADER.unpack_from(data)
        if magic != _MAGIC or d != dim:
            return None
        # deserialize_index returns the owning, already downcast object (wrapping it again with
        # downcast_index would leave a proxy to freed memory once the first one is collected).
        idx = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8, offset=_HEADER.size))
        if not isinstance(idx, faiss.IndexIDMap2) or idx.ntotal != ntotal or idx.d != d:
            return None
        return idx, epoch.decode(), gen
    except Exception:  # noqa: BLE001 - missing, truncated or foreign file: it is only a cache
        return None
