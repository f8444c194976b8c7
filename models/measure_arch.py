"""Cost of candidate encoders on this machine: training views/s (forward and
backward at the general recipe's batch) and TorchScript inference images/s at
batch 1 and 32, side by side in one run. The general model's input size,
width and groups were chosen from this table (models/README.md).

    python models/measure_arch.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from shufflenet import ShuffleNetEncoder, count_flops

CANDIDATES = [(3, 0.5, 64), (3, 0.5, 96), (3, 0.5, 128), (4, 0.5, 96), (3, 1.0, 96), (3, 1.0, 64)]


def train_rate(model, size: int, batch: int, steps: int) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size)
    for i in range(steps + 1):
        if i == 1:
            started = time.perf_counter()
        loss = F.normalize(model(x), dim=1).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - started)


@torch.no_grad()
def infer_rate(model, size: int, batch: int, seconds: float = 3.0) -> float:
    scripted = torch.jit.script(model.eval())
    x = torch.randn(batch, 3, size, size)
    for _ in range(3):
        scripted(x)
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        scripted(x)
        n += batch
    return n / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--skip", type=int, default=0, help="skip the first N candidates")
    ap.add_argument("--batch", type=int, default=192, help="views per training step (96 images x 2 views)")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| groups | width | input | parameters | MFLOPs | train views/s | infer img/s b=1 | infer img/s b=32 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for groups, width, size in CANDIDATES[args.skip:]:
        model = ShuffleNetEncoder(groups=groups, width=width)
        params = sum(p.numel() for p in model.parameters())
        mflops = count_flops(model, size) / 1e6
        tr = train_rate(model, size, args.batch, args.steps)
        b1, b32 = infer_rate(model, size, 1), infer_rate(model, size, 32)
        print(f"| {groups} | {width} | {size} | {params:,} | {mflops:.1f} | {tr:.0f} | {b1:.0f} | {b32:.0f} |", flush=True)


if __name__ == "__main__":
    main()
