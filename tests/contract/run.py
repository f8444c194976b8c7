"""Contract test: schemathesis generates requests from openapi.yaml and runs
them against the release binary on a fresh data directory (with a small
gallery and an admin token), checking every response against the spec: no
5xx, status codes and bodies as documented, headers, content types.

    .venv/bin/python tests/contract/run.py [--max-examples N]     (`make contract-test`)
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_images(url: str) -> None:
    """A few unlabelled images and one labelled, so ids exist and no fine-tune can start."""
    for i, path in enumerate(sorted((ROOT / "tests/fixtures/fmnist").glob("*.png"))):
        boundary = uuid.uuid4().hex
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
                f"Content-Type: image/png\r\n\r\n").encode() + path.read_bytes() + b"\r\n"
        if i == 0:
            body += f'--{boundary}\r\nContent-Disposition: form-data; name="label"\r\n\r\nbag\r\n'.encode()
        body += f"--{boundary}--\r\n".encode()
        request = urllib.request.Request(f"{url}/gallery", data=body, method="POST",
                                         headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        urllib.request.urlopen(request, timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-examples", type=int, default=100)
    args = ap.parse_args()
    port, token = free_port(), secrets.token_hex(16)
    url = f"http://127.0.0.1:{port}"
    data = Path(tempfile.mkdtemp(prefix="lookalike-contract-"))
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
        add_images(url)
        st = Path(sys.executable).with_name("st")
        result = subprocess.run([
            str(st), "--config-file", str(ROOT / "tests/contract/schemathesis.toml"),
            "run", str(ROOT / "openapi.yaml"), "--url", url,
            "--header", f"Authorization: Bearer {token}",
            "--max-examples", str(args.max_examples),  # every check runs, as configured in schemathesis.toml
            "--generation-deterministic", "--no-color",
        ], cwd=ROOT)
        if server.poll() is not None:
            sys.exit("the service died during the contract test")
        sys.exit(result.returncode)
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
