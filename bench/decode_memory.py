"""Peak memory under abandoned large decodes: small PNGs that decode to a
large image, each request's connection closed 30 ms after its body, against
the release binary with one preprocessing thread. A decode keeps its
preprocessing permit until it ends, even when its request is gone, so peak
resident memory (VmHWM) stays near one decode's worth above the idle process
however many requests are abandoned.

    python bench/decode_memory.py [--requests 64] [--side 8192]   (make bench-decode-memory)

`--rgba --orientation 6 --threads 2` decodes RGBA PNGs carrying an EXIF
quarter turn, two at once; `--binary` (repeatable) compares builds in one run.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def vm(pid: int, field: str) -> float:
    """A `/proc/<pid>/status` figure in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def bomb(side: int, rgba: bool = False, orientation: int = 1) -> bytes:
    """A flat grey PNG of `side` x `side`: a few hundred kB that decode to side² x 3 (4) bytes,
    with an EXIF orientation when it is not 1."""
    out = io.BytesIO()
    mode, colour = ("RGBA", (120, 120, 120, 200)) if rgba else ("RGB", (120, 120, 120))
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.new(mode, (side, side), colour).save(out, format="PNG", optimize=True, exif=exif.tobytes())
    return out.getvalue()


def abandoned_search(port: int, body: bytes) -> None:
    """POST /search with the image as its body, then close 30 ms later without reading."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        head = f"POST /search?k=1 HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
        conn.sendall(head.encode() + body)
        time.sleep(0.03)


def idle(port: int, pid: int, settle: float) -> None:
    """Waits until the service answers and its CPU time stops growing."""
    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=600).read()
    ticks = lambda: sum(int(x) for x in Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[11:13])
    last = ticks()
    while True:
        time.sleep(settle)
        now = ticks()
        if now == last:
            return
        last = now


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--side", type=int, default=8192)
    parser.add_argument("--port", type=int, default=8095)
    parser.add_argument("--rgba", action="store_true", help="RGBA PNGs (4 bytes a pixel decoded)")
    parser.add_argument("--orientation", type=int, default=1, help="EXIF orientation of the PNGs (6: a quarter turn)")
    parser.add_argument("--threads", type=int, default=1, help="--preprocess-threads: decodes at once")
    parser.add_argument("--binary", type=Path, action="append", help="builds to compare (default: target/release)")
    args = parser.parse_args()
    body = bomb(args.side, args.rgba, args.orientation)
    decoded_mib = args.side * args.side * (4 if args.rgba else 3) / 2**20
    rows = [(binary, measure(binary, args, body)) for binary in args.binary or [ROOT / "target/release/lookalike"]]
    kind = "RGBA" if args.rgba else "RGB"
    print(f"{args.requests} abandoned searches of a {len(body) / 1024:.0f} kB {kind} PNG (EXIF orientation "
          f"{args.orientation}) decoding to {args.side}x{args.side} ({decoded_mib:.0f} MiB), --preprocess-threads "
          f"{args.threads}")
    print("| binary | idle VmHWM MiB | peak VmHWM MiB | growth MiB | growth in decodes | seconds to idle |")
    print("| --- | --- | --- | --- | --- | --- |")
    for binary, (before, peak, seconds) in rows:
        growth = peak - before
        print(f"| {binary} | {before:.0f} | {peak:.0f} | {growth:.0f} | {growth / decoded_mib:.1f} | {seconds:.0f} |")
    return 0


def measure(binary: Path, args: argparse.Namespace, body: bytes) -> tuple[float, float, float]:
    """(idle VmHWM, peak VmHWM, seconds) of one build under the abandoned searches."""
    data_dir = tempfile.mkdtemp(prefix="lookalike-decode-")
    cmd = [str(binary), "serve", "--port", str(args.port), "--data-dir", data_dir,
           "--preprocess-threads", str(args.threads), "--request-timeout-secs", "600"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        for _ in range(600):
            try:
                idle(args.port, server.pid, 0.5)
                break
            except OSError:
                time.sleep(0.1)
        before = vm(server.pid, "VmHWM")
        started = time.monotonic()
        for _ in range(args.requests):
            abandoned_search(args.port, body)
        idle(args.port, server.pid, 1.0)
        seconds = time.monotonic() - started
        peak = vm(server.pid, "VmHWM")
    finally:
        server.terminate()
        server.wait(timeout=60)
    return before, peak, seconds


if __name__ == "__main__":
    sys.exit(main())
