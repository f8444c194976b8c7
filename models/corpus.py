"""Build the general training corpus and the evaluation folders from Debian packages.

    python models/corpus.py --out corpus        # `make corpus` installs the packages first

Sources (all offline, from Debian):
- openclipart-png: clip art, one class per category/subcategory folder;
- fonts-noto-color-emoji: colour emoji rendered at 109 px, one instance each;
- gnome-backgrounds, mate-backgrounds, plasma-workspace-wallpapers: photographs
  and artwork, many random crops each;
- tuxpaint-stamps-default: photographs and drawings of objects and animals, one
  class per category/subcategory folder;
- pingus-data, frozen-bubble-data: game sprites and backgrounds, one instance each;
- Fashion-MNIST (dataset-fashion-mnist): read by the trainer itself, seen classes 0-6.

Held out, never written to the training cache:
- every desktop icon theme (/usr/share/icons: never read here) and openclipart's
  computer/icons folder (the independent evaluation);
- a seeded 20% of the other openclipart classes (named in corpus/manifest.json and
  the model card): unseen classes for our own evaluation;
- a seeded 30% of the wallpaper *pictures* (copy detection on photographs): a
  picture shipped at several resolutions or in light and dark variants is one
  picture, held out or trained on as a whole;
- any training image (clip art, stamps, sprites) that is a near-identical twin
  of a held-out image (openclipart repeats files across folders, and some
  tuxpaint stamps are openclipart drawings): dropped by a 16 x 16 thumbnail
  comparison, and stamps whose SVG names openclipart are skipped outright;
- the wallpaper packages kept for the independent evaluation (HELDOUT_PACKAGES),
  should they be installed: their files are never read.

Writes:
- corpus/train.npz: RGBA uint8 images (N, 4, CACHE, CACHE), stretched to a square
  as the service stretches them, class ids (-1: no class, instance only), sources,
  and `val`: the validation rows the trainer keeps out (a seeded VAL_FRACTION of
  each clip-art and stamp class), which bench/fewshot.py --regime many uses;
- corpus/eval/openclipart-heldout/<class>/: links to the held-out classes' files;
- corpus/eval/copy/{gallery,queries}/<instance>/: originals of held-out clip art and
  photo crops among distractors, and one transformed copy of each query original;
- corpus/eval/fewshot/{gallery,queries}/<class>/: 5 labelled images of each held-out
  class (with 6 or more) and the rest as queries, for bench/fewshot.py;
- corpus/manifest.json: what went where.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import time
import warnings
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

OPENCLIPART = Path("/usr/share/openclipart/png")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
WALLPAPER_DIRS = (Path("/usr/share/backgrounds"), Path("/usr/share/wallpapers"))
# The independent evaluation's share of openclipart: never read for training.
EXCLUDED_CLASSES = ("computer/icons",)
TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
SPRITE_DIRS = (Path("/usr/share/games/pingus"), Path("/usr/share/games/frozen-bubble"))
# Independent evaluation only: files of these packages are never read, even when installed.
HELDOUT_PACKAGES = ("ukui-wallpapers", "lomiri-wallpapers", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04",
                    "sway-backgrounds")
CACHE = 128  # side of the cached training images (the trainer crops and resizes to its input)
MAX_PIXELS = 4096 * 4096  # larger files are skipped (the service's default limits refuse the largest too)
HELDOUT_CLASS_FRACTION = 0.2
HELDOUT_PHOTO_FRACTION = 0.3
VAL_FRACTION = 0.07  # of each labelled class: the trainer's validation, never trained on
TWIN_SIDE = 16
TWIN_RMS = 10.0  # RMS difference (0-255) of 16 x 16 grey thumbnails under which two images may be one drawing
TWIN_CORRELATION = 0.97  # ... and the correlation of their shapes above which they are
TWIN_MIN_STD = 3.0  # thumbnails flatter than this (blank, a plain gradient) are not compared
# The photo split is by picture (picture_key), not by file: plasma-workspace-wallpapers
# ships one picture at several resolutions, mate-backgrounds some at several sizes,
# gnome-backgrounds light and dark variants. Copy detection is also reported on
# clip-art queries alone (copy/queries-clipart).
CROPS_PER_TRAIN_PHOTO = 100
CROPS_PER_HELDOUT_PHOTO = 8
COPY_QUERIES = 600
COPY_DISTRACTORS = 2000
FEWSHOT_SHOTS = 5
# Classes are very unequal (shapes/stars alone has 1,378 files): evaluation takes
# at most this many files of a class (seeded), so one class cannot dominate a figure.
EVAL_PER_CLASS = 60
COPY_QUERIES_PER_CLASS = 40
MIN_SPRITE_SIDE = 24  # smaller sprites (tiles, single glyphs) say little

warnings.simplefilter("ignore", Image.DecompressionBombWarning)
Image.MAX_IMAGE_PIXELS = None


def clipart_classes() -> dict[str, list[Path]]:
    """category/subcategory -> files (files directly in a category: category/_)."""
    classes: dict[str, list[Path]] = {}
    for path in sorted(OPENCLIPART.rglob("*.png")):
        parts = path.relative_to(OPENCLIPART).parts
        name = "/".join(parts[:2]) if len(parts) > 2 else f"{parts[0]}/_"
        if name not in EXCLUDED_CLASSES:
            classes.setdefault(name, []).append(path)
    return classes


def on_white(im: Image.Image) -> Image.Image:
    """RGB with any transparency composited over white, as the service does."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def open_small(path: Path, side: int) -> Image.Image | None:
    """The file as RGBA, scaled (aspect kept) so its longer side is at most `side`; None if unusable."""
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                return None
            im.draft("RGB", (side, side))
            im = im.convert("RGBA")
            im.thumbnail((side, side), Image.BILINEAR)
            return im
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def cache_square(im: Image.Image) -> np.ndarray:
    """Stretched to CACHE x CACHE like the service's `stretch` policy, as (4, CACHE, CACHE)."""
    return np.asarray(im.convert("RGBA").resize((CACHE, CACHE), Image.BILINEAR)).transpose(2, 0, 1)


