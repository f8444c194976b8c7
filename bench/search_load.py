"""POST /search end to end under a real HTTP load generator (wrk), lookalike
next to the Python baseline (bench/baseline), same model, same gallery, same
query image, same machine, in one run. Prints a Markdown table.

    make bench-http                       # or: python bench/search_load.py --help

The gallery is Fashion-MNIST test images (Debian's dataset-fashion-mnist),
saved as PNG and uploaded the way a user would: POST /gallery to lookalike,
a folder read at start by the baseline.
"""

import argparse
import gzip
import json
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATASET = pathlib.Path("/usr/share/datasets/fashion-mnist")


def read_images(count: int, offset: int = 0) -> np.ndarray:
    with gzip.open(DATASET / "t10k-images-idx3-ubyte.gz") as f:
        _, n, rows, cols = struct.unpack(">IIII", f.read(16))
        data = np.frombuffer(f.read(), dtype=np.uint8).reshape(n, rows, cols)
    return data[offset : offset + count]


def write_pngs(images: np.ndarray, folder: pathlib.Path) -> list[pathlib.Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(images):
        path = folder / f"{i:06d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            sys.exit(f"{url}: the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"{url}: not healthy after {timeout} s")


def multipart(files: list[pathlib.Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for path in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode() + path.read_bytes() + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def upload_gallery(url: str, files: list[pathlib.Path]) -> None:
    for i in range(0, len(files), 64):
        body, content_type = multipart(files[i : i + 64])
        request = urllib.request.Request(url + "/gallery", data=body, headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 201, response.status


def wrk(url: str, image: pathlib.Path, connections: int, seconds: float) -> dict:
    command = [
        "wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "10s",
        "-s", str(ROOT / "bench" / "post_image.lua"), url + "/search?k=10",
    ]
    env = dict(os.environ, BENCH_IMAGE=str(image))
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    figures = json.loads(output.strip().splitlines()[-1])
    figures["rps"] = figures["requests"] / (figures["duration_us"] / 1e6)
    return figures


def start(command: list[str], log: pathlib.Path) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def run_series(name: str, url: str, image: pathlib.Path, levels: list[int], seconds: float) -> list[dict]:
    wrk(url, image, 8, 2)  # warm-up: first forwards, connection pools, caches
    rows = []
    for c in levels:
        figures = wrk(url, image, c, seconds)
        figures.update(service=name, concurrency=c)
        rows.append(figures)
        print(f"  {name} c={c}: {figures['rps']:.0f} req/s", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", type=pathlib.Path, default=ROOT / "target/release/lookalike")
    parser.add_argument("--model", type=pathlib.Path, default=ROOT / "models/default")
    parser.add_argument("--gallery-size", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra argument for lookalike serve")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk; `make bench` does it)")

    work = pathlib.Path(tempfile.mkdtemp(prefix="lookalike-bench-"))
    gallery = write_pngs(read_images(args.gallery_size), work / "gallery")
    query = write_pngs(read_images(1, offset=9000), work / "query")[0]
    print(f"gallery {len(gallery)} Fashion-MNIST PNGs, query {query.name}, {args.seconds:.0f} s per row", file=sys.stderr)
    rows = []

    serve = [str(args.binary), "serve", "--port", "8090", "--data-dir", str(work / "data"), "--model", str(args.model)]
    lookalike = start(serve + args.serve_arg, work / "lookalike.log")
    try:
        wait_healthy("http://127.0.0.1:8090", lookalike)
        upload_gallery("http://127.0.0.1:8090", gallery)
        rows += run_series("lookalike", "http://127.0.0.1:8090", query, levels, args.seconds)
    finally:
        stop(lookalike)

    if not args.skip_baseline:
        command = [sys.executable, str(ROOT / "bench/baseline/app.py"), "--model", str(args.model),
                   "--gallery", str(work / "gallery"), "--port", "8091"]
        baseline = start(command, work / "baseline.log")
        try:
            wait_healthy("http://127.0.0.1:8091", baseline)
            rows += run_series("python baseline", "http://127.0.0.1:8091", query, levels, args.seconds)
        finally:
            stop(baseline)

    print("| service | concurrency | requests/s | p50 ms | p99 ms | non-2xx | socket errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['service']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_us'] / 1e3:.1f} | "
              f"{r['p99_us'] / 1e3:.1f} | {r['non_2xx']} | {r['socket_errors']} |")
    by = {(r["service"], r["concurrency"]): r for r in rows}
    ours = {c: by[("lookalike", c)] for c in levels}
    if 1 in ours and 32 in ours:
        print(f"\nbatching gain, lookalike req/s at c=32 over c=1: {ours[32]['rps'] / ours[1]['rps']:.1f}x")
    if ("python baseline", 32) in by and 32 in ours:
        base = by[("python baseline", 32)]
        print(f"lookalike over the Python baseline at c=32: {ours[32]['rps'] / base['rps']:.1f}x requests/s, "
              f"p99 {ours[32]['p99_us'] / 1e3:.1f} ms vs {base['p99_us'] / 1e3:.1f} ms")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
