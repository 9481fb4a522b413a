"""A large ``data:`` input through the served pool, with /health-check polled meanwhile.

Serves examples/files (returns the upper-cased file as a ``data:`` URI) with the real CLI,
sends one prediction whose input is a base64 ``data:`` URI of ``--mb`` MiB, and polls
/health-check from another thread every 10 ms while it runs. Reports the end-to-end time and
the /health-check latency (p50, p99, max): the event loop's stalls (issue 7, finding 6).

    .venv/bin/python bench/large_data_uri.py --mb 70     # a 93 MB data: URI
"""

# ruff: noqa: ASYNC220, ASYNC230 -- a benchmark driver: the pool under test is another process

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import aiohttp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def run(mb: int, port: int) -> int:
    work = tempfile.mkdtemp(prefix="data-uri-bench-")
    log_path = os.path.join(work, "serve.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COG_POOL_")}
    env["PYTHONPATH"] = ROOT
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cogpool", "serve", os.path.join(ROOT, "examples", "files"),
             "--port", str(port), "--state-dir", os.path.join(work, "state")],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while "pool_ready" not in open(log_path).read():
            if time.monotonic() > deadline or proc.poll() is not None:
                print(open(log_path).read())
                return 1
            await asyncio.sleep(0.2)
        uri = "data:text/plain;base64," + base64.b64encode(b"a" * (mb << 20)).decode()
        body = ('{"input": {"file": "' + uri + '"}}').encode()
        latencies_ms: list[float] = []
        stop = threading.Event()

        def poll() -> None:  # its own thread: the client's loop must not skew the numbers
            while not stop.is_set():
                started = time.monotonic()
                with urllib.request.urlopen(base + "/health-check", timeout=30) as r:
                    r.read()
                latencies_ms.append((time.monotonic() - started) * 1000)
                time.sleep(0.01)

        poller = threading.Thread(target=poll)
        poller.start()
        timeout = aiohttp.ClientTimeout(total=600)
        started = time.monotonic()
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(
                    base + "/predictions",
                    data=body,
                    headers={"Content-Type": "application/json"},
                ) as r:
                    answer = await r.read()
                    status = r.status
        finally:
            elapsed_s = time.monotonic() - started
            stop.set()
            poller.join()
        latencies_ms.sort()
        n = len(latencies_ms)
        print(
            f"{len(uri) / 1e6:.0f} MB data: URI: HTTP {status} in {elapsed_s:.2f} s, "
            f"answer {len(answer) / 1e6:.0f} MB; /health-check n={n} "
            f"p50={latencies_ms[n // 2]:.1f} ms p99={latencies_ms[int(n * 0.99)]:.1f} ms "
            f"max={latencies_ms[-1]:.1f} ms"
        )
        return 0
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=70, help="decoded size in MiB (max ~75)")
    parser.add_argument("--port", type=int, default=5941)
    args = parser.parse_args()
    return asyncio.run(run(args.mb, args.port))


if __name__ == "__main__":
    sys.exit(main())
