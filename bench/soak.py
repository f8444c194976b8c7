"""A bounded mixed load on the release binary for N minutes: searching
clients back to back, an uploader at a fixed rate, a reader listing and
fetching items. Reports requests, answers by status (only 503 backpressure
is allowed), latency percentiles and the server's resident memory after the
warm-up and at the end (growth must stay under 10%). Exits 1 when either
rule is broken.

    make soak                          # 10 minutes; SOAK_MINUTES=1 make soak for a short one
    python bench/soak.py --help

Images are Fashion-MNIST (Debian's dataset-fashion-mnist): the gallery and
uploads from the training set, each upload a distinct image, the queries
from the test set.
"""

import argparse
import gzip
import http.client
import io
import json
import os
import pathlib
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter, defaultdict

from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATASET = pathlib.Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def read_idx(name: str, count: int):
    with gzip.open(DATASET / name) as f:
        magic, n = struct.unpack(">II", f.read(8))
        if magic == 2051:
            rows, cols = struct.unpack(">II", f.read(8))
            size = rows * cols
            return [f.read(size) for _ in range(min(n, count))], (rows, cols)
        return list(f.read(min(n, count))), None


def pngs(name: str, count: int) -> list[bytes]:
    raw, (rows, cols) = read_idx(name, count)
    out = []
    for pixels in raw:
        buf = io.BytesIO()
        Image.frombytes("L", (cols, rows), pixels).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def multipart(images: list[bytes], label: str) -> tuple[str, bytes]:
    boundary = uuid.uuid4().hex
    body = b""
    for image in images:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
                 "Content-Type: image/png\r\n\r\n").encode() + image + b"\r\n"
    body += f"--{boundary}\r\nContent-Disposition: form-data; name=\"label\"\r\n\r\n{label}\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


class Recorder:
    """Answers and latencies per kind of request, after the warm-up only."""

    def __init__(self):
        self.lock = threading.Lock()
        self.recording = False
        self.statuses = defaultdict(Counter)
        self.latencies = defaultdict(list)

    def add(self, kind: str, status: int, seconds: float):
        with self.lock:
            if self.recording:
                self.statuses[kind][status] += 1
                self.latencies[kind].append(seconds)


class Client:
    """One keep-alive connection; reconnects after an error."""

    def __init__(self, port: int):
        self.port = port
        self.conn = None

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> int:
        for attempt in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                headers = {"Content-Type": content_type} if content_type else {}
                self.conn.request(method, path, body=body, headers=headers)
                response = self.conn.getresponse()
                response.read()
                return response.status
            except (OSError, http.client.HTTPException):
                self.conn = None
                if attempt == 1:
                    return 0  # connection failure: counted as status 0
        return 0


def timed(recorder: Recorder, kind: str, call):
    started = time.perf_counter()
    status = call()
    recorder.add(kind, status, time.perf_counter() - started)
    return status


def searcher(port, queries, stop, recorder, seed):
    client, rng = Client(port), random.Random(seed)
    while not stop.is_set():
        query = rng.choice(queries)
        timed(recorder, "search", lambda: client.request("POST", "/search?k=10", query, "image/png"))


def uploader(port, images, labels, rate, stop, recorder):
    client, rng, n = Client(port), random.Random(7), 0
    next_at = time.monotonic()
    while not stop.is_set() and n < len(images):
        count = rng.randint(1, 3)
        batch, label = images[n : n + count], CLASSES[labels[n]]
        n += count
        content_type, body = multipart(batch, label)
        timed(recorder, "upload", lambda: client.request("POST", "/gallery", body, content_type))
        next_at += 1 / rate
        stop.wait(max(0.0, next_at - time.monotonic()))


