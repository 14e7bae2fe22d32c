"""A throwaway PostgreSQL cluster for the tests and benchmarks: initdb + pg_ctl in a temporary
folder, on a free TCP port of 127.0.0.1, trust authentication, stopped (and deleted) at the end.

PostgreSQL refuses to run as root, so when we are root (CI) the cluster runs as the `postgres`
system user (Debian's package creates it), through runuser.

    with PgCluster() as pg:
        url = pg.database("store1")   # postgresql://postgres@127.0.0.1:PORT/store1, created empty
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SUPERUSER = "postgres"


def pg_bin(tool: str) -> str:
    """The path of a PostgreSQL server tool (Debian keeps them off PATH, in /usr/lib/postgresql/N/bin)."""
    found = shutil.which(tool) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"), reverse=True)),
                                       None)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {tool} was not found: install the server (Debian: apt-get install "
                           f"postgresql; ./install.sh does it)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="wrag-pg-"))  # under /tmp: reachable by the postgres user
        self.data = self.folder / "data"
        self.port = _free_port()
        self._as = []  # the command prefix that runs a tool as the cluster's owner
        if os.geteuid() == 0:
            pwd.getpwnam(SUPERUSER)  # KeyError: no postgres user to run the server as
            self._as = ["runuser", "-u", SUPERUSER, "--"]
            os.chmod(self.folder, 0o755)
            shutil.chown(self.folder, SUPERUSER)

    def _run(self, *cmd: str) -> None:
        p = subprocess.run([*self._as, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           cwd=self.folder)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")

    def start(self) -> "PgCluster":
        self._run(pg_bin("initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off "
                f"-c max_connections=200 -c shared_buffers=64MB")
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.folder / "log"),
                  "-w", "-t", "60", "start")
        return self

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def database(self, name: str) -> str:
        """Create an empty database `name`; returns its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run([*self._as, pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.folder)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "PgCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
