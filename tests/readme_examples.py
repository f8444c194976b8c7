"""Runs the README's shell examples verbatim against a live server.

Every ```sh block that follows a `<!-- readme-test -->` line is run with bash
(`set -euo pipefail`, and curl failing on HTTP errors), in README order, from
the repository root, against the release binary started on a fresh data
directory with an admin token; only the address http://127.0.0.1:8080 is
replaced by the test server's.

    python3 tests/readme_examples.py      (after `cargo build --release`; `make readme-test`)
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- readme-test -->"
PRELUDE = "set -euo pipefail\ncurl() { command curl --fail-with-body \"$@\"; }\n"


def blocks(readme: str) -> list[str]:
    found = re.findall(re.escape(MARKER) + r"\s*```sh\n(.*?)```", readme, flags=re.S)
    if not found:
        raise SystemExit(f"no blocks marked {MARKER} in README.md")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    port, token = free_port(), secrets.token_hex(16)
    url = f"http://127.0.0.1:{port}"
    data = Path(tempfile.mkdtemp(prefix="lookalike-readme-"))
    env = dict(os.environ, LOOKALIKE_ADMIN_TOKEN=token, RUST_LOG="warn")
    server = subprocess.Popen([str(ROOT / "target/release/lookalike"), "serve", "--port", str(port),
                               "--data-dir", str(data)], env=env)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        for n, block in enumerate(blocks((ROOT / "README.md").read_text()), 1):
            script = PRELUDE + block.replace("http://127.0.0.1:8080", url)
            print(f"--- README example block {n}", flush=True)
            result = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
            print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
            if result.returncode != 0:
                sys.exit(f"README example block {n} failed with exit status {result.returncode}")
        print("every README example ran")
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
