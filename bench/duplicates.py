"""Duplicate scan (`POST /gallery/duplicates`) on this CPU: its time for a
gallery of N synthetic images (random shapes and gradients, all distinct)
into which altered copies are planted at a known rate, and the precision and
recall of the groups it finds against the planted ones, counted by pairs
(two items in one found group are a found pair; an original and its copy are
a planted pair).

Copies, one kind each, in turn: `rescaled` (scaled by 0.6-1.6 and re-encoded
as PNG), `jpeg` (JPEG quality 60-90), `cropped` (90% of each side kept, then
JPEG 85). The gallery is added over HTTP (64 images a request, bulk
priority); the scan runs at the serving model's default distance and at each
`--distances` given. The bundled default model, unless `--model`.

    python bench/duplicates.py [--items 10000,100000] [--copy-rate 0.05] [--distances 0.05]   (make bench-duplicates)
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune import ROOT, request, serve  # noqa: E402

KINDS = ("rescaled", "jpeg", "cropped")


def synthetic(rng: np.random.Generator) -> Image.Image:
    """A random picture: a two-colour gradient and 3 to 8 filled shapes."""
    side = int(rng.integers(80, 161))
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, side)[:, None, None]
    pixels = (a * (1 - ramp) + b * ramp).repeat(side, axis=1).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.integers(0, side, 2)
        x1, y1 = x0 + rng.integers(8, side // 2), y0 + rng.integers(8, side // 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif shape == 1:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            draw.polygon([(int(x0), int(y1)), (int(x1), int(y1)), (int((x0 + x1) // 2), int(y0))], fill=colour)
    return image


def encode(image: Image.Image, fmt: str = "PNG", quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, quality=quality) if fmt == "JPEG" else image.save(out, fmt)
    return out.getvalue()


def altered(image: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    w, h = image.size
    if kind == "rescaled":
        f = float(rng.uniform(0.6, 1.6))
        return encode(image.resize((max(8, int(w * f)), max(8, int(h * f))), Image.BILINEAR))
    if kind == "jpeg":
        return encode(image, "JPEG", int(rng.integers(60, 91)))
    dx, dy = int(rng.integers(0, w // 10 + 1)), int(rng.integers(0, h // 10 + 1))
    return encode(image.crop((dx, dy, dx + w * 9 // 10, dy + h * 9 // 10)), "JPEG", 85)


def gallery(n: int, rate: float, seed: int) -> tuple[list[bytes], list[tuple[int, int, str]]]:
    """n images, of which about n * rate are copies of earlier ones: (bytes, planted (original, copy, kind))."""
    rng = np.random.default_rng(seed)
    images, originals, planted = [], [], []
    copies = int(n * rate)
    for i in range(n - copies):
        picture = synthetic(rng)
        images.append(encode(picture))
        originals.append(picture)
    for c in range(copies):
        source = int(rng.integers(0, len(originals)))
        kind = KINDS[c % len(KINDS)]
        planted.append((source, len(images), kind))
        images.append(altered(originals[source], kind, rng))
    return images, planted


def multipart(images: list[bytes]) -> tuple[bytes, str]:
    boundary = "lookalike-bench-duplicates"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{i}"\r\n\r\n'.encode()
             + data + b"\r\n" for i, data in enumerate(images)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def add_all(base: str, images: list[bytes]) -> list[int]:
    """Adds every image in order (64 a request, two requests at once); their ids, in order."""
    chunks = [images[i:i + 64] for i in range(0, len(images), 64)]

    def send(chunk: list[bytes]) -> list[int]:
        body, content_type = multipart(chunk)
        answer = request(f"{base}/gallery?priority=bulk", "POST", body, {"content-type": content_type})
        return [item["id"] for item in answer["items"]]

    with ThreadPoolExecutor(2) as pool:
        return [i for ids in pool.map(send, chunks) for i in ids]


def scan(base: str, distance: float | None) -> tuple[dict, float]:
    query = "" if distance is None else f"?distance={distance}"
    started = time.monotonic()
    scan = request(f"{base}/gallery/duplicates{query}", "POST")
    while scan["state"] == "running":
        time.sleep(0.2)
        scan = request(f"{base}/gallery/duplicates/{scan['id']}")
    return scan, time.monotonic() - started


def score(groups: list[dict], planted: list[tuple[int, int, str]], ids: list[int]) -> dict:
    """Pair precision over all found pairs, recall per copy kind."""
    found = {frozenset(p) for g in groups for p in combinations([i["id"] for i in g["items"]], 2)}
    truth = {frozenset((ids[o], ids[c])): kind for o, c, kind in planted}
    # Two copies of one original are a true pair too.
    by_source: dict[int, list[int]] = {}
    for o, c, _ in planted:
        by_source.setdefault(ids[o], [ids[o]]).append(ids[c])
    true_pairs = {frozenset(p) for members in by_source.values() for p in combinations(members, 2)}
    precision = len(found & true_pairs) / len(found) if found else 1.0
    recall = {k: np.mean([pair in found for pair, kind in truth.items() if kind == k]) for k in KINDS}
    return {"precision": precision, "recall": recall, "found_pairs": len(found)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", default="10000,100000")
    ap.add_argument("--copy-rate", type=float, default=0.05)
    ap.add_argument("--distances", default="0.05", help="distances to scan at besides the model's default")
    ap.add_argument("--model", default=str(ROOT / "models/default"))
    ap.add_argument("--port", type=int, default=8187)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"model {Path(args.model).name}; copies planted at {args.copy_rate:.0%}, kinds {', '.join(KINDS)} in turn")
    print("| items | add s | distance | scan s | items/s | groups | found pairs | precision | "
          + " | ".join(f"recall {k}" for k in KINDS) + " |")
    print("| --- " * (8 + len(KINDS)) + "|", flush=True)
    for n in [int(x) for x in args.items.split(",")]:
        images, planted = gallery(n, args.copy_rate, args.seed)
        with serve(ROOT / "target/release/lookalike", args.port, ["--model", args.model], "lookalike-bench-dup-") as base:
            started = time.monotonic()
            ids = add_all(base, images)
            added = time.monotonic() - started
            for distance in [None, *(float(d) for d in args.distances.split(",") if d)]:
                result, seconds = scan(base, distance)
                s = score(result["groups"], planted, ids)
                recalls = " | ".join(f"{s['recall'][k]:.3f}" for k in KINDS)
                label = f"{result['distance']:.4f}" + (" (model's)" if distance is None else "")
                print(f"| {n} | {added:.0f} | {label} | {seconds:.1f} | {n / seconds:.0f} | {len(result['groups'])} | "
                      f"{s['found_pairs']} | {s['precision']:.3f} | {recalls} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
