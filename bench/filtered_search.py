"""Filtered search latency as the gallery grows: `GET /gallery/{id}/similar`
with no label, an unknown label, and labels of 5 to 4,096 items, on galleries
of 1,000, 5,000 and 20,000 Fashion-MNIST images (the Fashion-MNIST model),
through the release binary. Then, at the largest size, the same labels
searched only exactly and only by the filtered graph walk, which is how
`--exact-search-limit` was chosen; and `/health` latency while one filtered
search per core runs back to back and items are deleted one after another.

    python bench/filtered_search.py [--sizes 1000,5000,20000] [--queries 200]   (make bench-filtered)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune import multipart, png, request, wait_healthy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
import fashion_mnist  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# (label, items): the rest of the gallery is labelled `common`.
LABELS = [("rare", 5), ("l64", 64), ("l256", 256), ("l1024", 1024), ("l4096", 4096)]


@contextlib.contextmanager
def service(data_dir: Path, port: int, options: list[str]) -> Iterator[str]:
    cmd = [str(ROOT / "target/release/lookalike"), "serve", "--data-dir", str(data_dir), "--port", str(port),
           "--model", str(ROOT / "models/fashion-mnist"), "--max-images-per-request", "64", *options]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=120)


def fill(base: str, images: np.ndarray) -> None:
    labels = []
    for label, count in LABELS:
        labels += [label] * count
    labels += ["common"] * max(0, len(images) - len(labels))
    labels = labels[: len(images)]
    for start in range(0, len(images), 64):
        chunk = range(start, min(start + 64, len(images)))
        # One label per request: runs of the same label stay together.
        for label in dict.fromkeys(labels[i] for i in chunk):
            body, content_type = multipart([png(images[i]) for i in chunk if labels[i] == label], label)
            request(f"{base}/gallery", "POST", body, {"content-type": content_type})


def latency_ms(base: str, label: str | None, queries: int) -> float:
    url = f"{base}/gallery/1/similar?k=10" + (f"&label={label}" if label else "")
    request(url)  # warm
    times = []
    for _ in range(queries):
        started = time.perf_counter()
        request(url)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def probes_under_load(base: str, seconds: float, first_id: int, last_id: int) -> tuple[float, float, int]:
    """`/health` latency (median and worst ms) with filtered searches on every
    core and deletes in flight; and how many items were deleted meanwhile."""
    stop = threading.Event()

    def search() -> None:
        while not stop.is_set():
            request(f"{base}/gallery/1/similar?k=10&label=common")

    deleted = 0

    def delete() -> None:
        nonlocal deleted
        item = first_id
        while not stop.is_set() and item <= last_id:
            req = urllib.request.Request(f"{base}/gallery/{item}", method="DELETE")
            urllib.request.urlopen(req, timeout=600).read()
            deleted, item = deleted + 1, item + 1

    workers = [threading.Thread(target=search) for _ in range(os.cpu_count() or 2)] + [threading.Thread(target=delete)]
    for w in workers:
        w.start()
    times = []
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        started = time.perf_counter()
        request(f"{base}/health")
        times.append((time.perf_counter() - started) * 1e3)
        time.sleep(0.02)
    stop.set()
    for w in workers:
        w.join()
    return statistics.median(times), max(times), deleted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,5000,20000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--port", type=int, default=8096)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    train_x, _ = fashion_mnist.load("train")
    columns = [("none", None), ("unknown", "nope")] + [(f"{n} items", label) for label, n in LABELS] + [("common", "common")]
    print(f"median ms of {args.queries} GET /gallery/1/similar?k=10 per cell, by gallery size and label filter")
    print("| gallery | mode | " + " | ".join(name for name, _ in columns) + " |")
    print("| --- | --- |" + " --- |" * len(columns))
    probes = []
    for size in sizes:
        data_dir = Path(tempfile.mkdtemp(prefix="lookalike-filtered-"))
        try:
            modes = [("default", [])]
            if size == max(sizes):
                modes += [("exact only", ["--exact-search-limit", "1000000"]), ("graph only", ["--exact-search-limit", "0"])]
            for i, (mode, options) in enumerate(modes):
                with service(data_dir, args.port, options) as base:
                    if i == 0:
                        fill(base, train_x[:size])
                    cells = []
                    for _, label in columns:
                        present = label is None or label in ("nope", "common") or dict(LABELS)[label] < size
                        cells.append(f"{latency_ms(base, label, args.queries):.2f}" if present else "")
                    print(f"| {size:,} | {mode} | " + " | ".join(cells) + " |", flush=True)
                    if size == max(sizes) and mode == "default":
                        probes.append((size, *probes_under_load(base, 10.0, size - 2000, size)))
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
    for size, median, worst, deleted in probes:
        print(f"\n/health during 10 s of one `label=common` search per core plus back-to-back deletes "
              f"({deleted} items deleted), gallery of {size:,}: median {median:.1f} ms, worst {worst:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
