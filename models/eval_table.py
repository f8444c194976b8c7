"""One side-by-side table of `lookalike eval` reports (`make eval`): raw pixels,
then each model, for every set, with verification, near-duplicate calibration
and throughput.

    python models/eval_table.py runs/eval/fashion-mnist.json runs/eval/default.json ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(report: dict) -> dict[str, dict]:
    sets = {}
    fashion = report.get("fashion_mnist")
    if fashion:
        for part in ("seen", "unseen", "all"):
            sets[fashion[part]["name"]] = fashion[part]
    for s in report["sets"]:
        sets[s["name"]] = s
    return sets


def main() -> None:
    reports = [(Path(p).stem, json.loads(Path(p).read_text())) for p in sys.argv[1:]]
    names = [r["model"] for _, r in reports]
    by_model = [rows(r) for _, r in reports]
    sets = list(dict.fromkeys(name for r in by_model for name in r))
    print("Recall@1 / MAP@R per set; raw pixels from the first report that has the set.\n")
    print("| set | raw pixels | " + " | ".join(names) + " |")
    print("| --- | --- |" + " --- |" * len(names))
    for name in sets:
        raw = next((r[name]["raw_pixels"] for r in by_model if name in r), None)
        cells = []
        for r in by_model:
            s = r.get(name)
            cells.append("-" if s is None else f"{s['model']['recall_at_1']:.3f} / {s['model']['map_at_r']:.3f}")
        raw_cell = "-" if raw is None else f"{raw['recall_at_1']:.3f} / {raw['map_at_r']:.3f}"
        print(f"| {name} | {raw_cell} | " + " | ".join(cells) + " |")
    print()
    print("| | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    line = lambda label, f: print(f"| {label} | " + " | ".join(f(r) for _, r in reports) + " |")  # noqa: E731
    line("/verify balanced accuracy (threshold)", lambda r: f"{r['verification']['balanced_accuracy']:.3f} "
         f"({r['verification']['threshold']:.3f}, {r['verification_set']})")
    line("/verify ROC AUC", lambda r: f"{r['verification']['roc_auc']:.3f}")
    line("near-duplicate distance: copies caught at <= 1% class-mates",
         lambda r: "-" if not r.get("near_duplicate") else
         f"{r['near_duplicate']['recall']:.3f} at {r['near_duplicate']['distance']:.4f}")
    line("images/s, batch 1", lambda r: f"{r['throughput']['batch_1']:.0f}" if r.get("throughput") else "-")
    line("images/s, batch 32", lambda r: f"{r['throughput']['batch_32']:.0f}" if r.get("throughput") else "-")
    line("Fashion-MNIST images evaluated", lambda r: str(r["fashion_mnist"]["all"]["queries"]
                                                          + r["fashion_mnist"]["all"]["gallery"])
         if r.get("fashion_mnist") else "-")


if __name__ == "__main__":
    main()
