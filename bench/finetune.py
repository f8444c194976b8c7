"""Does one POST /admin/finetune teach the encoder classes it never saw?

Starts the release binary on a fresh data directory, fills the gallery over
HTTP with labelled Fashion-MNIST *training* images of every class (the
bundled Fashion-MNIST model, `--model` by default, was trained on classes 0-6
only; 7-9 are unseen), and measures
retrieval over HTTP with *test* images (never in the gallery) as queries:
Recall@1 and MAP@R on the unseen classes 7-9 and on the seen classes 0-6.
Then it runs one fine-tune job through HTTP, waits for the swap, and
measures again. Prints a table and the job's wall time.

    make bench-finetune            # or: .venv/bin/python bench/finetune.py [--per-class 300 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
import fashion_mnist  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-" + uuid.uuid4().hex
ADMIN = {"authorization": f"Bearer {TOKEN}"}
SEEN, UNSEEN = range(0, 7), range(7, 10)


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def request(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=600) as response:
        return json.loads(response.read())


def wait_healthy(base: str, seconds: float = 120) -> None:
    """Returns once `/health` answers (the service loads its model first)."""
    for _ in range(int(seconds * 10)):
        try:
            request(f"{base}/health")
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)


@contextlib.contextmanager
def serve(binary: Path, port: int, options: list[str], prefix: str) -> Iterator[str]:
    """The release binary on a fresh data directory with the admin token, until
    the block ends; yields its base URL. The data directory is removed after."""
    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    env = dict(os.environ, LOOKALIKE_ADMIN_TOKEN=TOKEN)
    cmd = [str(binary), "serve", "--data-dir", str(data_dir), "--port", str(port), *options]
    log = open(data_dir / "service.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def start_job(base: str, params: dict) -> dict:
    return request(f"{base}/admin/finetune", "POST", json.dumps(params).encode(),
                   {**ADMIN, "content-type": "application/json"})


def wait_for_job(base: str, job: dict) -> dict:
    """Polls the job until it ends; its last status."""
    while job["state"] not in ("done", "failed", "cancelled"):
        time.sleep(2)
        job = request(f"{base}/admin/finetune/{job['id']}", headers=ADMIN)
    return job


def multipart(images: list[bytes], label: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for i, data in enumerate(images):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{i}.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="label"\r\n\r\n{label}\r\n'.encode())
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def pick(labels: np.ndarray, classes, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes])


def evaluate(base: str, queries: list[tuple[bytes, int]], per_class: int) -> dict:
    """Recall@1 and MAP@R (R = gallery images of the query's class) over HTTP."""

    def one(query: tuple[bytes, int]) -> tuple[int, float, float]:
        data, label = query
        hits = request(f"{base}/search?k={per_class}", "POST", data, {"content-type": "image/png"})["results"]
        relevant = [h["label"] == str(label) for h in hits[:per_class]]
        precision_sum, found = 0.0, 0
        for rank, hit in enumerate(relevant, 1):
            if hit:
                found += 1
                precision_sum += found / rank
        return label, float(relevant[0]), precision_sum / per_class

    with ThreadPoolExecutor(8) as pool:
        scored = list(pool.map(one, queries))
    out = {}
    for name, classes in (("unseen", UNSEEN), ("seen", SEEN)):
        rows = [(r1, ap) for label, r1, ap in scored if label in classes]
        out[name] = {"recall_at_1": float(np.mean([r for r, _ in rows])), "map_at_r": float(np.mean([a for _, a in rows]))}
    return out


class SearchProbe(threading.Thread):
    """One client searching back to back until stopped: latency and errors while a job runs."""

    def __init__(self, base: str, queries: list[tuple[bytes, int]]):
        super().__init__(daemon=True)
        self.base, self.queries = base, queries
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.ends: list[float] = []  # time.perf_counter() at each answer
        self.errors = 0

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            data, _ = self.queries[n % len(self.queries)]
            started = time.perf_counter()
            try:
                request(f"{self.base}/search?k=10", "POST", data, {"content-type": "image/png"})
                self.ends.append(time.perf_counter())
                self.latencies.append(self.ends[-1] - started)
            except (urllib.error.URLError, ConnectionError):
                self.errors += 1
            n += 1

    def summary(self) -> str:
        ms = np.array(self.latencies) * 1e3
        return (f"{len(ms)} searches, {self.errors} errors, p50 {np.percentile(ms, 50):.1f} ms, "
                f"p99 {np.percentile(ms, 99):.1f} ms")


def probe(base: str, queries: list[tuple[bytes, int]], seconds: float) -> SearchProbe:
    p = SearchProbe(base, queries)
    p.start()
    time.sleep(seconds)
    p.stop.set()
    p.join()
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", type=Path, default=ROOT / "target/release/lookalike")
    ap.add_argument("--per-class", type=int, default=300, help="gallery (training) images per class")
    ap.add_argument("--queries-per-class", type=int, default=300, help="test images per class used as queries")
    ap.add_argument("--params", default="{}", help="JSON parameters of POST /admin/finetune")
    ap.add_argument("--model", type=Path, default=ROOT / "models/fashion-mnist",
                    help="model folder (the Fashion-MNIST one: its unseen classes 7-9 are what this measures)")
    ap.add_argument("--port", type=int, default=8181)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    train_x, train_y = fashion_mnist.load("train")
    test_x, test_y = fashion_mnist.load("test")
    gallery = pick(train_y, range(10), args.per_class, rng)
    queries = [(png(test_x[i]), int(test_y[i])) for i in pick(test_y, range(10), args.queries_per_class, rng)]

    options = ["--max-k", str(args.per_class), "--index-dump-interval-secs", "0", "--model", str(args.model)]
    with serve(args.binary, args.port, options, "lookalike-bench-finetune-") as base:
        for label in range(10):
            ids = [i for i in gallery if train_y[i] == label]
            for start in range(0, len(ids), 32):
                body, content_type = multipart([png(train_x[i]) for i in ids[start:start + 32]], str(label))
                request(f"{base}/gallery", "POST", body, {"content-type": content_type})
        before = evaluate(base, queries, args.per_class)
        idle = probe(base, queries, 10)

        during = SearchProbe(base, queries)
        job = start_job(base, json.loads(args.params))
        during.start()
        job = wait_for_job(base, job)
        during.stop.set()
        during.join()
        after = evaluate(base, queries, args.per_class)
        health = request(f"{base}/health")

    print(f"gallery: {len(gallery)} Fashion-MNIST training images ({args.per_class} per class, labelled); "
          f"queries: {len(queries)} test images; job parameters: {json.dumps(job['params'])}")
    print(f"job: {job['state']}, {job['elapsed_seconds']:.0f} s wall time, {len(job['history'])} epochs, "
          f"result: {job.get('result') or job.get('error')}; active model after: {health['model']}")
    val = job["validation"]
    if val.get("before") and val.get("best"):
        print(f"validation (held-out gallery items): Recall@1 {val['before']['recall_at_1']:.3f} -> "
              f"{val['best']['recall_at_1']:.3f}, MAP@R {val['before']['map_at_r']:.3f} -> {val['best']['map_at_r']:.3f}")
    print(f"one client searching back to back, 10 s before the job: {idle.summary()}")
    print(f"the same during the whole job: {during.summary()}")
    print()
    print("| classes | metric | before | after | change |")
    print("| --- | --- | --- | --- | --- |")
    for name in ("unseen", "seen"):
        for metric in ("recall_at_1", "map_at_r"):
            b, a = before[name][metric], after[name][metric]
            print(f"| {name} {'7-9' if name == 'unseen' else '0-6'} | {metric} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"before": before, "after": after, "job": job}, indent=2))


if __name__ == "__main__":
    main()
