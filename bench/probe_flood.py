"""A flood of readiness probes next to real traffic: p50/p99 of an
authenticated `GET /gallery/1` alone, then while 1,000 connections call
`/ready` as fast as they can, for each binary given (side by side in one run).
Prints a Markdown table.

    make bench-probe-flood                 # or: python bench/probe_flood.py --help
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import search_load as load  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "models/fashion-mnist"
KEY = "probe-flood-bench-key-0123456789"
SCRIPT = ROOT / "bench/get_route.lua"


def wrk_get(url: str, connections: int, seconds: int, key: str = "") -> dict:
    command = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
               "-s", str(SCRIPT), url]
    output = subprocess.run(command, env=dict(os.environ, BENCH_KEY=key), capture_output=True, text=True,
                            check=True).stdout
    figures = json.loads(output.strip().splitlines()[-1])
    figures["rps"] = figures["requests"] / (figures["duration_us"] / 1e6)
    return figures


def measure(binary: pathlib.Path, name: str, work: pathlib.Path, seconds: int, flood: int) -> list[tuple]:
    folder = work / name
    folder.mkdir()
    port = 8230
    url = f"http://127.0.0.1:{port}"
    command = [str(binary), "serve", "--port", str(port), "--data-dir", str(folder), "--model", str(MODEL),
               "--api-key", KEY]
    process = load.start(command, folder / "service.log")
    try:
        load.wait_healthy(url, process)
        image = load.write_pngs(load.read_images(1), folder / "gallery")
        body, content_type = load.multipart(image)
        request = urllib.request.Request(url + "/gallery", data=body,
                                         headers={"Content-Type": content_type, "api-key": KEY})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 201, response.status
        wrk_get(url + "/gallery/1", 4, 2, KEY)  # warm-up
        quiet = wrk_get(url + "/gallery/1", 4, seconds, KEY)
        probes: dict = {}
        flooder = threading.Thread(target=lambda: probes.update(wrk_get(url + "/ready", flood, seconds + 2)))
        flooder.start()
        time.sleep(1)  # the flood's connections open first
        loud = wrk_get(url + "/gallery/1", 4, seconds, KEY)
        flooder.join()
        rows = [(name, "alone", quiet, None), (name, f"{flood} connections on /ready", loud, probes)]
        for row in rows:
            print(f"  {row[0]}, {row[1]}: p99 {row[2]['p99_us'] / 1000:.1f} ms", file=sys.stderr, flush=True)
        return rows
    finally:
        load.stop(process)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", type=pathlib.Path, action="append",
                    help="a lookalike binary to measure (repeat to compare); default target/release/lookalike")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--flood", type=int, default=1000, help="connections calling /ready")
    args = ap.parse_args()
    binaries = args.binary or [ROOT / "target/release/lookalike"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, binary in enumerate(binaries):
            rows += measure(binary, f"{i + 1}: {binary.name}", pathlib.Path(tmp), args.seconds, args.flood)
    print(f"\nAuthenticated GET /gallery/1 over 4 connections, {args.seconds} s per row")
    print("| binary | beside it | req/s | p50 ms | p99 ms | non-2xx | /ready req/s | /ready non-2xx | /ready socket errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, what, f, probes in rows:
        ready = (f"{probes['rps']:.0f} | {probes['non_2xx']} | {probes['socket_errors']}" if probes
                 else "- | - | -")
        print(f"| {name} | {what} | {f['rps']:.0f} | {f['p50_us'] / 1000:.1f} | {f['p99_us'] / 1000:.1f} | "
              f"{f['non_2xx']} | {ready} |")


if __name__ == "__main__":
    main()
