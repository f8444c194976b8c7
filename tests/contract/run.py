"""Contract test: schemathesis generates requests from openapi.yaml and runs
them against the release binary on a fresh data directory (with a small
gallery and an admin token), checking every response against the spec: no
5xx, status codes and bodies as documented, headers, content types.

    .venv/bin/python tests/contract/run.py [--max-examples N]     (`make contract-test`)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-examples", type=int, default=100)
    args = ap.parse_args()
    with live_server() as server:
        add_images(server.url)
        st = Path(sys.executable).with_name("st")
        result = subprocess.run([
            str(st), "--config-file", str(ROOT / "tests/contract/schemathesis.toml"),
            "run", str(ROOT / "openapi.yaml"), "--url", server.url,
            "--header", f"Authorization: Bearer {server.token}",
            "--max-examples", str(args.max_examples),  # every check runs, as configured in schemathesis.toml
            "--generation-deterministic", "--no-color",
        ], cwd=ROOT)
        if server.process.poll() is not None:
            sys.exit("the service died during the contract test")
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
