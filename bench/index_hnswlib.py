"""The hnswlib side of the index scale benchmark: the same data sets, queries
and exact ground truth that benches/index_scale.rs wrote under
target/bench-index/, the same M and ef_construction, the same ef values;
then the two side by side. Run by `make bench-index` after the Rust bench.

Build threads: hnswlib's add_items uses every core, like hnsw_rs's
parallel_insert (rayon). Searches: one query at a time on one thread, in both.
"""

import json
import os
import pathlib
import resource
import tempfile
import time

import hnswlib
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "target/bench-index"
M, EF_CONSTRUCTION, K = 16, 200, 10
EFS = [16, 32, 64, 128, 256]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load(name: str, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    base = np.fromfile(DATA / f"{name}-base.f32", dtype="<f4").reshape(-1, dim)
    queries = np.fromfile(DATA / f"{name}-queries.f32", dtype="<f4").reshape(-1, dim)
    truth = np.fromfile(DATA / f"{name}-truth.u32", dtype="<u4").reshape(-1, K)
    return base, queries, truth


def run(name: str, dim: int) -> list[dict]:
    base, queries, truth = load(name, dim)
    before = rss_bytes()
    started = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=dim)  # unit vectors: inner product = cosine
    index.init_index(max_elements=len(base), ef_construction=EF_CONSTRUCTION, M=M)
    index.add_items(base, np.arange(len(base)))
    build_s = time.perf_counter() - started
    bytes_per_vector = (rss_bytes() - before) / len(base)
    index.set_num_threads(1)
    rows = []
    for ef in EFS:
        index.set_ef(ef)
        started = time.perf_counter()
        found = [index.knn_query(q, k=K)[0][0] for q in queries]
        qps = len(queries) / (time.perf_counter() - started)
        recall = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth)) / truth.size
        rows.append({"variant": "hnswlib (ip)", "build_s": build_s, "bytes_per_vector": bytes_per_vector,
                     "ef": ef, "recall": recall, "qps": qps})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "index.bin")
        started = time.perf_counter()
        index.save_index(path)
        save_s = time.perf_counter() - started
        started = time.perf_counter()
        hnswlib.Index(space="ip", dim=dim).load_index(path)
        load_s = time.perf_counter() - started
        size = os.path.getsize(path)
    print(f"hnswlib {name}: save {save_s:.2f} s ({size / 1e6:.0f} MB, not fsynced), load {load_s:.2f} s")
    return rows


def main() -> None:
    ours = json.loads((DATA / "hnsw_rs.json").read_text())
    dim = 128
    for dataset in ours:
        name = dataset["dataset"]
        theirs = run(name, dim)
        print(f"\n## {name}: hnsw_rs variants next to hnswlib, M {M}, ef_construction {EF_CONSTRUCTION}\n")
        print("| variant | build s | kB/vector | ef | recall@10 | queries/s |")
        print("| --- | --- | --- | --- | --- | --- |")
        for row in dataset["rows"] + theirs:
            print(f"| {row['variant']} | {row['build_s']:.1f} | {row['bytes_per_vector'] / 1000:.2f} | {row['ef']} | "
                  f"{row['recall']:.4f} | {row['qps']:.0f} |")
        service = [r for r in dataset["rows"] if r["variant"].startswith("service")]
        for target in (0.95, 0.99):
            ours_at = next((r for r in service if r["recall"] >= target), None)
            theirs_at = next((r for r in theirs if r["recall"] >= target), None)
            if ours_at and theirs_at:
                print(f"\nat recall@10 >= {target}: lookalike {ours_at['qps']:.0f} q/s (ef {ours_at['ef']}), "
                      f"hnswlib {theirs_at['qps']:.0f} q/s (ef {theirs_at['ef']}): "
                      f"{ours_at['qps'] / theirs_at['qps']:.2f}x")
        print(f"build: lookalike {service[0]['build_s']:.1f} s, hnswlib {theirs[0]['build_s']:.1f} s; "
              f"memory: {service[0]['bytes_per_vector'] / 1000:.2f} vs {theirs[0]['bytes_per_vector'] / 1000:.2f} kB/vector")
    print(f"(peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB)")


if __name__ == "__main__":
    main()
