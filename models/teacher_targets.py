"""The teacher's embedding of every clean training image, computed once.

    python models/teacher_targets.py --corpus corpus        # writes corpus/teacher-160.npy

The teacher (EfficientNet-Lite0 with its ImageNet weights, models/efficientnet_lite.py)
costs about 60x the student per image on a CPU, so the distillation trainer
(models/train_general.py --teacher) reads these targets instead of running it:
row i is the L2-normalised GeM-pooled (p = 3) 1280-d feature of train.npz's
image i, composited over white and resized to `--size` with TF-Lite normalisation.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import efficientnet_lite as lite


@torch.no_grad()
def embed(encoder: lite.EfficientNetLiteEncoder, rgba_u8: torch.Tensor, size: int) -> torch.Tensor:
    rgba = rgba_u8.float() / 255
    x = rgba[:, :3] * rgba[:, 3:] + (1 - rgba[:, 3:])  # over white, as the service composites
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return encoder(lite.normalise(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("corpus"))
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--gem-p", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.corpus / f"teacher-{args.size}.npy"
    images = torch.from_numpy(np.load(args.corpus / "train.npz")["images"])
    encoder = lite.EfficientNetLiteEncoder(lite.load_imagenet(), gem_p=args.gem_p).eval()
    started = time.time()
    rows = []
    for i in range(0, len(images), args.batch):
        rows.append(embed(encoder, images[i:i + args.batch], args.size).numpy().astype(np.float16))
        if (i // args.batch) % 20 == 0:
            done = i + len(rows[-1])
            print(f"{done}/{len(images)} ({done / (time.time() - started):.0f} img/s)", flush=True)
    tmp = out.with_suffix(".tmp.npy")
    np.save(tmp, np.concatenate(rows))
    tmp.replace(out)
    print(f"wrote {out}: {len(images)} targets in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
