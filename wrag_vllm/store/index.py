"""The FAISS index of the shards' relevance heads, kept in step with the catalog and cached in index.faiss.

Each row is a head h_s = [w_s, b_s] (d = dim + 1 values) and each query row is q = [e(text), 1]
(relevance.py), so h_s·q is the logit of p_s(text), and search returns the k shards of highest
logit. The index's ids are the catalog's fids. The index is all a process keeps per shard: the shard
ids of the hits are read from the catalog, so memory grows by the index's codes alone.

Two forms, by size:
    flat        IndexFlatIP: the heads as float32, 4·d bytes a shard; exact. Below COMPRESS_AT rows.
    compressed  IndexPQFastScan: each head, padded to a multiple of PQ_DSUB values, cut into
                sub-vectors of PQ_DSUB values, each coded by 4 bits (the nearest of 16 k-means
                centroids): d/4 bytes a shard, 16× less than flat. A query takes the R best rows by
                the codes' approximate logit ĥ_s·q and rescores them exactly with their float32
                heads, read from the catalog:
                    hits(q) = top_k { h_s·q : s ∈ C(q) },   C(q) = top_R { ĥ_s·q },  R = max(RESCORE, 16·k)
                so every score returned is exact, and a shard is missed only when its approximate
                logit falls outside the top R (bench_store measures the recall against flat).
The index turns compressed when it reaches COMPRESS_AT rows; its codebooks are trained on the rows
it holds then (FAISS samples 256 per centroid), and retrained whenever it has grown RETRAIN_GROWTH
times since. Rows added in between are coded with the codebooks they find.

The file is only a cache, keyed by the (epoch, generation) it reflects: a header (magic, epoch,
generation, ntotal, dim, rows at training) then faiss.serialize_index bytes, replaced atomically
(temp file, rename). An index loaded from it, or one that fell behind other processes' commits, is
brought to the catalog's state by a diff: fids are never reused, so the fids the catalog no longer
has are removed and the rows it gained are added. A file of another epoch or dim, or one that
cannot be read, is ignored and the index rebuilt from the catalog.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import struct
import sys
from pathlib import Path

import faiss
import numpy as np

from .catalog import Catalog, CatalogState
from .crash import crash_point
from .relevance import head_dim

INDEX = "index.faiss"
FAISS_THREADS = int(os.environ.get("WRAG_FAISS_THREADS", "1"))  # for batches under _BIG_BATCH queries
# rows from which the index is PQ codes (at least 256: k-means wants some points per centroid)
COMPRESS_AT = max(256, int(os.environ.get("WRAG_INDEX_COMPRESS_AT", "4096")))
PQ_DSUB = 2           # values per PQ sub-vector (4-bit codes: d/4 bytes a row)
RESCORE = 128         # rows of a compressed index rescored exactly per query, at least
RETRAIN_GROWTH = 4    # a compressed index retrains its codebooks when it has grown this many times
_BIG_BATCH = 32       # query batches at least this large use all cores
_BATCH = 1024         # heads read from the catalog at a time while (re)building: bounded memory
_HEADER = struct.Struct("<8s32sqqiq")  # magic, epoch (hex), generation, ntotal, dim, rows at training
_MAGIC = b"WRAGIDX2"


class IndexCache:
    """The index and the (epoch, generation) of the catalog it reflects; `load()` before use (a
    process that never searches never loads it). Not thread-safe: ShardStore serialises the calls."""

    def __init__(self, path: Path, dim: int):
        self.path, self.dim = path, dim
        self.index = None
        self.epoch, self.generation = "", -1
        self.trained_at = 0  # rows when the codebooks were trained; 0: flat
        self.persisted: tuple[str, int] | None = None  # (epoch, generation) the file holds

    @property
    def loaded(self) -> bool:
        return self.index is not None

    @property
    def compressed(self) -> bool:
        return self.trained_at > 0

    def load(self) -> None:
        """The file's index if it fits this store, else an empty one (`sync` fills it)."""
        if (got := _read(self.path, self.dim)) is not None:
            self.index, self.epoch, self.generation, self.trained_at = got
            self.persisted = (self.epoch, self.generation)
            _return_freed_memory()  # the file's bytes
        else:
            self.index = _flat(self.dim)

    @property
    def stale(self) -> bool:
        """The file does not hold this index."""
        return self.loaded and self.persisted != (self.epoch, self.generation)

    def fids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def search(self, q: np.ndarray, k: int,
               catalog: Catalog) -> tuple[list[list[tuple[int, float]]], dict[int, str]]:
        """(fid, logit) of the k best rows, best first, for each query row of q (n, d), and the
        shard id of each fid returned. Rows the catalog no longer holds (removed by another process
        since the last sync) are left out. One catalog query either way: the ids of the hits (flat),
        or the candidates' heads with their ids (compressed)."""
        n = self.index.ntotal
        if n == 0 or k <= 0:
            return [[] for _ in range(len(q))], {}
        # per call: OpenMP thread counts are per calling thread (server threads differ)
        faiss.omp_set_num_threads(FAISS_THREADS if len(q) < _BIG_BATCH else (os.cpu_count() or 1))
        r = min(n, max(RESCORE, 16 * int(k)) if self.compressed else int(k))
        approx, cand = self.index.search(q, r)
        if not self.compressed:
            hits = [[(f, s) for s, f in zip(srow, frow) if f >= 0]
                    for srow, frow in zip(approx.tolist(), cand.tolist())]
            names = catalog.ids(sorted({f for row in hits for f, _ in row}))
            return [[(f, s) for f, s in row if f in names] for row in hits], names
        heads, hf, ids = catalog.candidates(np.unique(cand[cand >= 0]).tolist())
        if heads.shape[1] != q.shape[1]:  # every candidate removed, or reindexed to another dim, since our sync
            return [[] for _ in range(len(q))], {}
        exact = q @ heads.T  # (n, |hf|)
        col = {f: j for j, f in enumerate(hf.tolist())}
        out = []
        for i, frow in enumerate(cand.tolist()):
            row = sorted(((f, float(exact[i, col[f]])) for f in frow if f in col), key=lambda t: -t[1])
            out.append(row[:k])
        return out, dict(zip(hf.tolist(), ids))

    # ------------------------------------------------------------------ keeping up with the catalog
    def sync(self, catalog: Catalog) -> CatalogState:
        """Bring the index to the catalog's state by a diff; returns that state."""
        with catalog.snapshot():
            st = catalog.state()
            d = head_dim(st.embedder_dim)
            if st.epoch != self.epoch or self.dim != d:
                self.index, self.dim, self.epoch, self.trained_at = _flat(d), d, st.epoch, 0
            count = catalog.count()
            if self._outgrown(count):  # (re)build compressed at once: never a flat index of every row
                self._rebuild(catalog, catalog.fids())
            else:
                known = self.fids()
                # Adds only (the common case): rows newer than ours have higher fids, so if the
                # known rows plus the newer ones are all the rows, nothing was removed.
                newer = catalog.fids(after=int(known.max()) if len(known) else 0)
                if len(known) + len(newer) == count:
                    gone, new = known[:0], newer
                else:  # removals: full diff
                    every = catalog.fids()
                    gone, new = np.setdiff1d(known, every), np.setdiff1d(every, known)
                if len(gone):
                    self.index.remove_ids(gone)
                for i in range(0, len(new), _BATCH):
                    self.index.add_with_ids(*catalog.vectors(new[i:i + _BATCH].tolist()))
                if len(new) or len(gone):  # the rows read, the old code tables: back to the OS
                    _return_freed_memory()
            self.generation = st.generation
        return st

    def apply(self, generation: int, removed: list[int], added: list[int], vecs: np.ndarray | None,
              catalog: Catalog) -> None:
        """Our own commit, the one right after self.generation: fids `removed` out, `added` (with
        heads vecs) in."""
        if removed:
            self.index.remove_ids(np.asarray(removed, dtype=np.int64))
        if added:
            self.index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), np.asarray(added, dtype=np.int64))
        self.generation = generation
        if self._outgrown(self.index.ntotal):
            self._rebuild(catalog, self.fids())

    def _outgrown(self, n: int) -> bool:
        """Whether an index of n rows wants new codebooks: a flat one reached COMPRESS_AT, or a
        compressed one grew RETRAIN_GROWTH times since its training."""
        return n >= (RETRAIN_GROWTH * self.trained_at if self.compressed else COMPRESS_AT)

    def _rebuild(self, catalog: Catalog, fids: np.ndarray) -> None:
        """A compressed index of rows `fids`, its codebooks trained on (at most) 4,096 of their heads
        (FAISS's k-means keeps 256 points per centroid, 16 centroids), the rows read _BATCH at a time."""
        idx = _compressed(self.dim)
        pick = np.sort(np.random.default_rng(0).choice(fids, size=min(len(fids), 16 * 256), replace=False))
        idx.train(np.concatenate([catalog.vectors(pick[i:i + _BATCH].tolist())[0]
                                  for i in range(0, len(pick), _BATCH)]))
        for i in range(0, len(fids), _BATCH):
            idx.add_with_ids(*catalog.vectors(fids[i:i + _BATCH].tolist()))
        self.index, self.trained_at = idx, len(fids)
        _return_freed_memory()

    # ------------------------------------------------------------------ the file
    def image(self) -> tuple[tuple[str, int], np.ndarray]:
        """What `write` stores: ((epoch, generation), the file's bytes)."""
        header = _HEADER.pack(_MAGIC, self.epoch.encode(), self.generation, self.index.ntotal, self.index.d,
                              self.trained_at)
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