def load_clipart(path: Path) -> np.ndarray | None:
    im = open_small(path, 2 * CACHE)
    return None if im is None else cache_square(im)


def render_emoji() -> list[np.ndarray]:
    font = ImageFont.truetype(str(EMOJI_FONT), 109)
    ranges = [(0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF),
              (0x1FA70, 0x1FAFF), (0x2600, 0x27BF)]
    out, seen = [], set()
    for lo, hi in ranges:
        for cp in range(lo, hi + 1):
            im = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
            ImageDraw.Draw(im).text((0, 0), chr(cp), font=font, embedded_color=True)
            box = im.getbbox()
            if box is None:
                continue
            arr = cache_square(im.crop(box))
            key = arr[:, ::8, ::8].tobytes()
            if key in seen:  # the font's "missing glyph" box renders the same every time
                continue
            seen.add(key)
            out.append(arr)
    return out


def heldout_package_files() -> set[Path]:
    """Files installed by the held-out packages (none when they are not installed)."""
    files: set[Path] = set()
    for package in HELDOUT_PACKAGES:
        listing = Path(f"/var/lib/dpkg/info/{package}.list")
        if listing.exists():
            files |= {Path(line) for line in listing.read_text().split("\n") if line}
    return files


def wallpaper_files() -> list[Path]:
    files = []
    for root in WALLPAPER_DIRS:
        files += [p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")]
    heldout = heldout_package_files()
    return sorted(p for p in set(files) if p not in heldout and p.resolve() not in heldout)


def picture_key(path: Path) -> str:
    """One key per picture: plasma's `Name/contents/images*/WxH.ext` share `Name`,
    `Elephants_3840x2160.jpg` is `Elephants.jpg`, gnome's `-l`/`-d` are one picture."""
    parts = path.parts
    if "contents" in parts:
        return str(Path(*parts[: parts.index("contents")]))
    stem = re.sub(r"_\d+x\d+$", "", path.stem)
    stem = re.sub(r"-([dl]|dark|light)$", "", stem, flags=re.IGNORECASE)
    stem = re.sub(r"^(ubuntu-mate)-.*-no-logo$", r"\1-no-logo", stem, flags=re.IGNORECASE)  # recolours
    stem = re.sub(r"^mate-stripes$", "stripes", stem, flags=re.IGNORECASE)
    return str(path.parent / stem.lower())


def validation_rows(labels: list[int], seed: int) -> np.ndarray:
    """A seeded VAL_FRACTION of each class (a mask over `labels`)."""
    arr = np.array(labels)
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(arr), dtype=bool)
    for c in np.unique(arr):
        idx = rng.permutation(np.flatnonzero(arr == c))
        mask[idx[: int(len(idx) * VAL_FRACTION)]] = True
    return mask