def reader(port, stored, stop, recorder):
    """Reads among the `stored` items of the starting gallery (ids 1 to `stored`)."""
    client, rng = Client(port), random.Random(11)
    while not stop.is_set():
        item = rng.randint(1, stored)
        timed(recorder, "read", lambda: client.request("GET", f"/gallery?limit=50&cursor={item}"))
        timed(recorder, "read", lambda: client.request("GET", f"/gallery/{item}/image"))
        stop.wait(0.05)


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def start_server(binary: pathlib.Path, data: pathlib.Path, log: pathlib.Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([str(binary), "serve", "--port", str(port), "--data-dir", str(data)],
                               stderr=log.open("w"), env=dict(os.environ, RUST_LOG="warn"))
    for _ in range(3000):
        try:
            if Client(port).request("GET", "/ready") == 200:
                return process, port
        except OSError:
            pass
        if process.poll() is not None:
            sys.exit(f"the server exited with {process.returncode}; see {log}")
        time.sleep(0.1)
    sys.exit("the server never became ready")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=60, help="seconds of load before measuring")
    parser.add_argument("--searchers", type=int, default=4, help="clients searching back to back")
    parser.add_argument("--upload-rate", type=float, default=4, help="upload requests per second (1-3 images each)")
    parser.add_argument("--gallery", type=int, default=2000, help="images stored before the load starts")
    parser.add_argument("--binary", type=pathlib.Path, default=ROOT / "target/release/lookalike")
    args = parser.parse_args()

    duration = args.minutes * 60
    uploads_needed = int(args.upload_rate * (duration + args.warmup) * 3) + 10
    print(f"reading {args.gallery + uploads_needed} training images and 1000 queries ...", flush=True)
    train = pngs("train-images-idx3-ubyte.gz", args.gallery + uploads_needed)
    labels, _ = read_idx("train-labels-idx1-ubyte.gz", args.gallery + uploads_needed)
    queries = pngs("t10k-images-idx3-ubyte.gz", 1000)

    data = pathlib.Path(tempfile.mkdtemp(prefix="lookalike-soak-"))
    log = ROOT / "target" / "soak-server.log"
    log.parent.mkdir(exist_ok=True)
    process, port = start_server(args.binary, data, log)
    try:
        seed = Client(port)
        for start in range(0, args.gallery, 32):
            content_type, body = multipart(train[start : min(start + 32, args.gallery)], "seed")
            assert seed.request("POST", "/gallery", body, content_type) == 201
        print(f"gallery of {args.gallery} images stored; load for {args.warmup:.0f} s warm-up + {duration:.0f} s",
              flush=True)

        recorder, stop = Recorder(), threading.Event()
        threads = [threading.Thread(target=searcher, args=(port, queries, stop, recorder, i)) for i in range(args.searchers)]
        threads.append(threading.Thread(
            target=uploader,
            args=(port, train[args.gallery :], labels[args.gallery :], args.upload_rate, stop, recorder)))
        threads.append(threading.Thread(target=reader, args=(port, args.gallery, stop, recorder)))
        for thread in threads:
            thread.start()
        time.sleep(args.warmup)
        rss_start = rss_mib(process.pid)
        recorder.recording = True
        began = time.monotonic()
        rss_peak = rss_start
        while time.monotonic() - began < duration:
            time.sleep(min(5, max(0.0, duration - (time.monotonic() - began))))
            rss_peak = max(rss_peak, rss_mib(process.pid))
        recorder.recording = False
        elapsed = time.monotonic() - began
        rss_end = rss_mib(process.pid)
        stop.set()
        for thread in threads:
            thread.join()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            items_end = json.load(response)["indexed_items"]
    finally:
        process.terminate()
        process.wait(timeout=120)
        shutil.rmtree(data, ignore_errors=True)

    print()
    print("| request | count | per second | answers by status | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    bad = Counter()
    for kind in ["search", "upload", "read"]:
        statuses, latencies = recorder.statuses[kind], recorder.latencies[kind]
        count = sum(statuses.values())
        by_status = ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items()))
        bad.update({s: n for s, n in statuses.items() if s >= 400 and s != 503 or s == 0})
        print(f"| {kind} | {count} | {count / elapsed:.1f} | {by_status} | "
              f"{percentile(latencies, 0.5) * 1e3:.1f} | {percentile(latencies, 0.99) * 1e3:.1f} |")
    growth = (rss_end - rss_start) / rss_start * 100
    print()
    print(f"resident memory: {rss_start:.0f} MiB after the warm-up, {rss_end:.0f} MiB at the end "
          f"(peak {rss_peak:.0f} MiB), growth {growth:+.1f}%")
    print(f"measured {elapsed:.0f} s after {args.warmup:.0f} s of warm-up; {args.searchers} searchers, "
          f"{args.upload_rate:g} uploads/s; gallery of {args.gallery} images at the start, {items_end} at the end")
    failures = []
    if bad:
        failures.append(f"answers other than 2xx or 503: {dict(bad)}")
    if growth >= 10:
        failures.append(f"resident memory grew {growth:.1f}% (limit 10%)")
    if failures:
        sys.exit("FAIL: " + "; ".join(failures))
    print("PASS: no errors but 503 backpressure, memory growth under 10%")


if __name__ == "__main__":
    main()