_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform == "linux" else None


def _return_freed_memory() -> None:
    """Give the heap memory a bulk read freed back to the OS. glibc keeps freed small blocks (here:
    one bytes object per head read) in the heap, so a rebuild would leave the process ~2× the
    index's size larger than the index (measured: 11 MiB of 23 at 30,000 shards). A no-op where
    the C library has no malloc_trim."""
    if _TRIM is not None:
        _TRIM(0)


def _flat(dim: int):
    return faiss.IndexIDMap(faiss.IndexFlatIP(dim))


def _compressed(dim: int):
    """IndexPQFastScan over the heads padded with zeros to M·PQ_DSUB values (M even, as FastScan
    packs codes in pairs); padding leaves every inner product as it is."""
    m = -(-dim // PQ_DSUB)
    m += m % 2
    pq = faiss.IndexPQFastScan(m * PQ_DSUB, m, 4, faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexIDMap(faiss.IndexPreTransform(faiss.RemapDimensionsTransform(dim, m * PQ_DSUB, False), pq))


def _read(path: Path, dim: int):
    """(index, epoch, generation, rows at training) from the file, or None if it is missing,
    unreadable or of another dim."""
    try:
        data = path.read_bytes()
        magic, epoch, gen, ntotal, d, trained_at = _HEADER.unpack_from(data)
        if magic != _MAGIC or d != dim:
            return None
        # deserialize_index returns the owning, already downcast object (wrapping it again with
        # downcast_index would leave a proxy to freed memory once the first one is collected).
        idx = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8, offset=_HEADER.size))
        if not isinstance(idx, faiss.IndexIDMap) or idx.ntotal != ntotal or idx.d != d:
            return None
        return idx, epoch.decode(), gen, trained_at
    except Exception:  # noqa: BLE001 - missing, truncated or foreign file: it is only a cache
        return None
