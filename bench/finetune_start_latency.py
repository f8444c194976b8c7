"""Search latency while a fine-tune starts on large photos: 300 labelled
images of about 8 MiB each (noise PNGs, 10 labels) in the gallery, one
client searching back to back, 10 s idle and then from the moment
`POST /admin/finetune` is sent until the job ends. The job reads and decodes
its images in chunks (its data preparation), trains a few steps, and does
not commit. Latencies are split by the job's phase, read from its status.

    python bench/finetune_start_latency.py [--images 300]   (make bench-finetune-start)
"""

from __future__ import annotations

import argparse
import io
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune import ADMIN, ROOT, SearchProbe, multipart, probe, request, serve, start_job  # noqa: E402

SIDE = 1672  # 1672 x 1672 x 3 bytes of noise: a PNG of about 8 MiB


def noise_png(rng: np.random.Generator) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(out, format="PNG", compress_level=1)
    return out.getvalue()


class PhaseWatch(threading.Thread):
    """Polls the job; `phases` is a list of (time, phase) where the phase changed."""

    def __init__(self, base: str, job: dict):
        super().__init__(daemon=True)
        self.base, self.job = base, job
        self.phases: list[tuple[float, str]] = [(time.perf_counter(), "preparing")]

    def run(self) -> None:
        while self.job["state"] not in ("done", "failed", "cancelled"):
            time.sleep(0.05)
            self.job = request(f"{self.base}/admin/finetune/{self.job['id']}", headers=ADMIN)
            phase = "preparing" if self.job["state"] in ("queued", "training") and self.job["step"] == 0 \
                and not self.job["step_losses"] else self.job["state"]
            if phase != self.phases[-1][1]:
                self.phases.append((time.perf_counter(), phase))

    def phase_at(self, t: float) -> str:
        return [p for at, p in self.phases if at <= t][-1] if t >= self.phases[0][0] else "before"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--port", type=int, default=8185)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    query = io.BytesIO()
    small.save(query, format="PNG")
    queries = [(query.getvalue(), 0)]
    with serve(ROOT / "target/release/lookalike", args.port, [], "lookalike-bench-ftstart-") as base:
        started = time.monotonic()
        sizes = []
        for i in range(args.images):
            image = noise_png(rng)
            sizes.append(len(image))
            body, content_type = multipart([image], f"label-{i % 10}")
            request(f"{base}/gallery", "POST", body, {"content-type": content_type})
        upload_s = time.monotonic() - started
        idle = probe(base, queries, 10)
        during = SearchProbe(base, queries)
        during.start()
        job = start_job(base, {"epochs": 1, "steps_per_epoch": 3, "p": 4, "k": 4, "commit": "if_better",
                               "validation_fraction": 0.2, "augment": False})
        watch = PhaseWatch(base, job)
        watch.start()
        watch.join()
        during.stop.set()
        during.join()
        job = watch.job
    print(f"{args.images} images of {np.mean(sizes) / 2**20:.1f} MiB on average uploaded in {upload_s:.0f} s; "
          f"job {job['state']}, {job['data']['train_images']} training images")
    print("| when | searches | errors | p50 ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = [("idle, 10 s", idle.latencies, idle.errors)]
    by_phase: dict[str, list[float]] = {}
    for end, latency in zip(during.ends, during.latencies):
        by_phase.setdefault(watch.phase_at(end), []).append(latency)
    rows += [(f"during the job: {phase}", values, 0) for phase, values in by_phase.items()]
    rows.append(("during the whole job", during.latencies, during.errors))
    for name, values, errors in rows:
        ms = np.array(values) * 1e3
        print(f"| {name} | {len(ms)} | {errors} | {np.percentile(ms, 50):.1f} | {np.percentile(ms, 99):.1f} | "
              f"{ms.max():.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
