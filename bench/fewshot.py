"""Few-shot fine-tuning over HTTP: does one POST /admin/finetune on 5 labelled
images per class help *other* images of those classes?

Starts the release binary on a fresh data directory, uploads
corpus/eval/fewshot/gallery (5 images of each held-out openclipart class that
has 6 or more, labelled; `make corpus` writes it), and searches with the
held-out classes' other images (corpus/eval/fewshot/queries, never in the
gallery): Recall@1, and MAP@R with R = 5. Then one fine-tune job with the
given parameters (default: the service's defaults), and the same measurement.

    make bench-fewshot      # or: .venv/bin/python bench/fewshot.py [--params '{"freeze": 0.8}'] [--model DIR]

`--regime many` measures the other regime a new user meets: hundreds of labels
with a few images each. Its labels are the validation rows of corpus/train.npz
(`val`: 251 clip-art and stamp images the distilled default never trained on,
and not held out either, so defaults may be chosen on them): each label's 4 gallery images and 2 queries are altered copies of one
image (crop, resize, colour, flip, rotation, border, JPEG; models/corpus.py
transformed_copy).
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
MANY_SHOTS, MANY_QUERIES = 4, 2


def load(folder: Path) -> list[tuple[bytes, str]]:
    return [(f.read_bytes(), c.name) for c in sorted(folder.iterdir()) for f in sorted(c.iterdir())]


def many_labels(corpus: Path, seed: int = 0) -> tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]:
    """Gallery and queries of the many-labels regime (see the module doc)."""
    import io
    import random
    import sys

    sys.path.insert(0, str(ROOT / "models"))
    from PIL import Image

    from corpus import transformed_copy  # models/corpus.py

    data = np.load(corpus / "train.npz")
    images = data["images"]
    rng = random.Random(seed)
    gallery, queries = [], []
    for i in np.flatnonzero(data["val"]):
        original = Image.fromarray(images[i].transpose(1, 2, 0), "RGBA")
        for n in range(MANY_SHOTS + MANY_QUERIES):
            buf = io.BytesIO()
            transformed_copy(original, rng).save(buf, format="JPEG", quality=rng.randint(30, 90))
            (gallery if n < MANY_SHOTS else queries).append((buf.getvalue(), f"v{i}"))
    return gallery, queries


def evaluate(base: str, queries: list[tuple[bytes, str]], r: int = SHOTS) -> dict:
    def one(query: tuple[bytes, str]) -> tuple[float, float] | None:
        data, label = query
        try:
            hits = request(f"{base}/search?k={r}", "POST", data, {"content-type": "application/octet-stream"})
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500:
                return None  # refused by the service's limits (a few clip-art files are huge)
            raise
        relevant = [h["label"] == label for h in hits["results"][:r]]
        found, precision_sum = 0, 0.0
        for rank, hit in enumerate(relevant, 1):
            if hit:
                found += 1
                precision_sum += found / rank
        return float(relevant[0]) if relevant else 0.0, precision_sum / r

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
    ap.add_argument("--regime", choices=("classes", "many"), default="classes",
                    help="classes: 5 images of each held-out class; many: hundreds of labels x 4 images (module doc)")
    args = ap.parse_args()

    if args.regime == "many":
        gallery, queries = many_labels(args.corpus)
        shots = MANY_SHOTS
    else:
        gallery = load(args.corpus / "eval/fewshot/gallery")
        queries = load(args.corpus / "eval/fewshot/queries")
        shots = SHOTS
    options = ["--index-dump-interval-secs", "0"] + (["--model", str(args.model)] if args.model else [])
    with serve(args.binary, args.port, options, "lookalike-bench-fewshot-") as base:
        for label in sorted({label for _, label in gallery}):
            body, content_type = multipart([data for data, lab in gallery if lab == label], label)
            request(f"{base}/gallery", "POST", body, {"content-type": content_type})
        model_before = request(f"{base}/health")["model"]
        before = evaluate(base, queries, shots)
        job = wait_for_job(base, start_job(base, json.loads(args.params)))
        after = evaluate(base, queries, shots)
        model_after = request(f"{base}/health")["model"]

    classes = len({label for _, label in gallery})
    what = ("altered copies of one validation image each" if args.regime == "many"
            else "held-out openclipart classes")
    print(f"gallery: {len(gallery)} images ({shots} of each of {classes} labels: {what}); "
          f"queries: {before['queries']} other images of those labels (of {len(queries)}; the rest exceed the "
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
    for metric, name in (("recall_at_1", "Recall@1"), ("map_at_r", f"MAP@R (R = {shots})")):
        b, a = before[metric], after[metric]
        print(f"| {name} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"before": before, "after": after, "job": job}, indent=2))


if __name__ == "__main__":
    main()
