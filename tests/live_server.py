"""The release binary on a free loopback port and a fresh data directory, for
the test scripts that talk to a live server (README examples, contract test)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LiveServer:
    url: str
    token: str
    env: dict[str, str]
    process: subprocess.Popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(database_url: str | None = None) -> Iterator[LiveServer]:
    """Serves until the block ends, with an admin token; the data is removed
    after. With `database_url`, in cluster mode over that database."""
    port, token = free_port(), secrets.token_hex(16)
    url = f"http://127.0.0.1:{port}"
    data = Path(tempfile.mkdtemp(prefix="lookalike-live-"))
    env = dict(os.environ, LOOKALIKE_ADMIN_TOKEN=token, RUST_LOG="warn")
    if database_url:
        env["LOOKALIKE_DATABASE_URL"] = database_url
    process = subprocess.Popen([str(ROOT / "target/release/lookalike"), "serve", "--port", str(port),
                                "--data-dir", str(data)], env=env)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        yield LiveServer(url, token, env, process)
    finally:
        process.terminate()
        process.wait(timeout=60)
        shutil.rmtree(data, ignore_errors=True)
