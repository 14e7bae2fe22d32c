"""The shard store: shard files, a catalog of their metadata and embeddings, and a FAISS index of
the embeddings; a library, no server.

    shard_store.py     ShardStore, which composes the parts below and keeps them consistent
    catalog.py         the catalog interface ShardStore talks to (Catalog, Entry, Row, CatalogState)
    sqlite_catalog.py  the catalog in SQLite
    files.py           the shard files
    index.py           the FAISS index and its on-disk cache
    embedding.py       which texts of a shard are embedded, and the vectors kept of them
    relevance.py       the per-shard relevance heads: what makes a score a probability
    location.py        where a store lives
    crash.py           crash points for the crash-safety tests
"""
from .embedding import shard_embedding
from .index import FAISS_THREADS, INDEX
from .location import default_store_path, store_location
from .shard_store import ShardStore

__all__ = ["FAISS_THREADS", "INDEX", "ShardStore", "default_store_path", "shard_embedding", "store_location"]
