"""Train the general encoder: Siamese learning on augmented views plus supervised
contrastive learning on the labelled classes, distilled from an ImageNet-trained
teacher when its targets are given.

    python models/corpus.py --out corpus                          # once (make corpus)
    python models/teacher_targets.py --corpus corpus              # once: corpus/teacher-160.npy
    python models/train_general.py --corpus corpus --teacher corpus/teacher-160.npy \
        --init models/default --out runs/general
    python models/export.py --checkpoint runs/general/last.pt --out models/default

Every step draws a batch of images and makes two random views of each:
- Siamese / instance term (NT-Xent): the two views of one image are a pair
  labelled 1, views of every other image in the batch 0. It runs on a small
  projection MLP on top of the served embedding (SimCLR), so the embedding the
  service serves keeps what the projection throws away (shared/NOTES.md: the
  representation before the projection retrieves better).
- Supervised term (SupCon, Khosla et al. 2020) on the served embedding itself,
  over the labelled half of the batch (P classes x K images from openclipart's
  training classes and Fashion-MNIST's seen classes 0-6): every other view of
  the same class is a positive.
Augmentations are the ones real uploads show, done on the whole batch in torch
(one grid_sample for the geometry): random resized crop (20-100% of the area,
aspect 3/4-4/3), zoom-out padding to other aspect ratios, flip, rotation up to
15 degrees, transparent and padded areas filled with white, black or a random
colour, colour jitter, greyscale, Gaussian blur, and JPEG re-encoding (PIL).
- Distillation term (with `--teacher`): the student's embedding of each
  strongly augmented view, through a linear map to the teacher's 1280
  dimensions, must pick out the teacher's embedding of its own *clean* image
  among the batch's others (InfoNCE, temperature `--distill-temperature`),
  plus a cosine pull towards it. The contrastive form keeps unrelated images
  apart where plain regression washed them together (shared/NOTES.md), and the
  augmentations teach what the teacher never saw: copies that are cropped,
  framed, overlaid with text or emoji, shrunk into a larger canvas, upscaled
  from a thumbnail, re-encoded.
The schedule is a fixed number of steps (one-cycle AdamW), so a run is
reproducible; it checkpoints every `--checkpoint-every` steps and resumes.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_mnist  # noqa: E402
from export import build_model  # noqa: E402

# ImageNet statistics: the usual choice for RGB photographs and what pretrained
# backbones (models/export.py --backbone) expect.
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
FASHION_SEEN = tuple(range(7))
# Share of each labelled class kept out of training when the corpus names no validation rows.
VAL_FRACTION = 0.05


def normalised(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def load_corpus(folder: Path, fashion: bool, teacher: Path | None = None) -> dict:
    data = np.load(folder / "train.npz")
    images, labels = data["images"], data["labels"]
    classes = [str(c) for c in data["classes"]]
    out = {"images": torch.from_numpy(images), "labels": labels, "classes": classes,
           "sources": [str(s) for s in data["sources"]]}
    if "val" in data:
        out["val"] = data["val"]
    if teacher is not None:
        targets = np.load(teacher).astype(np.float32)
        if len(targets) != len(labels):
            raise SystemExit(f"{teacher} has {len(targets)} rows for {len(labels)} images: run teacher_targets.py again")
        out["teacher"] = torch.from_numpy(targets)
    if fashion:
        fm, fl = fashion_mnist.load("train")
        keep = np.isin(fl, FASHION_SEEN)
        out["fashion"] = torch.from_numpy(fm[keep])
        out["fashion_labels"] = fl[keep] + len(classes)
        out["classes"] = classes + [f"fashion-mnist/{fashion_mnist.CLASSES[c]}" for c in FASHION_SEEN]
    return out


class Sampler:
    """Batches of item references: a PK half (labelled) and a uniform half (any image)."""

    def __init__(self, corpus: dict, p: int, k: int, instances: int, shares: dict[str, float], seed: int):
        self.rng = np.random.default_rng(seed)
        self.p, self.k, self.instances = p, k, instances
        # Uniform draws pick a source first, so 11k photo crops do not drown 4k clip-art images.
        self.by_source = {s: np.flatnonzero(np.array(corpus["sources"]) == s) for s in shares if s != "fashion"}
        self.shares = {s: w for s, w in shares.items() if s == "fashion" or len(self.by_source.get(s, [])) > 0}
        self.by_class: dict[int, list[tuple[str, int]]] = {}
        for i, label in enumerate(corpus["labels"]):
            if label >= 0:
                self.by_class.setdefault(int(label), []).append(("corpus", i))
        for i, label in enumerate(corpus.get("fashion_labels", [])):
            self.by_class.setdefault(int(label), []).append(("fashion", i))
        self.by_class = {c: refs for c, refs in self.by_class.items() if len(refs) >= 2}
        self.n_fashion = len(corpus.get("fashion_labels", []))

    def batch(self) -> tuple[list[tuple[str, int]], list[int]]:
        classes = self.rng.choice(sorted(self.by_class), size=self.p, replace=False)
        refs, labels = [], []
        for c in classes:
            pool = self.by_class[int(c)]
            for j in self.rng.choice(len(pool), size=self.k, replace=len(pool) < self.k):
                refs.append(pool[j])
                labels.append(int(c))
        names = [s for s in self.shares if s != "fashion" or self.n_fashion]
        weights = np.array([self.shares[s] for s in names])
        for source in self.rng.choice(names, size=self.instances, p=weights / weights.sum()):
            if source == "fashion":
                refs.append(("fashion", int(self.rng.integers(self.n_fashion))))
            else:
                refs.append(("corpus", int(self.rng.choice(self.by_source[source]))))
            labels.append(-1)
        return refs, labels


def gather(corpus: dict, refs: list[tuple[str, int]]) -> torch.Tensor:
    """RGBA float images in [0, 1] at the cache side."""
    side = corpus["images"].shape[-1]
    out = torch.empty(len(refs), 4, side, side)
    ci = [(n, i) for n, (src, i) in enumerate(refs) if src == "corpus"]
    fi = [(n, i) for n, (src, i) in enumerate(refs) if src == "fashion"]
    if ci:
        out[[n for n, _ in ci]] = corpus["images"][[i for _, i in ci]].float() / 255
    if fi:
        grey = corpus["fashion"][[i for _, i in fi]].float()[:, None] / 255
        grey = F.interpolate(grey, size=(side, side), mode="bilinear", align_corners=False)
        out[[n for n, _ in fi]] = torch.cat([grey.expand(-1, 3, -1, -1), torch.ones_like(grey)], 1)
    return out


def teacher_targets(corpus: dict, refs: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's embeddings of the batch's clean images, and which refs have one
    (Fashion-MNIST images have none)."""
    has = torch.tensor([src == "corpus" for src, _ in refs])
    out = torch.zeros(len(refs), corpus["teacher"].shape[1])
    out[has] = corpus["teacher"][[i for src, i in refs if src == "corpus"]]
    return out, has


