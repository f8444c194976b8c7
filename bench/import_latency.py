"""Search latency while `lookalike import` adds a folder: one client searching
back to back, 10 s with the service idle, then during an import of 2,000
Fashion-MNIST images (the import sends `priority=bulk`, so the batcher embeds
its images behind the searches). Both against the same service, side by side,
for each `--max-bulk-batch` asked for (a fresh service each).

    python bench/import_latency.py [--images 2000] [--bulk-batches 4,8,16]   (make bench-import-latency)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune import ROOT, SearchProbe, fashion_mnist, multipart, png, probe, request, serve  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--port", type=int, default=8183)
    ap.add_argument("--bulk-batches", default="4,8,16", help="values of --max-bulk-batch to compare")
    args = ap.parse_args()
    test_x, test_y = fashion_mnist.load("test")
    queries = [(png(test_x[i]), int(test_y[i])) for i in range(200)]
    folder = Path(tempfile.mkdtemp(prefix="lookalike-import-"))
    fashion_mnist.export_folders("train", folder, args.images)
    print(f"import of {args.images} Fashion-MNIST images; one client searching; Fashion-MNIST model")
    print("| --max-bulk-batch | import images/s | when | searches | errors | p50 ms | p95 ms | p99 ms | p95 / idle |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for bulk in [int(b) for b in args.bulk_batches.split(",")]:
        options = ["--model", str(ROOT / "models/fashion-mnist"), "--max-bulk-batch", str(bulk)]
        with serve(ROOT / "target/release/lookalike", args.port, options, "lookalike-bench-import-") as base:
            body, content_type = multipart([png(test_x[i]) for i in range(200, 264)], "seed")
            request(f"{base}/gallery", "POST", body, {"content-type": content_type})
            idle = probe(base, queries, 10)
            during = SearchProbe(base, queries)
            during.start()
            started = time.monotonic()
            subprocess.run([str(ROOT / "target/release/lookalike"), "import", "--quiet", "--url", base, str(folder)],
                           check=True, stdout=subprocess.DEVNULL)
            seconds = time.monotonic() - started
            during.stop.set()
            during.join()
        i, d = np.array(idle.latencies) * 1e3, np.array(during.latencies) * 1e3
        rate = f"{args.images / seconds:.0f}"
        for name, ms, errors, ratio in (("idle, 10 s", i, idle.errors, ""),
                                        ("during", d, during.errors,
                                         f"{np.percentile(d, 95) / np.percentile(i, 95):.2f}x")):
            print(f"| {bulk} | {rate} | {name} | {len(ms)} | {errors} | {np.percentile(ms, 50):.1f} | "
                  f"{np.percentile(ms, 95):.1f} | {np.percentile(ms, 99):.1f} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
