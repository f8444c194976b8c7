"""Export a ShuffleNet encoder as a model folder: TorchScript `encoder.pt` + `manifest.json`.

    python models/export.py --out models/default                     # untrained
    python models/export.py --checkpoint runs/x/best.pt --out models/default
    python models/export.py --checkpoint runs/x/best.pt --evaluation eval.json --out models/default

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
# Fashion-MNIST pixel statistics (grey, replicated to RGB).
DEFAULT_PREPROCESS = {"size": 64, "channels": 3, "mean": [0.2860] * 3, "std": [0.3530] * 3,
                      "resize": "stretch", "filter": "bilinear"}
DEFAULT_ARCH = {"name": "shufflenet_v1", "groups": 3, "width": 0.5, "embedding_dim": 128}


def build_model(arch: dict) -> ShuffleNetEncoder:
    return ShuffleNetEncoder(groups=arch["groups"], width=arch["width"],
                             embedding_dim=arch["embedding_dim"])


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def export(model: ShuffleNetEncoder, manifest: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    scripted = torch.jit.script(model)
    tmp = out / "encoder.pt.tmp"
    scripted.save(str(tmp))
    os.replace(tmp, out / "encoder.pt")
    manifest["encoder_sha256"] = hashlib.sha256((out / "encoder.pt").read_bytes()).hexdigest()
    write_atomic(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())


def make_manifest(name: str, version: str, arch: dict, preprocess: dict, model: ShuffleNetEncoder,
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
    ap.add_argument("--name", default="shufflenet-v1-g3-w0.5")
    ap.add_argument("--version", default=None, help="default: from the checkpoint, or 0-untrained")
    ap.add_argument("--evaluation", type=Path,
                    help="report of `lookalike eval --json`: its figures and verification threshold go in the manifest")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    if args.checkpoint:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        arch, preprocess = ckpt["arch"], ckpt["preprocess"]
        model = build_model(arch)
        model.load_state_dict(ckpt["model"])
        training, evaluation = ckpt.get("training"), ckpt.get("evaluation")
        threshold = ckpt.get("verification_threshold")
        version = args.version or ckpt.get("version", "1")
    else:
        arch, preprocess = DEFAULT_ARCH, DEFAULT_PREPROCESS
        model = build_model(arch)
        training = evaluation = threshold = None
        version = args.version or "0-untrained"
    if args.evaluation:
        evaluation = json.loads(args.evaluation.read_text())
        threshold = evaluation["verification"]["threshold"]
    manifest = make_manifest(args.name, version, arch, preprocess, model, training, evaluation, threshold)
    export(model, manifest, args.out)
    print(json.dumps({k: manifest[k] for k in ("name", "version", "trained", "architecture")}, indent=2))


if __name__ == "__main__":
    main()
