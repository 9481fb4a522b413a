"""Shared fixtures of the ingest tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

# The project is not installed into .venv (no `pip install -e .`): make it importable when
# pytest is run as `.venv/bin/pytest tests/ingest` from the repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of this test's own, restartable with its data (AOF, fsync always)."""
    from ingest_pool import free_port

    port = free_port()
    data = tmp_path / "redis"
    data.mkdir()
    cmd = [
        shutil.which("redis-server") or "redis-server",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        str(data),
        "--bind",
        "127.0.0.1",
    ]
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def stop() -> None:
        proc = procs[-1]
        proc.send_signal(signal.SIGTERM)  # redis flushes its AOF and exits
        proc.wait(20)

    start()
    yield f"redis://127.0.0.1:{port}/0", start, stop
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