def random_geometry(n: int, gen: torch.Generator) -> torch.Tensor:
    """Affine matrices (n, 2, 3) for grid_sample: random resized crop or zoom-out
    padding, aspect change, flip, small rotation."""
    u = lambda lo, hi: torch.empty(n).uniform_(lo, hi, generator=gen)  # noqa: E731
    area = u(0.35, 1.0)
    # The image fills less than the view: a frame or border (1.05-1.5x), or a
    # screenshot-like larger canvas (up to 3x).
    zoom_out = torch.rand(n, generator=gen) < 0.3
    area = torch.where(zoom_out, torch.where(torch.rand(n, generator=gen) < 0.5, u(1.05, 1.5), u(1.5, 3.0)), area)
    log_aspect = u(math.log(3 / 4), math.log(4 / 3))
    log_aspect = torch.where(zoom_out, u(math.log(1 / 2), math.log(2)), log_aspect)
    sx = (area * log_aspect.exp()).sqrt()
    sy = (area / log_aspect.exp()).sqrt()
    # The crop centre stays inside so the view is mostly image (or the image mostly in view).
    tx = (1 - sx).abs() * u(-1, 1)
    ty = (1 - sy).abs() * u(-1, 1)
    angle = torch.where(torch.rand(n, generator=gen) < 0.3, u(-15, 15), torch.zeros(n)) * math.pi / 180
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = sx * cos * flip
    theta[:, 0, 1] = -sy * sin
    theta[:, 1, 0] = sx * sin * flip
    theta[:, 1, 1] = sy * cos
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    return theta