def thumb(path: Path) -> np.ndarray | None:
    """A 16 x 16 grey thumbnail over white, for spotting twins of held-out images."""
    im = open_small(path, 64)
    if im is None:
        return None
    return np.asarray(on_white(im).convert("L").resize((TWIN_SIDE, TWIN_SIDE), Image.BILINEAR), dtype=np.float32).ravel()


def standardised(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(1, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)


class TwinFilter:
    """Finds training candidates that are near-identical copies of held-out
    images: a 16 x 16 thumbnail within TWIN_RMS of a held-out one *and*
    correlated above TWIN_CORRELATION with it (so two mostly white, unrelated
    drawings do not count); blank thumbnails say nothing and never match."""

    def __init__(self, heldout_files: list[Path], workers: int):
        with Pool(workers) as pool:
            thumbs = [t for t in pool.map(thumb, heldout_files, chunksize=32) if t is not None]
        self.heldout = np.stack(thumbs)
        self.norms = (self.heldout ** 2).sum(1)
        self.shapes = standardised(self.heldout)

    def twins(self, files: list[Path], workers: int) -> set[Path]:
        with Pool(workers) as pool:
            thumbs = pool.map(thumb, files, chunksize=32)
        found = set()
        for start in range(0, len(files), 1024):
            part = [(f, t) for f, t in zip(files[start:start + 1024], thumbs[start:start + 1024])
                    if t is not None and t.std() >= TWIN_MIN_STD]
            if not part:
                continue
            x = np.stack([t for _, t in part])
            d2 = (x ** 2).sum(1)[:, None] + self.norms[None, :] - 2 * x @ self.heldout.T
            rms = np.sqrt(np.maximum(d2, 0) / x.shape[1])
            twin = ((rms < TWIN_RMS) & (standardised(x) @ self.shapes.T > TWIN_CORRELATION)).any(1)
            found |= {f for (f, _), t in zip(part, twin) if t}
        return found


def names_openclipart(png: Path) -> bool:
    """A tuxpaint stamp whose SVG source credits openclipart (possibly a held-out drawing)."""
    svg = png.with_suffix(".svg")
    return svg.exists() and "openclipart" in svg.read_text(errors="ignore").lower()


def tuxpaint_classes() -> dict[str, list[Path]]:
    """category/subcategory of tuxpaint's stamps -> files (PNG only; SVG duplicates are skipped)."""
    classes: dict[str, list[Path]] = {}
    if not TUXPAINT_STAMPS.exists():
        return classes
    for path in sorted(TUXPAINT_STAMPS.rglob("*.png")):
        if path.stem.endswith("_mirror") or "_" + "thumb" in path.stem or names_openclipart(path):
            continue
        parts = path.relative_to(TUXPAINT_STAMPS).parts
        name = "tuxpaint/" + ("/".join(parts[:2]) if len(parts) > 2 else f"{parts[0]}/_")
        classes.setdefault(name, []).append(path)
    return {name: files for name, files in classes.items() if len(files) >= 4}


def sprite_files() -> list[Path]:
    files = []
    for root in SPRITE_DIRS:
        if root.exists():
            files += sorted(root.rglob("*.png"))
    return files


def load_sprite(path: Path) -> np.ndarray | None:
    im = open_small(path, 2 * CACHE)
    if im is None or min(im.size) < MIN_SPRITE_SIDE or im.getbbox() is None:
        return None
    return cache_square(im)


def random_crops(path: Path, n: int, side: int, rng: random.Random) -> list[Image.Image]:
    """`n` random square-ish crops of 8-60% of the shorter side, resized to at most `side`."""
    im = open_small(path, 1024)
    if im is None:
        return []
    im = im.convert("RGB")
    crops = []
    short = min(im.size)
    for _ in range(n):
        s = int(short * rng.uniform(0.25, 0.8))
        w, h = s, int(s * rng.uniform(0.75, 1.33))
        h = min(h, im.height)
        x, y = rng.randint(0, im.width - w), rng.randint(0, im.height - h)
        crop = im.crop((x, y, x + w, y + h))
        crop.thumbnail((side, side), Image.BILINEAR)
        crops.append(crop)
    return crops


def transformed_copy(im: Image.Image, rng: random.Random) -> Image.Image:
    """An altered copy: crop of 40-90% of the area, resize, colour shift, flip,
    rotation up to 10 degrees, a border; saved by the caller as JPEG quality 30-90."""
    im = on_white(im)
    area = rng.uniform(0.4, 0.9)
    aspect = rng.uniform(0.8, 1.25)
    w = min(im.width, max(8, int(im.width * (area * aspect) ** 0.5)))
    h = min(im.height, max(8, int(im.height * (area / aspect) ** 0.5)))
    x, y = rng.randint(0, im.width - w), rng.randint(0, im.height - h)
    im = im.crop((x, y, x + w, y + h))
    scale = rng.uniform(0.5, 1.5)
    im = im.resize((max(16, int(w * scale)), max(16, int(h * scale))), Image.BILINEAR)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.8, 1.2))
    im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.8, 1.2))
    im = ImageEnhance.Color(im).enhance(rng.uniform(0.7, 1.3))
    if rng.random() < 0.5:
        im = ImageOps.mirror(im)
    im = im.rotate(rng.uniform(-10, 10), resample=Image.BILINEAR, expand=True, fillcolor=(255, 255, 255))
    border = int(min(im.size) * rng.uniform(0.0, 0.1))
    if border:
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        im = ImageOps.expand(im, border=border, fill=colour)
    return im


