"""Train the ShuffleNet v1 encoder as a Siamese network.

    python models/train.py --out runs/default                 # Fashion-MNIST, seen classes 0-6
    python models/train.py --image-folder DIR --out runs/mine  # one sub-folder per class
    python models/export.py --checkpoint runs/default/best.pt --out models/default

Recipe (see models/README.md for the measurements behind it):
- PK batches: P classes x K images each.
- Warm-up: the first `--warmup-epochs` epochs train with a cosine classifier
  (normalised softmax) over the training classes. From scratch, triplet loss
  on PK batches sits at the margin for epochs (batch-hard collapses); the
  warm-up gives the Siamese losses a structured embedding to refine.
- Then the Siamese objectives on every pair and triplet of the batch:
  contrastive (label 1 = same class: d^2; 0 = different: max(0, m - d)^2)
  and triplet max(d(a,p) - d(a,n) + margin, 0) with batch-all mining (the
  mean over the triplets that still violate the margin), where d is the
  Euclidean distance between L2-normalised embeddings.
- Images are resized exactly as the service does (bilinear, stretch to the
  input size), augmented with a padded random crop and a horizontal flip.
- A stratified validation split is carved from the training set; Recall@1 on
  it is reported per epoch and picks the best checkpoint. Checkpoints resume.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_mnist  # noqa: E402
from export import DEFAULT_ARCH, DEFAULT_PREPROCESS, build_model  # noqa: E402

SEEN_CLASSES = tuple(range(7))


def resize_grey(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize as the service does it (a convolution resize, like PIL's)."""
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def load_fashion_mnist(size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    images, labels = fashion_mnist.load("train")
    keep = np.isin(labels, SEEN_CLASSES)
    images = resize_grey(images[keep], size)
    return np.repeat(images[:, None], 3, axis=1), labels[keep], list(fashion_mnist.CLASSES[: len(SEEN_CLASSES)])


def load_folder(root: Path, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            try:
                im = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
            except OSError:
                continue
            images.append(np.asarray(im).transpose(2, 0, 1))
            labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64), classes


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator):
    val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        val[idx[: max(1, int(len(idx) * fraction))]] = True
    return np.flatnonzero(~val), np.flatnonzero(val)


def pk_batches(labels: np.ndarray, p: int, k: int, rng: np.random.Generator):
    """One epoch of PK batches: every image about once, P classes x K images each."""
    by_class = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)}
    batches = []
    while True:
        ready = [c for c, idx in by_class.items() if len(idx) >= k]
        if len(ready) < min(p, 2):
            return batches
        chosen = rng.choice(ready, size=min(p, len(ready)), replace=False)
        batches.append(np.concatenate([[by_class[c].pop() for _ in range(k)] for c in chosen]))


