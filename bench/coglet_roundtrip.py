"""Round trip of the pool <-> runner protocol alone: one coglet, a null predictor, sequential.

This process plays the pool: it installs its signal handlers, spawns ``python -m coglet``
with a working directory on /dev/shm, and for each prediction

    writes request-<id>.json atomically -> SIGHUP the runner -> waits for the runner's
    signal -> reads (and deletes) response-<id>-0.json, -1.json ... until a terminal status

A round trip is the time from just before the request file is written to just after the
terminal response is read. Usage (from the repository root)::

    .venv/bin/python bench/coglet_roundtrip.py [--iterations 2000] [--warmup 200]
        [--model bench/models/null] [--ref predict.py:Predictor] [--python PYTHON]

Prints p50/p90/p99/max round trip in microseconds and sequential predictions per second.

Recorded (2000 iterations after 200 warm-up, Python 3.11, working dir on /dev/shm):

    this 2-core dev VM, other test suites running   sync null  p50 265-286 us  p99 ~470-520 us
                                                     async null p50 ~285 us     (~3300 pred/s)
    16-core H100 host, idle, Python 3.12 (5000 it.)  sync null  p50 177-207 us  p99 ~570-670 us
                                                     async null p50 192-200 us  (~4800 pred/s)

Async: ``--model tests/models/runner --ref async_models.py:AsyncNull``.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from coglet import protocol  # noqa: E402


class Parent:
    """The pool's side, reduced to what a round trip needs."""

    def __init__(self, model_dir: str, ref: str, python: str) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = tempfile.mkdtemp(prefix="coglet-bench-", dir=base)
        protocol.write_json_atomic(
            os.path.join(self.dir, protocol.CONFIG_FILE),
            {"predictor_ref": ref, "max_concurrency": 1, "runner_index": 0},
        )
        self._r, w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(w, False)
        for sig in (protocol.SIG_READY, protocol.SIG_BUSY, protocol.SIG_OUTPUT):
            signal.signal(sig, lambda *_: None)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        env = dict(os.environ, PYTHONPATH=ROOT)
        # BENCH_RUNNER_CMD replaces "python -m coglet" (e.g. to run the runner under a profiler).
        command = os.environ.get("BENCH_RUNNER_CMD", "").split() or [python, "-m", "coglet"]
        self.proc = subprocess.Popen([*command, "--working-dir", self.dir], cwd=model_dir, env=env)

    def wait_signal(self, timeout_s: float) -> None:
        select.select([self._r], [], [], timeout_s)
        try:
            while os.read(self._r, 512):
                pass
        except BlockingIOError:
            pass

    def wait_setup(self, timeout_s: float = 60) -> None:
        path = os.path.join(self.dir, protocol.SETUP_RESULT_FILE)
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"runner did not finish setup (exit {self.proc.returncode})")
            self.wait_signal(0.1)
        result = protocol.read_json(path)
        if not result or result["status"] != protocol.STATUS_SUCCEEDED:
            raise SystemExit(f"setup failed: {result}")

    def predict(self, prediction_id: str, body: Dict[str, Any]) -> Dict[str, Any]:
        """One round trip; returns the terminal delta."""
        protocol.write_json_atomic(
            os.path.join(self.dir, protocol.request_name(prediction_id)), body
        )
        os.kill(self.proc.pid, protocol.SIG_RESCAN)
        epoch = 0
        deadline = time.monotonic() + 30
        while True:
            path = os.path.join(self.dir, protocol.response_name(prediction_id, epoch))
            delta = protocol.read_json(path)
            if delta is None:
                if time.monotonic() > deadline:
                    raise SystemExit(f"no response for {prediction_id} after 30 s")
                self.wait_signal(protocol.SAFETY_RESCAN_S)
                continue
            os.unlink(path)
            epoch += 1
            if delta["status"] in protocol.TERMINAL_STATUSES:
                return delta

    def close(self) -> None:
        protocol.write_atomic(os.path.join(self.dir, protocol.STOP_FILE), b"")
        os.kill(self.proc.pid, protocol.SIG_RESCAN)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)


def percentile(sorted_values: List[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def run(args: argparse.Namespace) -> None:
    parent = Parent(args.model, args.ref, args.python)
    try:
        parent.wait_setup()
        body: Dict[str, Any] = {"input": {}, "stream": False}
        for i in range(args.warmup):
            parent.predict(f"warm-{i}", dict(body, id=f"warm-{i}"))
        times: List[float] = []
        started = time.perf_counter()
        for i in range(args.iterations):
            prediction_id = f"bench-{i}"
            t0 = time.perf_counter()
            delta = parent.predict(prediction_id, dict(body, id=prediction_id))
            times.append(time.perf_counter() - t0)
            if delta["status"] != protocol.STATUS_SUCCEEDED:
                raise SystemExit(f"prediction failed: {delta}")
        elapsed = time.perf_counter() - started
    finally:
        parent.close()
    times.sort()
    us = [t * 1e6 for t in times]
    print(f"coglet round trip ({args.iterations} sequential predictions, {args.model}):")
    print(
        f"  p50 {percentile(us, 0.50):.0f} us   p90 {percentile(us, 0.90):.0f} us   "
        f"p99 {percentile(us, 0.99):.0f} us   max {us[-1]:.0f} us   "
        f"mean {statistics.fmean(us):.0f} us"
    )
    print(f"  {args.iterations / elapsed:.0f} predictions/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--model", default=os.path.join(ROOT, "bench", "models", "null"))
    parser.add_argument("--ref", default="predict.py:Predictor")
    parser.add_argument("--python", default=sys.executable)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