def save_jpeg(im: Image.Image, path: Path, quality: int) -> None:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    path.write_bytes(buf.getvalue())


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)


def split_classes(classes: dict[str, list[Path]], seed: int) -> tuple[list[str], list[str]]:
    names = sorted(classes)
    rng = random.Random(seed)
    heldout = sorted(rng.sample(names, max(1, round(len(names) * HELDOUT_CLASS_FRACTION))))
    return [n for n in names if n not in heldout], heldout


def write_fewshot(out: Path, classes: dict[str, list[Path]], heldout: list[str], seed: int) -> dict:
    rng = random.Random(seed + 2)
    counts = {}
    for name in heldout:
        files = [p for p in classes[name] if open_small(p, 64) is not None]
        if len(files) < FEWSHOT_SHOTS + 1:
            continue
        files = rng.sample(files, len(files))
        folder = name.replace("/", "--")
        for i, p in enumerate(files[:FEWSHOT_SHOTS + EVAL_PER_CLASS]):
            part = "gallery" if i < FEWSHOT_SHOTS else "queries"
            link(p, out / part / folder / f"{i:04d}-{p.name}")
        counts[name] = {"gallery": FEWSHOT_SHOTS, "queries": min(len(files) - FEWSHOT_SHOTS, EVAL_PER_CLASS)}
    return counts


