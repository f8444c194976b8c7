"""Chooses the served teacher's input size and pooling on *training-side* data
(never on the held-out sets): openclipart training classes and training photo
pictures, read from their files as the service would.

    python models/select_teacher.py --corpus corpus      # prints one row per configuration

Two figures per configuration: class retrieval (Recall@1 and MAP@R of each
image among the others, up to 25 images from each of 40 training classes) and
copy detection (an altered copy, as corpus.py makes them, finds its original
among 1,200 training images).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import corpus as corpus_lib
import efficientnet_lite as lite


def tensor(im, size: int) -> torch.Tensor:
    """Over white, stretched to size x size (bilinear, as the service's `stretch`), TF-Lite normalised."""
    im = corpus_lib.on_white(im).resize((size, size), corpus_lib.Image.BILINEAR)
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255
    return lite.normalise(x)


@torch.no_grad()
def feature_maps(net: lite.EfficientNetLite0, images: list, size: int) -> torch.Tensor:
    out = []
    for i in range(0, len(images), 32):
        out.append(net.feature_map(torch.stack([tensor(im, size) for im in images[i:i + 32]])))
    return torch.cat(out)


def pooled(maps: torch.Tensor, p: float) -> torch.Tensor:
    v = maps.mean(dim=(2, 3)) if p == 1 else lite.gem(maps, p)
    return F.normalize(v, dim=1)


def class_retrieval(e: torch.Tensor, labels: np.ndarray) -> tuple[float, float]:
    sim = e @ e.T
    sim.fill_diagonal_(-2)
    order = sim.argsort(dim=1, descending=True).numpy()
    r1, maps = [], []
    for i, row in enumerate(order):
        same = labels[row] == labels[i]
        r = int((labels == labels[i]).sum()) - 1
        r1.append(float(same[0]))
        hits = same[:r]
        maps.append(float((np.cumsum(hits) / np.arange(1, r + 1) * hits).sum() / r))
    return float(np.mean(r1)), float(np.mean(maps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("corpus"))
    ap.add_argument("--sizes", default="160,192,224")
    ap.add_argument("--pooling", default="1,3", help="GeM powers (1: average)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    manifest = json.loads((args.corpus / "manifest.json").read_text())
    classes = corpus_lib.clipart_classes()
    train_classes = manifest["openclipart_train_classes"]

    cls_images, cls_labels = [], []
    for c, name in enumerate(rng.sample([n for n in train_classes if len(classes[n]) >= 10], 40)):
        for p in rng.sample(classes[name], min(25, len(classes[name]))):
            if (im := corpus_lib.open_small(p, 512)) is not None:
                cls_images.append(im)
                cls_labels.append(c)
    pool = [p for n in train_classes for p in classes[n]]
    gallery = [im for p in rng.sample(pool, 1300) if (im := corpus_lib.open_small(p, 512)) is not None][:1000]
    heldout = set(manifest["heldout_photos"])
    pictures: dict[str, Path] = {}  # one file per training picture (not one per resolution)
    for p in corpus_lib.wallpaper_files():
        if str(p) not in heldout:
            pictures.setdefault(corpus_lib.picture_key(p), p)
    for key in rng.sample(sorted(pictures), 25):
        gallery += corpus_lib.random_crops(pictures[key], 8, 256, rng)
    query_ids = rng.sample(range(len(gallery)), 300)
    queries = [corpus_lib.transformed_copy(gallery[i], rng) for i in query_ids]
    print(f"class retrieval: {len(cls_images)} images in 40 classes; copies: {len(queries)} among {len(gallery)}")

    torch.set_num_threads(torch.get_num_threads())
    net = lite.load_imagenet()
    print("| size | pooling | class Recall@1 | class MAP@R | copy Recall@1 |")
    print("| --- | --- | --- | --- | --- |")
    labels = np.array(cls_labels)
    for size in map(int, args.sizes.split(",")):
        cls_maps = feature_maps(net, cls_images, size)
        gal_maps, q_maps = feature_maps(net, gallery, size), feature_maps(net, queries, size)
        for p in map(float, args.pooling.split(",")):
            r1, map_r = class_retrieval(pooled(cls_maps, p), labels)
            found = (pooled(q_maps, p) @ pooled(gal_maps, p).T).argmax(1).numpy()
            copy_r1 = float((found == np.array(query_ids)).mean())
            pooling = "average" if p == 1 else f"GeM p={p:g}"
            print(f"| {size} | {pooling} | {r1:.3f} | {map_r:.3f} | {copy_r1:.3f} |", flush=True)


if __name__ == "__main__":
    main()