def backgrounds(n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 3, 1, 1): white (55%), black (15%), or a random colour."""
    pick = torch.rand(n, generator=gen)
    colour = torch.rand(n, 3, generator=gen)
    colour[pick < 0.55] = 1.0
    colour[(pick >= 0.55) & (pick < 0.70)] = 0.0
    return colour[:, :, None, None]


def colour_jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    u = lambda lo, hi: torch.empty(n, 1, 1, 1).uniform_(lo, hi, generator=gen)  # noqa: E731
    apply = (torch.rand(n, 1, 1, 1, generator=gen) < 0.8).float()
    grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    jittered = x * u(0.6, 1.4)  # brightness
    mean = grey.mean(dim=(2, 3), keepdim=True)
    jittered = (jittered - mean) * u(0.6, 1.4) + mean  # contrast
    g2 = (jittered * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    jittered = (jittered - g2) * u(0.4, 1.6) + g2  # saturation
    hue = torch.rand(n, generator=gen) < 0.1  # a crude hue change: permute the channels
    if hue.any():
        jittered[hue] = jittered[hue][:, torch.randperm(3, generator=gen)]
    x = apply * jittered + (1 - apply) * x
    to_grey = torch.rand(n, generator=gen) < 0.2
    if to_grey.any():
        g = (x[to_grey] * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x[to_grey] = g.expand(-1, 3, -1, -1)
    return x.clamp(0, 1)


def blur(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    pick = torch.rand(x.shape[0], generator=gen) < 0.2
    if not pick.any():
        return x
    sigma = float(torch.empty(1).uniform_(0.3, 1.5, generator=gen))
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    sub = x[pick]
    sub = F.conv2d(F.pad(sub, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5).expand(3, 1, 1, 5), groups=3)
    sub = F.conv2d(F.pad(sub, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1).expand(3, 1, 5, 1), groups=3)
    x[pick] = sub
    return x


def jpeg(x: torch.Tensor, rng: random.Random, share: float = 0.3) -> torch.Tensor:
    for i in range(x.shape[0]):
        if rng.random() >= share:
            continue
        arr = (x[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=rng.randint(30, 90))
        x[i] = torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1).float() / 255
    return x


def overlay(x: torch.Tensor, rgba: torch.Tensor, gen: torch.Generator, share: float = 0.2) -> torch.Tensor:
    """Pastes another image of the batch (an emoji, a sprite, a photo inset) at
    12-30% of the side somewhere over `share` of the views."""
    n, size = x.shape[0], x.shape[-1]
    pick = torch.rand(n, generator=gen) < share
    if not pick.any() or n < 2:
        return x
    scale = torch.empty(n).uniform_(0.12, 0.3, generator=gen)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    centre = torch.empty(n, 2).uniform_(-0.7, 0.7, generator=gen)
    theta[:, :, 2] = -centre / scale[:, None]
    other = rgba.roll(1, 0)
    grid = F.affine_grid(theta, [n, 4, size, size], align_corners=False)
    pasted = F.grid_sample(other, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    alpha = pasted[:, 3:4] * pick.float().view(n, 1, 1, 1)
    return pasted[:, :3] * alpha + x * (1 - alpha)


def thumbnail(x: torch.Tensor, gen: torch.Generator, share: float = 0.15) -> torch.Tensor:
    """A small image upscaled: `share` of the views go down to 16-48 px and back."""
    pick = torch.rand(x.shape[0], generator=gen) < share
    if not pick.any():
        return x
    side = int(torch.randint(16, 49, (1,), generator=gen))
    small = F.interpolate(x[pick], size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    x[pick] = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return x


WORDS = ("SALE", "sample", "copy", "2024", "lookalike", "Hello!", "photo", "@user", "NEW", "draft", "#1", "ok")


def caption(x: torch.Tensor, rng: random.Random, share: float = 0.1) -> torch.Tensor:
    """Text drawn over `share` of the views (a watermark, a caption, a meme)."""
    size = x.shape[-1]
    for i in range(x.shape[0]):
        if rng.random() >= share:
            continue
        im = Image.fromarray((x[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        font = ImageFont.load_default(size=rng.randint(size // 10, size // 4))
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        ImageDraw.Draw(im).text((rng.randint(0, size // 2), rng.randint(0, size * 3 // 4)), rng.choice(WORDS),
                                fill=colour, font=font)
        x[i] = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255
    return x


def views(rgba: torch.Tensor, size: int, gen: torch.Generator, rng: random.Random) -> torch.Tensor:
    """One random view of each image, normalised for the encoder."""
    n = rgba.shape[0]
    grid = F.affine_grid(random_geometry(n, gen), [n, 4, size, size], align_corners=False)
    warped = F.grid_sample(rgba, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    alpha = warped[:, 3:4]
    x = warped[:, :3] * alpha + backgrounds(n, gen) * (1 - alpha)  # straight alpha, as cached
    x = thumbnail(overlay(x, rgba, gen), gen)
    x = jpeg(caption(blur(colour_jitter(x, gen), gen), rng), rng)
    return normalised(x)


def nt_xent(z: torch.Tensor, temperature: float, labels: torch.Tensor | None = None) -> torch.Tensor:
    """z: (2n, d) unit vectors, rows i and i + n are two views of one image.
    With `labels` (2n, -1 for none), views of other images of the same class
    are left out of the negatives, so the term does not fight the supervised one."""
    n = z.shape[0] // 2
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    if labels is not None:
        classmates = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
        pair = torch.arange(2 * n)
        classmates[pair, (pair + n) % (2 * n)] = False
        sim = sim.masked_fill(classmates, float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def supcon(e: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss over unit vectors `e` with class `labels`."""
    sim = e @ e.T / temperature
    eye = torch.eye(len(labels), dtype=torch.bool)
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - sim.logsumexp(dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    per_anchor = -(log_prob.masked_fill(~positive, 0).sum(1)) / positive.sum(1).clamp_min(1)
    return per_anchor[positive.any(1)].mean()


def distill(s: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of student views `s` (2n, d) against the teacher's clean targets `t`
    (n, d), both unit: view i and i + n must pick target i, among the targets of
    *other* images (`ids`: the image of each target, as a batch can draw one
    twice); plus 1 - cosine."""
    n = t.shape[0]
    target = torch.arange(n).repeat(2)
    logits = s @ t.T / temperature
    same_image = (ids[target][:, None] == ids[None, :]) & (target[:, None] != torch.arange(n)[None, :])
    logits = logits.masked_fill(same_image, float("-inf"))
    return F.cross_entropy(logits, target) + (1 - (s * t[target]).sum(1)).mean()


class Projector(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Linear(256, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


@torch.no_grad()
def validate(model, corpus: dict, val_idx: np.ndarray, train_idx: np.ndarray, size: int, seed: int,
             copies: tuple[torch.Tensor, np.ndarray] | None = None) -> dict:
    """Class Recall@1 of validation clip art among training clip art, and view
    retrieval: an augmented view of each validation image finds its clean self.
    With `copies` (altered copies of the validation images, and distractor
    indices): copy Recall@1, each copy finding its original among the
    validation images and the distractors."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)

    def clean(idx):
        out = []
        for i in range(0, len(idx), 256):
            rgba = corpus["images"][idx[i:i + 256]].float() / 255
            x = rgba[:, :3] * rgba[:, 3:] + (1 - rgba[:, 3:])
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out.append(model(normalised(x)))
        return torch.cat(out)

    val_e, train_e = clean(val_idx), clean(train_idx)
    labels = corpus["labels"]
    nearest = (val_e @ train_e.T).argmax(1).numpy()
    class_r1 = float((labels[train_idx][nearest] == labels[val_idx]).mean())
    aug = torch.cat([model(views(corpus["images"][val_idx[i:i + 256]].float() / 255, size, gen, rng))
                     for i in range(0, len(val_idx), 256)])
    view_r1 = float(((aug @ val_e.T).argmax(1) == torch.arange(len(val_idx))).float().mean())
    out = {"class_recall_at_1": class_r1, "view_recall_at_1": view_r1}
    if copies is not None:
        queries, distractors = copies
        gallery = torch.cat([val_e, clean(distractors)])
        q = torch.cat([model(queries[i:i + 256]) for i in range(0, len(queries), 256)])
        truth = torch.arange(len(queries)) % len(val_idx)  # copy_queries' order: the images, once per repeat
        out["copy_recall_at_1"] = float(((q @ gallery.T).argmax(1) == truth).float().mean())
    model.train()
    return out


def altered_copy(rgba: np.ndarray, size: int, rng: random.Random) -> torch.Tensor:
    """An altered copy of one cached image (H x W x 4, uint8) by the
    evaluation's own edits (models/corpus.py transformed_copy: crop 40-90%,
    rescale, colour, flip, rotation, border; then JPEG 30-90), stretched to
    `size` as the service does; RGB in [0, 1]. The evaluation applies the same
    edits to larger originals."""
    from corpus import on_white, transformed_copy  # noqa: E402 (PIL-only helpers)
    copy = transformed_copy(on_white(Image.fromarray(rgba, "RGBA")), rng)
    buf = io.BytesIO()
    copy.save(buf, format="JPEG", quality=rng.randint(30, 90))
    copy = Image.open(buf).convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.array(copy)).permute(2, 0, 1).float() / 255


def copy_queries(corpus: dict, idx: np.ndarray, size: int, seed: int, repeats: int = 1) -> torch.Tensor:
    """`repeats` altered copies of each image (all first copies, then all second ...)."""
    rng = random.Random(seed)
    out = [altered_copy(corpus["images"][i].permute(1, 2, 0).numpy(), size, rng) for _ in range(repeats) for i in idx]
    return normalised(torch.stack(out))


def hard_copies(x: torch.Tensor, rgba: torch.Tensor, share: float, rng: random.Random) -> torch.Tensor:
    """Replaces `share` of the views `x` (normalised) with altered copies made
    by the evaluation's edits (`altered_copy`): every one cropped, bordered and
    JPEG-compressed at once, where the other views apply each edit only sometimes."""
    if share <= 0:  # the random stream of runs without them stays as it was
        return x
    for i in range(x.shape[0]):
        if rng.random() < share:
            cached = (rgba[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            x[i] = normalised(altered_copy(cached, x.shape[-1], rng)[None])[0]
    return x


def selected(val: dict, state: dict) -> bool:
    """The rule --select keeps best.pt by, written down before any run used it:
    the best copy Recall@1, above the starting weights', of the checkpoints
    whose class Recall@1 is at most 0.02 below the starting weights'. No
    best.pt: nothing beat the starting weights."""
    if val["class_recall_at_1"] < state["baseline"]["class_recall_at_1"] - 0.02:
        return False
    return val["copy_recall_at_1"] > state.get("best", state["baseline"])["copy_recall_at_1"]


def validation_split(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded share of each labelled class, kept out of training (a mask over
    the corpus), for a corpus that does not name its validation rows."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels[labels >= 0]):
        idx = rng.permutation(np.flatnonzero(labels == c))
        mask[idx[: int(len(idx) * fraction)]] = True
    return mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("corpus"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--embedding-dim", type=int, default=128,
                    help="0: the pooled trunk features themselves (an identity head of their size)")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--p", type=int, default=16, help="labelled classes per batch")
    ap.add_argument("--k", type=int, default=3, help="images per labelled class")
    ap.add_argument("--instances", type=int, default=48, help="unlabelled draws per batch (any image)")
    ap.add_argument("--clipart-share", type=float, default=0.3, help="share of the uniform draws from clip art")
    ap.add_argument("--stamps-share", type=float, default=0.1, help="tuxpaint's stamps")
    ap.add_argument("--sprites-share", type=float, default=0.1, help="game sprites")
    ap.add_argument("--emoji-share", type=float, default=0.1)
    ap.add_argument("--photo-share", type=float, default=0.3)
    ap.add_argument("--fashion-share", type=float, default=0.1)
    ap.add_argument("--teacher", type=Path, help="teacher targets (models/teacher_targets.py): distil from them")
    ap.add_argument("--distill-weight", type=float, default=1.0)
    ap.add_argument("--distill-temperature", type=float, default=0.1)
    ap.add_argument("--init", type=Path, help="a model folder whose encoder.pt starts the run (fine-tune, not from scratch)")
    ap.add_argument("--init-checkpoint", type=Path,
                    help="a train_general checkpoint (last.pt) whose model and loss heads start a new schedule")
    ap.add_argument("--no-fashion", action="store_true")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--temperature", type=float, default=0.2, help="NT-Xent temperature")
    ap.add_argument("--supcon-temperature", type=float, default=0.1)
    ap.add_argument("--supcon-weight", type=float, default=0.5)
    ap.add_argument("--embed-instance-weight", type=float, default=0.0,
                    help="NT-Xent on the served embedding itself (no projection; classmates not negatives), "
                         "as copy-detection training does (SSCD, Pizzi et al. 2022)")
    ap.add_argument("--embed-instance-temperature", type=float, default=0.1)
    ap.add_argument("--copy-distractors", type=int, default=2000,
                    help="training images beside the validation images in the copy validation's gallery")
    ap.add_argument("--copy-repeats", type=int, default=1,
                    help="altered copies of each validation image in the copy validation (more: less noise)")
    ap.add_argument("--hard-copy-share", type=float, default=0.0,
                    help="share of the second views replaced by copies made as the evaluation's (every edit at once)")
    ap.add_argument("--select", action="store_true",
                    help="keep best.pt: the best copy Recall@1 among checkpoints whose class Recall@1 is "
                         "at most 0.02 below the starting weights' (needs --init or --init-checkpoint)")
    ap.add_argument("--val-fraction", type=float, default=VAL_FRACTION)
    ap.add_argument("--checkpoint-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = ap.parse_args()
    if args.copy_repeats < 1:
        ap.error("--copy-repeats must be at least 1")

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(args.corpus, fashion=not args.no_fashion, teacher=args.teacher)
    labels = corpus["labels"]
    # The corpus names its validation rows (images no model here trained on); else a seeded share.
    val_mask = corpus["val"] if "val" in corpus else validation_split(labels, args.val_fraction, args.seed)
    val_idx = np.flatnonzero(val_mask)
    train_idx = np.flatnonzero(~val_mask & (labels >= 0))
    keep = ~val_mask
    train_corpus = {**corpus, "images": corpus["images"][torch.from_numpy(keep)], "labels": labels[keep],
                    "sources": [s for s, k in zip(corpus["sources"], keep) if k]}
    if "teacher" in corpus:
        train_corpus["teacher"] = corpus["teacher"][torch.from_numpy(keep)]
    shares = {"openclipart": args.clipart_share, "stamps": args.stamps_share, "sprites": args.sprites_share,
              "emoji": args.emoji_share, "photo": args.photo_share, "fashion": args.fashion_share}
    sampler = Sampler(train_corpus, args.p, args.k, args.instances, shares, args.seed)
    print(f"{len(train_corpus['labels'])} corpus images ({int((train_corpus['labels'] >= 0).sum())} labelled, "
          f"{len(sampler.by_class)} classes with Fashion-MNIST), {len(val_idx)} validation", flush=True)

    arch = {"name": "shufflenet_v1", "groups": args.groups, "width": args.width, "embedding_dim": args.embedding_dim}
    init_state = None
    if args.init:  # the served weights of a model folder, its head's size included
        init_state = torch.jit.load(str(args.init / "encoder.pt"), map_location="cpu").state_dict()
        arch["embedding_dim"] = int(init_state["head.weight"].shape[0])
    if arch["embedding_dim"] == 0:  # serve (and train) the pooled trunk: an identity head of its size
        arch["embedding_dim"] = build_model({**arch, "embedding_dim": 1}).feature_dim
        arch["served"] = "pooled trunk features (identity-initialised head)"
        model = build_model(arch)
        with torch.no_grad():
            model.head.weight.copy_(torch.eye(arch["embedding_dim"]))
            model.head.bias.zero_()
    else:
        model = build_model(arch)
    if init_state is not None:
        model.load_state_dict(init_state)
    projector = Projector(arch["embedding_dim"])
    params = list(model.parameters()) + list(projector.parameters())
    distill_head = None
    if "teacher" in corpus:  # the student's embedding mapped to the teacher's space, for the loss only
        distill_head = nn.Linear(arch["embedding_dim"], corpus["teacher"].shape[1])
        params += list(distill_head.parameters())
    if args.init_checkpoint:  # a second stage: the weights and loss heads of a run, a fresh optimizer and schedule
        ckpt = torch.load(args.init_checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        projector.load_state_dict(ckpt["projector"])
        if distill_head is not None:
            distill_head.load_state_dict(ckpt["distill_head"])
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    state = {"step": 0, "seconds": 0.0, "history": []}
    last = args.out / "last.pt"
    if last.exists():
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        projector.load_state_dict(ckpt["projector"])
        if distill_head is not None:
            distill_head.load_state_dict(ckpt["distill_head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        sampler.rng = np.random.default_rng(args.seed + state["step"])
        print(f"resumed from {last} at step {state['step']}", flush=True)

    recipe = {k: getattr(args, k) for k in ("size", "steps", "p", "k", "instances", "clipart_share", "stamps_share",
                                            "sprites_share", "emoji_share", "photo_share", "fashion_share", "lr",
                                            "weight_decay", "temperature", "supcon_temperature", "supcon_weight",
                                            "distill_weight", "distill_temperature", "embed_instance_weight",
                                            "embed_instance_temperature", "hard_copy_share", "copy_repeats",
                                            "val_fraction", "seed")}
    recipe.update(optimizer="AdamW", schedule="one-cycle", init=str(args.init or args.init_checkpoint or "") or None,
                  teacher=str(args.teacher) if args.teacher else None,
                  losses="NT-Xent on two augmented views (projection MLP) + supervised contrastive on the embedding"
                         + (" + NT-Xent on the embedding itself (classmates not negatives)"
                            if args.embed_instance_weight else "")
                         + (" + InfoNCE and cosine of each view against the teacher's embedding of the clean image"
                            if distill_head is not None else ""),
                  augmentation="random resized crop 35-100%, frames and larger canvases, flip, rotation, "
                               "white/black/colour background, another image pasted over, thumbnail upscaled, "
                               "colour jitter, greyscale, blur, text, JPEG 30-90")
    preprocess = {"size": args.size, "channels": 3, "mean": MEAN, "std": STD, "resize": "stretch", "filter": "bilinear"}
    # The copy validation: fixed altered copies of the validation images, and fixed distractors.
    distractors = np.random.default_rng(args.seed).permutation(np.flatnonzero(~val_mask))[:args.copy_distractors]
    copies = (copy_queries(corpus, val_idx, args.size, args.seed, args.copy_repeats), distractors)
    if args.select and "baseline" not in state:
        if not (args.init or args.init_checkpoint):
            raise SystemExit("--select compares with the starting weights: give --init or --init-checkpoint")
        state["baseline"] = validate(model, corpus, val_idx, train_idx, args.size, args.seed, copies)
        print(f"validation of the starting weights: {json.dumps(state['baseline'])}", flush=True)
    gen = torch.Generator().manual_seed(args.seed + state["step"])
    rng = random.Random(args.seed + state["step"])
    model.train()
    window = time.time()
    losses: list[tuple[float, float]] = []
    while state["step"] < args.steps:
        started = time.time()
        refs, batch_labels = sampler.batch()
        rgba = gather(train_corpus, refs)
        first = views(rgba, args.size, gen, rng)  # drawn before the second, as the random stream always was
        x = torch.cat([first, hard_copies(views(rgba, args.size, gen, rng), rgba, args.hard_copy_share, rng)])
        raw = model.head(model.features(x))
        e = F.normalize(raw, dim=1)
        inst = nt_xent(projector(raw), args.temperature)
        y = torch.tensor(batch_labels + batch_labels)
        labelled = y >= 0
        sup = supcon(e[labelled], y[labelled], args.supcon_temperature)
        loss = inst + args.supcon_weight * sup
        if args.embed_instance_weight:
            loss = loss + args.embed_instance_weight * nt_xent(e, args.embed_instance_temperature, y)
        dist = torch.zeros(())
        if distill_head is not None:
            targets, has = teacher_targets(train_corpus, refs)
            s_views = F.normalize(distill_head(e), dim=1).view(2, len(refs), -1)[:, has].reshape(-1, targets.shape[1])
            ids = torch.tensor([i for src, i in refs if src == "corpus"])
            dist = distill(s_views, targets[has], ids, args.distill_temperature)
            loss = loss + args.distill_weight * dist
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        state["step"] += 1
        state["seconds"] += time.time() - started
        losses.append((inst.item(), sup.item(), dist.item()))
        if state["step"] % 25 == 0:
            li, ls, ld = np.mean(losses[-25:], axis=0)
            rate = 25 * len(x) / (time.time() - window)
            window = time.time()
            print(f"step {state['step']}/{args.steps}: nt-xent {li:.3f} supcon {ls:.3f} distill {ld:.3f} "
                  f"lr {scheduler.get_last_lr()[0]:.2e} {rate:.0f} views/s", flush=True)
        if state["step"] % args.checkpoint_every == 0 or state["step"] == args.steps:
            val = validate(model, corpus, val_idx, train_idx, args.size, args.seed, copies)
            li, ls, ld = np.mean(losses[-args.checkpoint_every:], axis=0)
            state["history"].append({"step": state["step"], "nt_xent": float(li), "supcon": float(ls),
                                     "distill": float(ld), **val,
                                     "minutes": round(state["seconds"] / 60, 1)})
            print(f"validation at step {state['step']}: {json.dumps(val)}", flush=True)
            ckpt = {"arch": arch, "preprocess": preprocess, "version": "1",
                    "training": {"data": "openclipart-png training classes, tuxpaint stamps, pingus and frozen-bubble "
                                         "sprites, Noto colour emoji, desktop-background photo crops (split by "
                                         "picture), Fashion-MNIST seen classes 0-6 (models/corpus.py)"
                                         + ("; targets from the ImageNet-trained EfficientNet-Lite0 teacher"
                                            if distill_head is not None else ""),
                                 "train_images": int(len(train_corpus["labels"]) + len(corpus.get("fashion_labels", []))),
                                 "val_images": int(len(val_idx)), "recipe": recipe, "history": state["history"],
                                 "train_seconds": round(state["seconds"]), "threads": torch.get_num_threads()}}
            extra = {"distill_head": distill_head.state_dict()} if distill_head is not None else {}
            if args.select and selected(val, state):
                state["best"] = {"step": state["step"], **val}
                torch.save({**ckpt, "model": model.state_dict()}, args.out / "best.tmp")
                (args.out / "best.tmp").replace(args.out / "best.pt")
                print(f"best.pt is now step {state['step']}", flush=True)
            torch.save({**ckpt, **extra, "model": model.state_dict(), "projector": projector.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": state},
                       args.out / "last.tmp")
            (args.out / "last.tmp").replace(last)
    (args.out / "history.json").write_text(json.dumps(state["history"], indent=2))
    print(f"done: {state['step']} steps in {state['seconds'] / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
