import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers_*.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved as an HF folder (safetensors), shared by the session."""
    from helpers_shards import tiny_llama

    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(0).save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="session")
def tiny_fp(tiny_model_dir):
    from wrag_vllm.fingerprint import fingerprint_dir

    return fingerprint_dir(tiny_model_dir)


# ---------------------------------------------------------------------- store backends
@pytest.fixture(scope="session")
def pg_cluster():
    """One throwaway PostgreSQL server for the session (benchmarks/pg_cluster.py)."""
    from benchmarks.pg_cluster import PgCluster

    with PgCluster() as pg:
        yield pg


class StoreAt:
    """Store locations of one backend for one test: `at("s")` is a folder under tmp_path, or the
    URL of a PostgreSQL database that does not exist yet (ShardStore creates it)."""
    _count = 0

    def __init__(self, backend: str, tmp_path: Path, pg=None):
        self.backend, self.tmp_path, self.pg = backend, tmp_path, pg
        self._made: dict[str, str] = {}

    def __call__(self, name: str):
        if self.backend == "sqlite":
            return self.tmp_path / name
        if name not in self._made:
            StoreAt._count += 1
            self._made[name] = self.pg.url(f"t{StoreAt._count}_{name}".lower())
        return self._made[name]

    def folder(self, name: str) -> Path:
        """The local folder of store `name`: the store's own, or a database store's cache."""
        from wrag_vllm.store.location import cache_folder

        return self.tmp_path / name if self.backend == "sqlite" else cache_folder(self(name))

    def exists(self, name: str) -> bool:
        if self.backend == "sqlite":
            return (self.tmp_path / name).exists()
        import psycopg

        with psycopg.connect(self.pg.url(), autocommit=True) as c:
            return c.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                             (self(name).rsplit("/", 1)[1],)).fetchone() is not None

    def drop(self) -> None:
        if self.backend == "postgresql" and self._made:
            import psycopg

            with psycopg.connect(self.pg.url(), autocommit=True) as c:
                for url in self._made.values():
                    c.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def store_at(request, tmp_path, monkeypatch):
    """Run the test once per store backend; a database store's local cache goes under tmp_path
    (the writer processes a test spawns inherit it)."""
    monkeypatch.setenv("WRAG_CACHE_DIR", str(tmp_path / "cache"))
    pg = request.getfixturevalue("pg_cluster") if request.param == "postgresql" else None
    at = StoreAt(request.param, tmp_path, pg)
    yield at
    at.drop()
