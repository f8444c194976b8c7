"""Runs the README's shell examples verbatim against a live server.

Every ```sh block that follows a `<!-- readme-test -->` line is run with bash
(`set -euo pipefail`, and curl failing on HTTP errors), in README order, from
the repository root, against the release binary started on a fresh data
directory with an admin token; only the address http://127.0.0.1:8080 is
replaced by the test server's.

    python3 tests/readme_examples.py      (after `cargo build --release`; `make readme-test`)
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live_server import ROOT, live_server  # noqa: E402

MARKER = "<!-- readme-test -->"
PRELUDE = "set -euo pipefail\ncurl() { command curl --fail-with-body \"$@\"; }\n"


def blocks(readme: str) -> list[str]:
    found = re.findall(re.escape(MARKER) + r"\s*```sh\n(.*?)```", readme, flags=re.S)
    if not found:
        raise SystemExit(f"no blocks marked {MARKER} in README.md")
    return found


def main() -> None:
    with live_server() as server:
        for n, block in enumerate(blocks((ROOT / "README.md").read_text()), 1):
            script = PRELUDE + block.replace("http://127.0.0.1:8080", server.url)
            print(f"--- README example block {n}", flush=True)
            result = subprocess.run(["bash", "-c", script], cwd=ROOT, env=server.env, capture_output=True, text=True)
            print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
            if result.returncode != 0:
                sys.exit(f"README example block {n} failed with exit status {result.returncode}")
        print("every README example ran")


if __name__ == "__main__":
    main()