def augment(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    n, _, h, w = x.shape
    x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = np.random.randint(0, 2 * pad + 1, size=2)
    x = x[:, :, dy:dy + h, dx:dx + w]
    flip = torch.rand(n) < 0.5
    x[flip] = x[flip].flip(3)
    return x


def to_input(images: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    x = torch.from_numpy(images).float().div_(255)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def pairwise_distance(e: torch.Tensor) -> torch.Tensor:
    return (2 - 2 * e @ e.T).clamp_min(1e-12).sqrt()


def triplet_batch_all(e: torch.Tensor, y: torch.Tensor, margin: float) -> tuple[torch.Tensor, float]:
    d = pairwise_distance(e)
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(y), dtype=torch.bool)
    valid = (same & ~eye)[:, :, None] & ~same[:, None, :]  # (a, p, n)
    losses = (d[:, :, None] - d[:, None, :] + margin).clamp_min(0)[valid]
    active = losses > 1e-6
    return (losses[active].mean() if active.any() else losses.sum()), active.float().mean().item()


def contrastive(e: torch.Tensor, y: torch.Tensor, margin: float) -> torch.Tensor:
    d = pairwise_distance(e)
    same = (y[:, None] == y[None, :]).float()
    off_diag = ~torch.eye(len(y), dtype=torch.bool)
    loss = same * d.pow(2) + (1 - same) * (margin - d).clamp_min(0).pow(2)
    return loss[off_diag].mean()


class CosineClassifier(torch.nn.Module):
    def __init__(self, dim: int, classes: int, scale: float = 16.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(classes, dim) * 0.01)
        self.scale = scale

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.scale * e @ F.normalize(self.weight, dim=1).T


@torch.no_grad()
def embed(model, images: np.ndarray, pre: dict, batch: int = 256) -> torch.Tensor:
    model.eval()
    out = [model(to_input(images[i:i + batch], pre["mean"], pre["std"])) for i in range(0, len(images), batch)]
    return torch.cat(out)


def recall_at_1(emb: torch.Tensor, labels: np.ndarray) -> float:
    """Leave-one-out Recall@1 within a set."""
    sim = emb @ emb.T
    sim.fill_diagonal_(-2)
    return float((labels[sim.argmax(1).numpy()] == labels).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--image-folder", type=Path, help="train on DIR/<class>/<image> instead of Fashion-MNIST")
    ap.add_argument("--size", type=int, default=64, help="input side in pixels")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--warmup-epochs", type=int, default=3)
    ap.add_argument("--p", type=int, default=7, help="classes per batch")
    ap.add_argument("--k", type=int, default=16, help="images per class per batch")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--triplet-margin", type=float, default=0.2)
    ap.add_argument("--contrastive-margin", type=float, default=0.7)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--max-steps", type=int, default=0, help="batches per epoch, for smoke tests (0: all)")
    args = ap.parse_args()

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    arch, pre = dict(DEFAULT_ARCH), {**DEFAULT_PREPROCESS, "size": args.size}
    t0 = time.time()
    if args.image_folder:
        images, labels, class_names = load_folder(args.image_folder, pre["size"])
        data_desc = f"image folder {args.image_folder}"
    else:
        images, labels, class_names = load_fashion_mnist(pre["size"])
        data_desc = "Fashion-MNIST train split, seen classes 0-6"
    rng = np.random.default_rng(args.seed)
    train_idx, val_idx = stratified_split(labels, args.val_fraction, rng)
    print(f"{len(train_idx)} training and {len(val_idx)} validation images, {len(class_names)} classes "
          f"(loaded in {time.time() - t0:.0f}s)")

    model = build_model(arch)
    classifier = CosineClassifier(arch["embedding_dim"], len(class_names))
    params = list(model.parameters()) + list(classifier.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(pk_batches(labels[train_idx], args.p, args.k, np.random.default_rng(0)))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch,
                                                    pct_start=0.15)
    state = {"epoch": 0, "best_recall": -1.0, "history": [], "seconds": 0.0}
    last = args.out / "last.pt"
    if last.exists():
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        classifier.load_state_dict(ckpt["classifier"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        print(f"resumed from {last} after epoch {state['epoch']}")

    recipe = {k: getattr(args, k) for k in ("size", "epochs", "warmup_epochs", "p", "k", "lr", "weight_decay", "triplet_margin",
                                            "contrastive_margin", "val_fraction", "seed")}
    recipe.update(optimizer="AdamW", schedule="one-cycle", mining="batch-all",
                  losses="cosine-softmax warm-up, then triplet + contrastive",
                  augmentation="replicate-pad 4 + random crop, horizontal flip")
    for epoch in range(state["epoch"], args.epochs):
        started = time.time()
        model.train()
        batches = pk_batches(labels[train_idx], args.p, args.k, np.random.default_rng(args.seed + epoch))
        batches = batches[: args.max_steps or None]
        warm = epoch < args.warmup_epochs
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs} ({'warm-up' if warm else 'siamese'})", unit="batch")
        losses = []
        for batch in bar:
            idx = train_idx[batch]
            x = augment(to_input(images[idx], pre["mean"], pre["std"]))
            y = torch.from_numpy(labels[idx])
            e = model(x)
            if warm:
                loss = F.cross_entropy(classifier(e), y, label_smoothing=0.1)
                active = float("nan")
            else:
                trip, active = triplet_batch_all(e, y, args.triplet_margin)
                loss = trip + contrastive(e, y, args.contrastive_margin)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", active=f"{active:.2f}")
        val_recall = recall_at_1(embed(model, images[val_idx], pre), labels[val_idx])
        state["seconds"] += time.time() - started
        state["epoch"] = epoch + 1
        state["history"].append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_recall_at_1": val_recall,
                                 "seconds": round(time.time() - started, 1)})
        print(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}, validation Recall@1 {val_recall:.4f}, "
              f"{time.time() - started:.0f}s")
        ckpt = {"arch": arch, "preprocess": pre, "classes": class_names, "version": "1",
                "training": {"data": data_desc, "train_images": len(train_idx), "val_images": len(val_idx),
                             "recipe": recipe, "history": state["history"],
                             "train_seconds": round(state["seconds"]), "threads": torch.get_num_threads()}}
        if val_recall > state["best_recall"]:
            state["best_recall"] = val_recall
            torch.save({**ckpt, "model": model.state_dict()}, args.out / "best.pt")
        torch.save({**ckpt, "model": model.state_dict(), "classifier": classifier.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": state},
                   args.out / "last.tmp")
        (args.out / "last.tmp").replace(last)
    (args.out / "history.json").write_text(json.dumps(state["history"], indent=2))
    print(f"best validation Recall@1 {state['best_recall']:.4f}; {state['seconds'] / 60:.1f} min of training")


if __name__ == "__main__":
    main()
