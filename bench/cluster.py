"""Cluster mode next to embedded mode, on this machine, in one run:

1. POST /search under wrk (10 s per row), a 2,000-image Fashion-MNIST gallery,
   the Fashion-MNIST model: embedded mode (SQLite + hnsw_rs), cluster mode
   with one replica, and with three replicas over the same database (one wrk
   per replica, a third of the connections each; requests/s summed).
2. The index at 100k vectors: pgvector's HNSW (as cluster mode creates it:
   m 16, ef_construction 64, cosine) against hnsw_rs as the service builds it
   (M 16, ef_construction 200), on the same clustered synthetic vectors,
   queries and exact ground truth that `cargo bench --bench index_scale`
   writes (run with `--clustered-only` first when they are missing): build
   time, size, recall@10 and queries/s (one query at a time) by ef_search,
   the service's default marked.

3. Re-embedding shared among replicas: a 2,000-image gallery, then an
   activation of a second model version (the Fashion-MNIST encoder saved as
   version 2 in each replica's folder) that no image has an embedding of; the
   replicas claim chunks of the work (`FOR UPDATE SKIP LOCKED`). Images/s
   from the activation's own result, with one and three replicas.

    python bench/cluster.py [--seconds 10] [--skip-http] [--skip-index] [--skip-reembed]   (make bench-cluster)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import urllib.request
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import search_load as load  # noqa: E402
from pg_server import PgServer  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
BINARY = ROOT / "target/release/lookalike"
MODEL = ROOT / "models/fashion-mnist"
DATA = ROOT / "target/bench-index"
K = 10
EFS = [16, 32, 40, 64, 128, 256]
SERVICE_EF = {"hnsw_rs": 32, "pgvector": 64}  # max(32, 2k) and max(64, 2k) at k = 10


TOKEN = "bench-admin-token-0123456789"


def serve(port: int, folder: pathlib.Path, database: str | None) -> object:
    command = [str(BINARY), "serve", "--port", str(port), "--data-dir", str(folder), "--model", str(MODEL)]
    env_prefix = ["env", f"LOOKALIKE_ADMIN_TOKEN={TOKEN}"]
    env_prefix += [f"LOOKALIKE_DATABASE_URL={database}"] if database else []
    folder.mkdir(parents=True, exist_ok=True)
    process = load.start(env_prefix + command, folder / "service.log")
    load.wait_healthy(f"http://127.0.0.1:{port}", process)
    return process


def wrk_all(urls: list[str], image: pathlib.Path, connections: int, seconds: float) -> dict:
    """One wrk per URL at once, the connections shared out; requests/s summed."""
    results: list[dict] = [{} for _ in urls]

    def one(i: int) -> None:
        results[i] = load.wrk(urls[i], image, max(1, connections // len(urls)), seconds)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(urls))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return {
        "rps": sum(r["rps"] for r in results),
        "p50_ms": np.mean([r["p50_us"] / 1e3 for r in results]),
        "p99_ms": max(r["p99_us"] / 1e3 for r in results),
        "errors": sum(r["non_2xx"] + r["socket_errors"] for r in results),
    }


def http_table(seconds: float) -> None:
    work = pathlib.Path(tempfile.mkdtemp(prefix="lookalike-bench-cluster-"))
    gallery = load.write_pngs(load.read_images(2000), work / "gallery")
    image = gallery[0]
    rows = []
    with PgServer() as pg:
        setups = [("embedded (SQLite + hnsw_rs)", 1, None), ("cluster, 1 replica", 1, "one"),
                  ("cluster, 3 replicas", 3, "three")]
        for name, replicas, database in setups:
            url = pg.create_database(database) if database else None
            processes, urls = [], []
            try:
                for r in range(replicas):
                    port = 8190 + r
                    processes.append(serve(port, work / f"{name[:7]}-{database}-{r}", url))
                    urls.append(f"http://127.0.0.1:{port}")
                    if r == 0:
                        load.upload_gallery(urls[0], gallery)
                load.wrk(urls[0], image, 8, 2)  # warm-up
                for c in (8, 32):
                    figures = wrk_all(urls, image, c, seconds)
                    rows.append((name, c, figures))
                    print(f"  {name} c={c}: {figures['rps']:.0f} req/s", file=sys.stderr, flush=True)
            finally:
                [load.stop(p) for p in processes]
    base = {c: f["rps"] for name, c, f in rows if name.startswith("embedded")}
    print("\n| mode | concurrency | requests/s | vs embedded | p50 ms | p99 ms | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, c, f in rows:
        print(f"| {name} | {c} | {f['rps']:.0f} | {f['rps'] / base[c]:.2f}x | {f['p50_ms']:.1f} | "
              f"{f['p99_ms']:.1f} | {f['errors']} |")


def admin(url: str, method: str = "GET") -> dict:
    request = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request) as response:
        return json.load(response)


def save_second_version(folder: pathlib.Path) -> None:
    """The bundled encoder saved again as version 2: a version nothing is embedded with yet."""
    target = folder / "models" / "2"
    shutil.copytree(MODEL, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["version"] = "2"
    manifest.pop("encoder_sha256", None)
    (target / "manifest.json").write_text(json.dumps(manifest))


def reembed_table() -> None:
    work = pathlib.Path(tempfile.mkdtemp(prefix="lookalike-bench-reembed-"))
    gallery = load.write_pngs(load.read_images(2000), work / "gallery")
    rows = []
    with PgServer() as pg:
        for name, replicas in (("embedded", 1), ("cluster", 1), ("cluster", 3)):
            url = pg.create_database(f"reembed{replicas}") if name == "cluster" else None
            processes, urls = [], []
            try:
                for r in range(replicas):
                    folder = work / f"{name}{replicas}-{r}"
                    save_second_version(folder)
                    port = 8190 + r
                    processes.append(serve(port, folder, url))
                    urls.append(f"http://127.0.0.1:{port}")
                load.upload_gallery(urls[0], gallery)
                started = admin(f"{urls[0]}/admin/models/2/activate", "POST")
                while (status := admin(f"{urls[0]}/admin/activations/{started['id']}"))["state"] == "running":
                    time.sleep(0.2)
                assert status["state"] == "done", status
                result = status["result"]
                rows.append((name, replicas, result["embedded"], result["seconds"]))
                print(f"  {name}, {replicas} replica(s): {result['embedded']} in {result['seconds']:.1f} s",
                      file=sys.stderr)
            finally:
                [load.stop(p) for p in processes]
    base = rows[1][2] / rows[1][3]
    print("\nRe-embedding a 2,000-image gallery with a new version (activation), Fashion-MNIST model")
    print("| mode | replicas | images | seconds | images/s | vs 1 cluster replica |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, replicas, embedded, seconds in rows:
        rate = embedded / seconds
        print(f"| {name} | {replicas} | {embedded} | {seconds:.1f} | {rate:.0f} | {rate / base:.2f}x |")


def index_table() -> None:
    import psycopg

    if not (DATA / "hnsw_rs.json").exists():
        subprocess.run(["cargo", "bench", "--locked", "--bench", "index_scale", "--", "--clustered-only"],
                       cwd=ROOT, check=True)
    dataset = next(d for d in json.loads((DATA / "hnsw_rs.json").read_text()) if d["dataset"] == "clustered")
    dim = dataset.get("dim", 128)
    base = np.fromfile(DATA / "clustered-base.f32", dtype="<f4").reshape(-1, dim)
    queries = np.fromfile(DATA / "clustered-queries.f32", dtype="<f4").reshape(-1, dim)
    truth = np.fromfile(DATA / "clustered-truth.u32", dtype="<u4").reshape(-1, K)
    rows = [("hnsw_rs (embedded)", r["build_s"], r["bytes_per_vector"], r["ef"], r["recall"], r["qps"])
            for r in dataset["rows"] if r["variant"].startswith("service")]
    with PgServer() as pg, psycopg.connect(pg.create_database("vectors"), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        conn.execute(f"CREATE TABLE v (id integer PRIMARY KEY, e vector({dim}))")
        with conn.cursor().copy("COPY v (id, e) FROM STDIN") as copy:
            for i, row in enumerate(base):
                copy.write_row((i, "[" + ",".join(f"{x:.7g}" for x in row) + "]"))
        started = time.perf_counter()
        conn.execute("CREATE INDEX ON v USING hnsw (e vector_cosine_ops)")
        build_s = time.perf_counter() - started
        size = conn.execute("SELECT pg_relation_size('v_e_idx') + pg_relation_size('v')").fetchone()[0]
        texts = ["[" + ",".join(f"{x:.7g}" for x in q) + "]" for q in queries]
        for ef in EFS:
            conn.execute(f"SET hnsw.ef_search = {ef}")
            found, started = [], time.perf_counter()
            for q in texts:
                found.append([r[0] for r in conn.execute(
                    "SELECT id FROM v ORDER BY e <=> %s::vector LIMIT 10", (q,)).fetchall()])
            qps = len(texts) / (time.perf_counter() - started)
            recall = np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth.tolist())])
            rows.append(("pgvector (cluster)", build_s, size / len(base), ef, recall, qps))
    print(f"\n100k clustered vectors, dim {dim}, 1,000 queries, k = 10; (service default) marks the ef each mode uses")
    print("| index | build s | kB/vector | ef_search | recall@10 | queries/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, build, per_vector, ef, recall, qps in rows:
        default = " (service default)" if ef == SERVICE_EF["pgvector" if name.startswith("pgvector") else "hnsw_rs"] else ""
        print(f"| {name} | {build:.1f} | {per_vector / 1000:.2f} | {ef}{default} | {recall:.4f} | {qps:.0f} |")


def main() -> int:
    global BINARY
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--skip-index", action="store_true")
    ap.add_argument("--skip-reembed", action="store_true")
    ap.add_argument("--binary", type=pathlib.Path, default=BINARY, help="the lookalike binary to measure")
    args = ap.parse_args()
    BINARY = args.binary
    if not args.skip_reembed:
        reembed_table()
    if not args.skip_http:
        http_table(args.seconds)
    if not args.skip_index:
        index_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
