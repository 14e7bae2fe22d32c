"""Crash safety and multi-process writers: real processes, real SIGKILL, on both backends (real
flock/SQLite, real PostgreSQL with its advisory lock)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers_shards import random_shard, tiny_base
from helpers_store import check_consistent, unit

from wrag_vllm.store import ShardStore

WRITER = str(Path(__file__).parent / "helpers_store.py")


@pytest.fixture(scope="module")
def base():
    return tiny_base(0)


def _spawn(root, base, *args, env=None):
    return subprocess.Popen([sys.executable, WRITER, str(root), json.dumps(base.to_dict()), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _wait_for(path: Path, proc, timeout=120.0):
    t = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"writer exited ({proc.returncode}) before the crash point: {proc.stderr.read()}")
        if time.monotonic() - t > timeout:
            proc.kill()
            raise AssertionError("writer never reached the crash point")
        time.sleep(0.02)


def _kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _seed_store(root, base, ids=("s0", "s1", "s2")):
    with ShardStore(root) as s:
        s.load_index()  # kept in step: close() leaves the index file current
        for i in ids:
            s.add(random_shard(base, i, rank=2, description=f"domain {i}"), embedding=unit(i))


# (op, crash point, does the operation count as done after the kill?)
POINTS = [
    ("add", "add:before_files", False),
    ("add", "add:file_written", False),
    ("add", "add:before_commit", False),
    ("add", "add:after_commit", True),
    ("overwrite", "add:file_written", False),
    ("overwrite", "add:before_commit", False),
    ("overwrite", "add:after_commit", True),
    ("remove", "remove:before_commit", False),
    ("remove", "remove:after_commit", True),
    ("add", "index:tmp_written", True),  # killed while close() persists the index cache
]


@pytest.mark.parametrize("op,point,done", POINTS, ids=[f"{o}@{p}" for o, p, _ in POINTS])
def test_sigkill_at_each_step_leaves_a_consistent_store(store_at, tmp_path, base, op, point, done):
    root = store_at("s")
    _seed_store(root, base)
    sig = tmp_path / "reached"
    target = {"add": "new", "overwrite": "s1", "remove": "s1"}[op]
    proc = _spawn(root, base, op, target, env={"WRAG_STORE_CRASH_AT": point, "WRAG_STORE_CRASH_SIGNAL": str(sig)})
    _wait_for(sig, proc)
    _kill(proc)
    folder = store_at.folder("s")  # the store's folder, or the local cache of a database store
    shard_ids = sorted(p.name.split("@")[0].removesuffix(".safetensors") for p in (folder / "shards").iterdir())
    if point in ("add:file_written", "add:before_commit") and op == "add":
        assert "new" in shard_ids  # the dead writer really left a file without a row
    if point == "remove:after_commit":
        assert "s1" in shard_ids  # row gone, file still there
    if point == "index:tmp_written":
        assert list(folder.glob("index.faiss.tmp-*"))

    store = check_consistent(root)  # rows ⇔ files ⇔ index, no orphans/temp files, search works
    ids = {r["id"] for r in store.list()}
    if op == "add":
        assert ids == ({"s0", "s1", "s2", "new"} if done else {"s0", "s1", "s2"})
    elif op == "remove":
        assert ids == ({"s0", "s2"} if done else {"s0", "s1", "s2"})
    else:
        assert ids == {"s0", "s1", "s2"}
        assert store.get_meta("s1")["description"] == ("rewritten" if done else "domain s1")
    assert store.generation == 3 + int(done)
    # the dead writer's flock died with it: writing goes on
    store.add(random_shard(base, "after", rank=2, description="after"), embedding=unit("after"))
    assert check_consistent(root).search_vector(unit("after"), 1)[0][0] == "after"


def test_sigkill_at_random_times(store_at, base):
    """A writer adding shards in a loop, killed at random instants, 4 times on one store: every add
    the writer saw return is there, nothing else but the one in flight, and the store is consistent."""
    root = store_at("s")
    _seed_store(root, base, ids=("s0",))
    rng = random.Random(1234)
    expected = {"s0"}
    for round_ in range(4):
        proc = _spawn(root, base, "loop", f"r{round_}", "100000")
        acked = []
        ready = threading.Event()

        def pump():
            for line in proc.stdout:
                if line.startswith("ready"):
                    ready.set()
                elif line.startswith("added"):
                    acked.append(line.split()[1])

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        assert ready.wait(120), proc.stderr.read() if proc.poll() is not None else "writer not ready"
        time.sleep(rng.uniform(0.05, 1.5))
        _kill(proc)
        t.join(10)
        store = check_consistent(root)
        ids = {r["id"] for r in store.list()}
        expected |= set(acked)
        in_flight = {f"r{round_}-{len(acked)}"}  # may have committed before its print
        assert expected <= ids <= expected | in_flight, (sorted(ids - expected), sorted(expected - ids))
        expected = ids
        store.close()
    assert len(expected) > 1  # the writers did get work done between kills


def test_two_writer_processes_both_land(store_at, base):
    root = store_at("fresh")  # both writers race to create the store too (a database store: the database)
    n = 12
    procs = [_spawn(root, base, "loop", p, str(n)) for p in ("a", "b")]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.count("added") == n
    store = check_consistent(root)
    ids = {r["id"] for r in store.list()}
    assert ids == {f"{p}-{j}" for p in "ab" for j in range(n)}
    assert store.generation == 2 * n


def test_reader_process_sees_writer_process_via_refresh(store_at, base):
    root = store_at("s")
    _seed_store(root, base, ids=("s0",))
    reader = ShardStore(root)
    gen = reader.generation
    seen_gens = []
    proc = _spawn(root, base, "loop", "w", "6")
    while proc.poll() is None:  # refresh while the writer works: always a consistent snapshot
        if reader.refresh():
            seen_gens.append(reader.generation)
            # consistent, though the writer may have committed again since this refresh
            assert all("call refresh()" in p for p in reader.verify())
        time.sleep(0.01)
    assert proc.returncode == 0, proc.stderr.read()
    reader.refresh()
    assert reader.generation == gen + 6 and len(reader) == 7
    assert seen_gens == sorted(seen_gens)
    assert reader.search_vector(unit("w-5"), 1)[0][0] == "w-5"
