"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (IDX files, gzipped)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(split: str, data_dir: Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of the `train` or `test` split."""
    prefix = {"train": "train", "test": "t10k"}[split]
    if not (data_dir / f"{prefix}-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"Fashion-MNIST not found in {data_dir}: apt-get install dataset-fashion-mnist")
    images = _read_idx(data_dir / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(data_dir / f"{prefix}-labels-idx1-ubyte.gz")
    return images, labels.astype(np.int64)


def export_folders(split: str, out: Path, limit: int | None = None) -> int:
    """Writes the split as PNG files, one sub-folder per class name (the layout
    `lookalike import` and `train.py --image-folder` read). Returns the count."""
    from PIL import Image

    images, labels = load(split)
    count = len(images) if limit is None else min(limit, len(images))
    for i in range(count):
        folder = out / CLASSES[labels[i]].replace(" ", "-").lower()
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{split}-{i:05d}.png")
    return count


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Export Fashion-MNIST as image folders (one per class).")
    parser.add_argument("--split", choices=["train", "test"], default="test")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    print(f"wrote {export_folders(args.split, args.out, args.limit)} images under {args.out}")
