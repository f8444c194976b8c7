"""Does labelling what `GET /gallery/suggestions` proposes help more than
labelling at random? A gallery of Fashion-MNIST test images (their true
classes known to the bench, not the service) with 2 labelled per class;
then 50 more labelled, either the 50 the service suggests (one request) or
50 chosen at random; then the k-NN label of every item still unlabelled in
both (`GET /gallery/{id}/similar`: its labelled neighbours' vote, `unknown`
counting as wrong) is compared with its true class. Fresh service per
strategy; several seeds; the bundled default and the Fashion-MNIST model.

    python bench/suggestions.py [--items 2000] [--label 50] [--seeds 0,1,2]   (make bench-suggestions)
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from duplicates import add_all  # noqa: E402
from finetune import ROOT, fashion_mnist, png, request, serve  # noqa: E402

CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def relabel(base: str, ids: list[int], truth: dict[int, int]) -> None:
    by_class: dict[int, list[int]] = {}
    for i in ids:
        by_class.setdefault(truth[i], []).append(i)
    for c, members in by_class.items():
        body = json.dumps({"ids": members, "label": CLASSES[c]}).encode()
        request(f"{base}/gallery/labels", "POST", body, {"content-type": "application/json"})


def accuracy(base: str, ids: list[int], truth: dict[int, int]) -> float:
    def right(i: int) -> bool:
        return request(f"{base}/gallery/{i}/similar?k=10")["prediction"]["label"] == CLASSES[truth[i]]

    with ThreadPoolExecutor(4) as pool:
        return float(np.mean(list(pool.map(right, ids))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--label", type=int, default=50)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--models", default="models/default,models/fashion-mnist")
    ap.add_argument("--port", type=int, default=8189)
    args = ap.parse_args()
    test_x, test_y = fashion_mnist.load("test")
    images = [png(test_x[i]) for i in range(args.items)]
    classes = np.asarray(test_y[: args.items])
    print(f"{args.items} Fashion-MNIST test images, 2 labelled per class, then {args.label} more; "
          "k-NN accuracy on the items neither strategy labelled")
    print("| model | seed | before | + suggested | + random | suggested share unknown/uncertain/cluster |")
    print("| --- | --- | --- | --- | --- | --- |", flush=True)
    for model in args.models.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            rows = {}
            for strategy in ("suggested", "random"):
                with serve(ROOT / "target/release/lookalike", args.port, ["--model", str(ROOT / model)],
                           "lookalike-bench-suggest-") as base:
                    ids = add_all(base, images)
                    truth = dict(zip(ids, classes.tolist()))
                    rng = np.random.default_rng(seed)
                    seeds = [ids[i] for c in range(10) for i in rng.choice(np.flatnonzero(classes == c), 2,
                                                                            replace=False)]
                    relabel(base, seeds, truth)
                    unlabelled = [i for i in ids if i not in set(seeds)]
                    before = accuracy(base, unlabelled, truth)
                    if strategy == "suggested":
                        answer = request(f"{base}/gallery/suggestions?n={args.label}")
                        chosen = [s["item"]["id"] for s in answer["suggestions"]]
                        reasons = [s["reason"] for s in answer["suggestions"]]
                    else:
                        pool = np.random.default_rng(seed + 1000)
                        chosen = [int(i) for i in pool.choice(unlabelled, args.label, replace=False)]
                        reasons = []
                    relabel(base, chosen, truth)
                    predicted = {i: request(f"{base}/gallery/{i}/similar?k=10")["prediction"]["label"]
                                 for i in unlabelled if i not in set(chosen)}
                    rows[strategy] = (before, chosen, predicted, truth, reasons)
            # Ids are the same in both services (same images, same order): score on items neither labelled.
            rest = set(rows["suggested"][2]) & set(rows["random"][2])
            score = {k: np.mean([rows[k][2][i] == CLASSES[rows[k][3][i]] for i in rest]) for k in rows}
            reasons = rows["suggested"][4]
            share = "/".join(str(reasons.count(r)) for r in ("unknown", "uncertain", "cluster"))
            print(f"| {Path(model).name} | {seed} | {rows['suggested'][0]:.3f} | {score['suggested']:.3f} | "
                  f"{score['random']:.3f} | {share} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
