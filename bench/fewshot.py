"""Few-shot fine-tuning over HTTP: does one POST /admin/finetune on 5 labelled
images per class help *other* images of those classes?

Starts the release binary on a fresh data directory, uploads
corpus/eval/fewshot/gallery (5 images of each held-out openclipart class that
has 6 or more, labelled; `make corpus` writes it), and searches with the
held-out classes' other images (corpus/eval/fewshot/queries, never in the
gallery): Recall@1, and MAP@R with R = 5. Then one fine-tune job with the
given parameters (default: the service's defaults), and the same measurement.

    make bench-fewshot      # or: .venv/bin/python bench/fewshot.py [--params '{"freeze": 0.8}'] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from finetune import multipart, request, serve, start_job, wait_for_job

ROOT = Path(__file__).resolve().parent.parent
SHOTS = 5


def load(folder: Path) -> list[tuple[bytes, str]]:
    return [(f.read_bytes(), c.name) for c in sorted(folder.iterdir()) for f in sorted(c.iterdir())]


def evaluate(base: str, queries: list[tuple[bytes, str]]) -> dict:
    def one(query: tuple[bytes, str]) -> tuple[float, float] | None:
        data, label = query
        try:
            hits = request(f"{base}/search?k={SHOTS}", "POST", data, {"content-type": "application/octet-stream"})
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500:
                return None  # refused by the service's limits (a few clip-art files are huge)
            raise
        relevant = [h["label"] == label for h in hits["results"][:SHOTS]]
        found, precision_sum = 0, 0.0
        for rank, hit in enumerate(relevant, 1):
            if hit:
                found += 1
                precision_sum += found / rank
        return float(relevant[0]) if relevant else 0.0, precision_sum / SHOTS

    with ThreadPoolExecutor(4) as pool:
        scored = [s for s in pool.map(one, queries) if s is not None]
    return {"queries": len(scored), "recall_at_1": float(np.mean([r for r, _ in scored])),
            "map_at_r": float(np.mean([a for _, a in scored]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", type=Path, default=ROOT / "target/release/lookalike")
    ap.add_argument("--corpus", type=Path, default=ROOT / "corpus")
    ap.add_argument("--model", type=Path, help="model folder (default: the bundled one)")
    ap.add_argument("--params", default="{}", help="JSON parameters of POST /admin/finetune")
    ap.add_argument("--port", type=int, default=8182)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    gallery = load(args.corpus / "eval/fewshot/gallery")
    queries = load(args.corpus / "eval/fewshot/queries")
    options = ["--index-dump-interval-secs", "0"] + (["--model", str(args.model)] if args.model else [])
    with serve(args.binary, args.port, options, "lookalike-bench-fewshot-") as base:
        for label in sorted({label for _, label in gallery}):
            body, content_type = multipart([data for data, lab in gallery if lab == label], label)
            request(f"{base}/gallery", "POST", body, {"content-type": content_type})
        model_before = request(f"{base}/health")["model"]
        before = evaluate(base, queries)
        job = wait_for_job(base, start_job(base, json.loads(args.params)))
        after = evaluate(base, queries)
        model_after = request(f"{base}/health")["model"]

    classes = len({label for _, label in gallery})
    print(f"gallery: {len(gallery)} images ({SHOTS} of each of {classes} held-out openclipart classes, labelled); "
          f"queries: {before['queries']} other images of those classes (of {len(queries)}; the rest exceed the "
          f"service's limits)")
    print(f"model {model_before} -> {model_after}; job parameters: {json.dumps(job['params'])}")
    print(f"job: {job['state']}, {job['elapsed_seconds']:.0f} s wall time, {len(job['history'])} epochs; "
          f"result: {job.get('result') or job.get('error')}")
    val = job["validation"]
    if val.get("before") and val.get("best"):
        print(f"validation (held-out gallery items and their views): MAP@R {val['before']['map_at_r']:.3f} -> "
              f"{val['best']['map_at_r']:.3f}, Recall@1 {val['before']['recall_at_1']:.3f} -> "
              f"{val['best']['recall_at_1']:.3f}")
    print()
    print("| queries (not in the gallery) | before | after | change |")
    print("| --- | --- | --- | --- |")
    for metric, name in (("recall_at_1", "Recall@1"), ("map_at_r", "MAP@R (R = 5)")):
        b, a = before[metric], after[metric]
        print(f"| {name} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"before": before, "after": after, "job": job}, indent=2))


if __name__ == "__main__":
    main()