def write_copy_detection(out: Path, originals: list[tuple[str, str, Image.Image]],
                         distractors: list[tuple[str, Image.Image]], seed: int) -> dict:
    """`originals` are (group, name, image): queries are drawn from at most
    COPY_QUERIES_PER_CLASS of a group, every original stays in the gallery."""
    rng = random.Random(seed + 1)
    by_group: dict[str, list[int]] = {}
    for i, (group, _, _) in enumerate(originals):
        by_group.setdefault(group, []).append(i)
    pool = [i for ids in by_group.values() for i in rng.sample(ids, min(COPY_QUERIES_PER_CLASS, len(ids)))]
    query_ids = set(rng.sample(pool, min(COPY_QUERIES, len(pool))))
    for i, (group, name, im) in enumerate(originals):
        folder = out / "gallery" / f"{i:05d}"
        folder.mkdir(parents=True)
        im.save(folder / f"{name}.png")
        if i in query_ids:
            (out / "queries" / f"{i:05d}").mkdir(parents=True)
            save_jpeg(transformed_copy(im, rng), out / "queries" / f"{i:05d}" / "copy.jpg", rng.randint(30, 90))
            if not group.startswith("photo-"):  # clip-art copies alone
                link((out / "queries" / f"{i:05d}" / "copy.jpg").resolve(), out / "queries-clipart" / f"{i:05d}" / "copy.jpg")
    for j, (name, im) in enumerate(distractors):
        folder = out / "gallery" / f"d{j:05d}"
        folder.mkdir(parents=True)
        im.save(folder / f"{name}.png")
    return {"originals": len(originals), "queries": len(query_ids), "distractors": len(distractors),
            "gallery": len(originals) + len(distractors)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("corpus"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    started = time.time()
    if args.out.exists():
        shutil.rmtree(args.out)
    (args.out / "eval").mkdir(parents=True)

    classes = clipart_classes()
    train_classes, heldout = split_classes(classes, args.seed)
    print(f"openclipart: {len(classes)} classes ({sum(map(len, classes.values()))} files) besides computer/icons; "
          f"held out: {', '.join(heldout)}")
    cap_rng = random.Random(args.seed + 4)
    for name in heldout:
        files = list(enumerate(classes[name]))  # numbered: nested folders repeat file names
        for i, p in sorted(cap_rng.sample(files, min(EVAL_PER_CLASS, len(files)))):
            link(p, args.out / "eval" / "openclipart-heldout" / name.replace("/", "--") / f"{i:04d}-{p.name}")

    # Twins of held-out drawings never train: the held-out classes and computer/icons.
    heldout_files = [p for name in heldout for p in classes[name]]
    heldout_files += sorted((OPENCLIPART / EXCLUDED_CLASSES[0]).rglob("*.png"))
    twin_filter = TwinFilter(heldout_files, args.workers)

    train_files = [(p, c) for c, name in enumerate(train_classes) for p in classes[name]]
    with Pool(args.workers) as pool:
        cached = pool.map(load_clipart, [p for p, _ in train_files], chunksize=32)
    loaded = [(a, p, c) for a, (p, c) in zip(cached, train_files) if a is not None]
    clip_twins = twin_filter.twins([p for _, p, _ in loaded], args.workers)
    kept = [(a, c) for a, p, c in loaded if p not in clip_twins]
    images = [a for a, _ in kept]
    labels = [c for _, c in kept]
    val = validation_rows(labels, args.seed).tolist()
    sources = ["openclipart"] * len(images)
    print(f"clip art: {len(images)} training images in {len(train_classes)} classes, {sum(val)} of them validation; "
          f"{len(clip_twins)} twins of held-out images dropped ({time.time() - started:.0f}s)")

    # Tuxpaint's stamps: every class trains (none of it is evaluated), labelled like clip art.
    stamps = tuxpaint_classes()
    stamp_classes = sorted(stamps)
    stamp_files = [(p, len(train_classes) + c) for c, name in enumerate(stamp_classes) for p in stamps[name]]
    twins = twin_filter.twins([p for p, _ in stamp_files], args.workers)
    with Pool(args.workers) as pool:
        cached = pool.map(load_clipart, [p for p, _ in stamp_files], chunksize=16)
    kept = [(a, c) for a, (p, c) in zip(cached, stamp_files) if a is not None and p not in twins]
    stamp_val = validation_rows([c for _, c in kept], args.seed + 5)
    images += [a for a, _ in kept]
    labels += [c for _, c in kept]
    val += stamp_val.tolist()
    sources += ["stamps"] * len(kept)
    print(f"tuxpaint stamps: {len(kept)} images in {len(stamp_classes)} classes, {int(stamp_val.sum())} validation; "
          f"{len(twins)} twins of held-out images dropped ({time.time() - started:.0f}s)")

    sprite_paths = sprite_files()
    twins = twin_filter.twins(sprite_paths, args.workers)
    with Pool(args.workers) as pool:
        sprites = [a for a in pool.map(load_sprite, [p for p in sprite_paths if p not in twins], chunksize=32)
                   if a is not None]
    images += sprites
    labels += [-1] * len(sprites)
    val += [False] * len(sprites)
    sources += ["sprites"] * len(sprites)
    print(f"game sprites: {len(sprites)} images; {len(twins)} twins of held-out images dropped")

    emoji = render_emoji()
    images += emoji
    labels += [-1] * len(emoji)
    val += [False] * len(emoji)
    sources += ["emoji"] * len(emoji)
    print(f"emoji: {len(emoji)} glyphs")

    photos = wallpaper_files()
    rng = random.Random(args.seed)
    pictures = sorted({picture_key(p) for p in photos})
    heldout_pictures = set(rng.sample(pictures, round(len(pictures) * HELDOUT_PHOTO_FRACTION)))
    heldout_photos = {p for p in photos if picture_key(p) in heldout_pictures}
    # One file per picture (the largest on disk) yields its crops, so a picture shipped
    # at twelve resolutions does not weigh twelve times.
    source_of: dict[str, Path] = {}
    for p in photos:
        key = picture_key(p)
        if key not in source_of or p.stat().st_size > source_of[key].stat().st_size:
            source_of[key] = p
    n_crops = 0
    photo_originals = []
    for path in photos:
        if source_of[picture_key(path)] != path:
            continue
        if path in heldout_photos:
            for i, crop in enumerate(random_crops(path, CROPS_PER_HELDOUT_PHOTO, 256, rng)):
                photo_originals.append((f"photo-{len(photo_originals) // 25}", f"{path.stem}-{i}", crop))
            continue
        for crop in random_crops(path, CROPS_PER_TRAIN_PHOTO, 2 * CACHE, rng):
            images.append(cache_square(crop))
            labels.append(-1)
            val.append(False)
            sources.append("photo")
            n_crops += 1
    print(f"photos: {len(pictures) - len(heldout_pictures)} pictures -> {n_crops} training crops; "
          f"{len(heldout_pictures)} of {len(pictures)} pictures ({len(heldout_photos)} files) held out "
          f"({time.time() - started:.0f}s)")

    np.savez(args.out / "train.npz", images=np.stack(images), labels=np.array(labels, dtype=np.int64),
             sources=np.array(sources), classes=np.array(train_classes + stamp_classes), val=np.array(val))

    # Copy detection: held-out clip art and photo crops are the originals; training
    # clip art (never a query) fills the gallery with distractors.
    clip_originals = []
    for name in heldout:
        for p in classes[name]:
            im = open_small(p, 512)
            if im is not None:
                clip_originals.append((name, p.stem, im))
    distractor_rng = random.Random(args.seed + 3)
    # A twin of a held-out original would be a second right answer: not a distractor.
    distractor_files = distractor_rng.sample([p for p, _ in train_files if p not in clip_twins], COPY_DISTRACTORS + 200)
    distractors = [(p.stem, im) for p in distractor_files if (im := open_small(p, 512)) is not None][:COPY_DISTRACTORS]
    copy = write_copy_detection(args.out / "eval" / "copy", clip_originals + photo_originals, distractors, args.seed)
    fewshot = write_fewshot(args.out / "eval" / "fewshot", classes, heldout, args.seed)

    manifest = {
        "seed": args.seed,
        "cache_side": CACHE,
        "excluded": list(EXCLUDED_CLASSES) + ["/usr/share/icons (never read)"],
        "openclipart_train_classes": train_classes,
        "openclipart_heldout_classes": heldout,
        "heldout_packages": list(HELDOUT_PACKAGES),
        "heldout_photos": sorted(str(p) for p in heldout_photos),
        "tuxpaint_classes": stamp_classes,
        "train_images": {s: sources.count(s) for s in ("openclipart", "stamps", "sprites", "emoji", "photo")},
        "copy_detection": copy,
        "fewshot": fewshot,
        "seconds": round(time.time() - started),
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps({k: manifest[k] for k in ("train_images", "copy_detection", "seconds")}))


if __name__ == "__main__":
    main()
