"""Search latency while a fine-tune trains, by `--finetune-threads`: the same
gallery, the same job (seeded, fixed steps) and one client searching back to
back, once per thread count, side by side. How the default was chosen.

    python bench/finetune_threads.py [--threads 0,1] [--per-class 100]   (make bench-finetune-threads)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune import ROOT, SearchProbe, fashion_mnist, multipart, pick, png, probe, request, serve, start_job, wait_for_job  # noqa: E402,E501


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="2,1", help="--finetune-threads values")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--port", type=int, default=8182)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    train_x, train_y = fashion_mnist.load("train")
    test_x, test_y = fashion_mnist.load("test")
    gallery = pick(train_y, range(10), args.per_class, rng)
    queries = [(png(test_x[i]), int(test_y[i])) for i in pick(test_y, range(10), 20, rng)]
    params = {"epochs": 3, "steps_per_epoch": 20, "seed": 0, "patience": 100}
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        options = ["--model", str(ROOT / "models/fashion-mnist"), "--finetune-threads", str(threads)]
        with serve(ROOT / "target/release/lookalike", args.port, options, "lookalike-bench-threads-") as base:
            for label in range(10):
                ids = [i for i in gallery if train_y[i] == label]
                for start in range(0, len(ids), 32):
                    body, content_type = multipart([png(train_x[i]) for i in ids[start:start + 32]], str(label))
                    request(f"{base}/gallery", "POST", body, {"content-type": content_type})
            idle = probe(base, queries, 10)
            during = SearchProbe(base, queries)
            job = start_job(base, params)
            during.start()
            job = wait_for_job(base, job)
            during.stop.set()
            during.join()
        rows.append((threads, job, idle, during))
    print(f"{len(gallery)} labelled Fashion-MNIST images; job {params}; {os.cpu_count()} cores; one client searching")
    print("| --finetune-threads | job s | idle p50 ms | idle p99 ms | during p50 ms | during p99 ms | searches during |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for threads, job, idle, during in rows:
        i, d = np.array(idle.latencies) * 1e3, np.array(during.latencies) * 1e3
        print(f"| {threads} | {job['elapsed_seconds']:.0f} | {np.percentile(i, 50):.1f} | {np.percentile(i, 99):.1f} | "
              f"{np.percentile(d, 50):.1f} | {np.percentile(d, 99):.1f} | {len(d)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
