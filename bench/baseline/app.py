"""The service a user might write instead of lookalike: FastAPI + uvicorn,
PyTorch running the same TorchScript encoder one request at a time, hnswlib
for the index. Same model, same preprocessing (from the manifest), same
gallery, so bench/search_load.py compares serving, not models.

    python bench/baseline/app.py --model models/default --gallery DIR --port 8091
"""

import argparse
import io
import json
import pathlib

import hnswlib
import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from PIL import Image

FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos3": Image.LANCZOS}


def load_model(model_dir: pathlib.Path):
    manifest = json.loads((model_dir / "manifest.json").read_text())
    module = torch.jit.load(str(model_dir / "encoder.pt"), map_location="cpu").eval()
    return module, manifest["input"]


def preprocess(data: bytes, spec: dict) -> torch.Tensor:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    size = spec["size"]
    if spec["resize"] == "center_crop":
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    image = image.resize((size, size), FILTERS[spec["filter"]])
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(spec["mean"]).view(3, 1, 1)
    std = torch.tensor(spec["std"]).view(3, 1, 1)
    return (pixels - mean) / std


def build_app(model_dir: pathlib.Path, gallery: pathlib.Path) -> FastAPI:
    module, spec = load_model(model_dir)
    files = sorted(gallery.glob("*.png"))
    with torch.no_grad():
        vectors = torch.cat([module(torch.stack([preprocess(f.read_bytes(), spec) for f in files[i : i + 64]]))
                             for i in range(0, len(files), 64)]).numpy()
    index = hnswlib.Index(space="cosine", dim=vectors.shape[1])
    index.init_index(max_elements=max(len(files), 1), ef_construction=200, M=16)
    index.add_items(vectors, np.arange(len(files)))
    index.set_ef(64)
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok", "items": len(files)}

    @app.post("/search")
    async def search(request: Request, k: int = 10):
        body = await request.body()
        try:
            pixels = preprocess(body, spec)
        except Exception as error:  # noqa: BLE001 - any decoder error is the client's
            raise HTTPException(status_code=400, detail=str(error)) from error
        with torch.no_grad():
            query = module(pixels.unsqueeze(0)).numpy()
        labels, distances = index.knn_query(query, k=min(k, len(files)))
        return {"results": [{"id": int(i), "score": float(1 - d)} for i, d in zip(labels[0], distances[0])]}

    return app


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=pathlib.Path, required=True)
    parser.add_argument("--gallery", type=pathlib.Path, required=True, help="folder of PNG images")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = all cores")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    uvicorn.run(build_app(args.model, args.gallery), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
