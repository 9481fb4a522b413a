"""Idle-connection flood against a served pool (issue 7, finding 7).

Serves examples/hello with the real CLI (default HTTP limits), opens N client connections that
never send a byte, and reports the pool's open descriptors, /health-check answers and latency
during and after the flood, and how many log lines the flood cost.

    .venv/bin/python bench/idle_connections.py --connections 19000
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POOL_NOFILE = 4096  # the pool's own descriptor limit, as a container might set it


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=19_000)
    parser.add_argument("--port", type=int, default=5931)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.connections + 100), hard))
    work = tempfile.mkdtemp(prefix="idle-bench-")
    log_path = os.path.join(work, "serve.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COG_POOL_")}
    env["PYTHONPATH"] = ROOT
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cogpool", "serve", os.path.join(ROOT, "examples", "hello"),
             "--port", str(args.port), "--state-dir", os.path.join(work, "state")],
            env=env, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(
                resource.RLIMIT_NOFILE, (POOL_NOFILE, POOL_NOFILE)
            ),
        )  # fmt: skip
    url = f"http://127.0.0.1:{args.port}/health-check"

    def fds() -> int:
        return len(os.listdir(f"/proc/{proc.pid}/fd"))

    def health() -> str:
        started = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                status = str(r.status)
        except Exception as e:  # the answer is the measurement
            status = type(e).__name__
        return f"{status} in {(time.monotonic() - started) * 1000:.1f} ms"

    try:
        deadline = time.monotonic() + 60
        while "pool_ready" not in open(log_path).read():
            if time.monotonic() > deadline or proc.poll() is not None:
                print(open(log_path).read())
                return 1
            time.sleep(0.2)
        print(f"before: pool fds {fds()}, /health-check {health()}")
        socks = []
        started = time.monotonic()
        failed = ""
        for _ in range(args.connections):
            s = socket.socket()
            s.settimeout(5)
            try:
                s.connect(("127.0.0.1", args.port))
            except OSError as e:  # the pool stopped accepting: that is the measurement too
                failed = f"; connect #{len(socks) + 1} failed: {e!r}"
                s.close()
                break
            socks.append(s)
        opened_s = time.monotonic() - started
        print(f"{len(socks)} idle connections opened in {opened_s:.1f} s{failed}")
        print(f"during: pool fds {fds()}, /health-check {health()}")
        poller = select.poll()
        for s in socks:
            poller.register(s, select.POLLIN | select.POLLHUP)
        started = time.monotonic()
        while time.monotonic() - started < 60 and len(poller.poll(0)) < len(socks):
            time.sleep(0.5)
        closed = len(poller.poll(0))
        print(
            f"after {time.monotonic() - started:.1f} s more: {closed} of {len(socks)} closed by "
            f"the pool; pool fds {fds()}, /health-check {health()}"
        )
        for s in socks:
            s.close()
    finally:
        proc.terminate()
        proc.wait(60)
    text = open(log_path).read()
    shutil.rmtree(work, ignore_errors=True)
    print(f"pool log: {len(text.splitlines())} lines in all")
    for event in ("http_connection_evicted", "http_connection_refused", "http_header_timeout",
                  "http_accept_failed", "Traceback"):  # fmt: skip
        lines = [line for line in text.splitlines() if event in line]
        count = sum(int(m.group(1)) for line in lines if (m := re.search(r"count=(\d+)", line)))
        print(f"  {event}: {len(lines)} lines standing for {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
