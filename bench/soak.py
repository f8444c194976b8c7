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
import http.client
import json
import pathlib
import random
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "models"), str(ROOT / "tests")]
from fashion_mnist import CLASSES, load  # noqa: E402
from finetune import multipart, png  # noqa: E402  (bench/finetune.py)
from live_server import live_server  # noqa: E402


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
        body, content_type = multipart(batch, label)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=60, help="seconds of load before measuring")
    parser.add_argument("--searchers", type=int, default=4, help="clients searching back to back")
    parser.add_argument("--upload-rate", type=float, default=4, help="upload requests per second (1-3 images each)")
    parser.add_argument("--gallery", type=int, default=2000, help="images stored before the load starts")
    args = parser.parse_args()

    duration = args.minutes * 60
    uploads_needed = int(args.upload_rate * (duration + args.warmup) * 3) + 10
    print(f"reading {args.gallery + uploads_needed} training images and 1000 queries ...", flush=True)
    train_x, train_y = load("train")
    test_x, _ = load("test")
    train = [png(image) for image in train_x[: args.gallery + uploads_needed]]
    labels = train_y[: args.gallery + uploads_needed]
    queries = [png(image) for image in test_x[:1000]]

    with live_server() as server:
        process, port = server.process, int(server.url.rsplit(":", 1)[1])
        seed = Client(port)
        for start in range(0, args.gallery, 32):
            body, content_type = multipart(train[start : min(start + 32, args.gallery)], "seed")
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
        with urllib.request.urlopen(f"{server.url}/health", timeout=10) as response:
            items_end = json.load(response)["indexed_items"]

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
