"""``cog-pool status`` against a live pool: a real ``cog-pool serve`` with a token and Redis."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pool_helpers import MODELS, PROJECT, wait_until_sync
from test_cli import cli_env

from pool.metrics import Metrics
from pool.status import PoolStatus, render

TOKEN = "status-test-token"
REDIS_URL = "redis://127.0.0.1:6379/0"


def wait_for(check: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    return wait_until_sync(check, timeout_s=timeout_s, what=what)


def call(url: str, *, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("Authorization", f"Bearer {TOKEN}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class LivePool:
    def __init__(self, tmp_path: Path) -> None:
        self.name = f"test-status-{uuid.uuid4().hex[:8]}"
        env = cli_env()
        env.update(
            {
                "COG_POOL_HTTP_AUTH_TOKEN": TOKEN,
                "COG_POOL_QUEUES_REDIS_URL": REDIS_URL,
                "COG_POOL_QUEUES_REDIS_STREAM": self.name,
                "COG_POOL_QUEUES_REDIS_GROUP": self.name,
                "COG_POOL_QUEUES_REDIS_RESULTS_STREAM": self.name + ":results",
                "COG_POOL_QUEUES_REDIS_CANCEL_CHANNEL": self.name + ":cancel",
            }
        )
        self.log_path = tmp_path / "serve.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cogpool", "serve", str(MODELS / "worker"), "--runners", "2",
                 "--port", "0"],
                cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        m = wait_for(
            lambda: re.search(r"http_listening host=\S+ port=(\d+)", self.log_path.read_text())
            or self.proc.poll() is not None,
            "http_listening",
        )
        assert self.proc.poll() is None, self.log_path.read_text()
        self.url = f"http://127.0.0.1:{m.group(1)}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        client = redis.Redis.from_url(REDIS_URL)
        client.delete(self.name, self.name + ":results", self.name + ":dead")
        client.close()


@pytest.fixture
def live_pool(tmp_path: Path) -> Iterator[LivePool]:
    pool = LivePool(tmp_path)
    try:
        yield pool
    finally:
        pool.stop()


def status_cli(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = cli_env()
    if token is not None:
        env["COG_POOL_HTTP_AUTH_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "cogpool", "status", *args],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_status_shows_runners_and_consumers_of_a_live_pool(live_pool: LivePool) -> None:
    wait_for(lambda: call(live_pool.url + "/health/ready")[0] == 200, "pool ready")
    wait_for(
        lambda: call(live_pool.url + "/health-check")[1]["redis"]["state"] == "connected",
        "Redis consumer connected",
    )
    status, body = call(live_pool.url + "/predictions", body={"input": {"n": 3}})
    assert status == 200 and body["status"] == "succeeded"
    _, health = call(live_pool.url + "/health-check")
    # Steps: status without the token. Result: a clear error, exit 1.
    denied = status_cli("--url", live_pool.url)
    assert denied.returncode == 1 and "--token" in denied.stderr, denied.stderr
    # Steps: status with the token from the environment. Result: one row per runner with its
    # pid, state, capacity and RSS; the predictions served add up; the Redis consumer's row.
    done = status_cli("--url", live_pool.url, token=TOKEN)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"pool {live_pool.url}  status READY  busy 0/2")
    header = lines[2].split()
    assert header == ["RUNNER", "STATE", "GPU", "PID", "BUSY", "RESTARTS", "RSS", "SERVED"]
    rows = {line.split()[0]: line.split() for line in lines[3:5]}
    served = 0
    for runner in health["runners"]:
        row = rows[str(runner["index"])]
        assert row[1:6] == ["READY", "cpu", str(runner["pid"]), "0/1", "0"], row
        assert row[7] == "MiB" and int(row[6]) > 1
        served += int(row[8])
    assert served == 1
    consumer = next(line.split() for line in lines if line.startswith("redis "))
    assert consumer[1:3] == ["connected", live_pool.name], consumer
    # --token works as well as the environment; --json prints the health body itself.
    raw = status_cli("--url", live_pool.url, "--token", TOKEN, "--json")
    assert raw.returncode == 0, raw.stderr
    body = json.loads(raw.stdout)
    assert [r["pid"] for r in body["runners"]] == [r["pid"] for r in health["runners"]]


def test_status_watch_redraws_until_ctrl_c(live_pool: LivePool, tmp_path: Path) -> None:
    wait_for(lambda: call(live_pool.url + "/health/ready")[0] == 200, "pool ready")
    out_path = tmp_path / "watch.out"
    env = cli_env()
    env["COG_POOL_HTTP_AUTH_TOKEN"] = TOKEN
    with open(out_path, "w") as out:
        watch = subprocess.Popen(
            [sys.executable, "-m", "cogpool", "status", "--url", live_pool.url, "--watch",
             "--interval", "0.2"],
            cwd=PROJECT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(lambda: out_path.read_text().count(f"pool {live_pool.url}") >= 3, "3 redraws")
        watch.send_signal(signal.SIGINT)
        assert watch.wait(30) == 0
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(30)
    assert "Traceback" not in out_path.read_text()


def test_status_of_an_unreachable_pool_fails_clearly() -> None:
    done = status_cli("--url", "http://127.0.0.1:9")
    assert done.returncode == 1 and "cannot reach the pool at" in done.stderr


def test_render_without_metrics_shows_dashes() -> None:
    health = {
        "status": "STARTING",
        "concurrency": {"max": 1, "current": 0},
        "runners": [
            {"index": 0, "gpu": "3", "pid": None, "status": "STARTING", "busy": 0,
             "capacity": 1, "restarts": 2},
        ],
        "amqp": {"state": "reconnecting", "queue": "q", "in_flight": 0, "queue_depth": 7,
                 "completed": 0, "last_error": "ConnectionRefused"},
    }  # fmt: skip
    text = render(PoolStatus(health, None), "http://x")
    row = next(line.split() for line in text.splitlines() if line.startswith("0 "))
    assert row == ["0", "STARTING", "3", "-", "0/1", "2", "-", "-"]
    amqp = next(line.split() for line in text.splitlines() if line.startswith("amqp "))
    assert amqp == ["amqp", "reconnecting", "q", "0", "-", "7", "0", "ConnectionRefused"]
    # and the names status reads from /metrics are the ones the pool exposes
    metrics = Metrics(nvml=None)
    metrics.prediction_finished(
        status="succeeded", source="http", queue_wait_s=0, predict_time_s=0, runner_index=0
    )
    metrics.add_runner_source(lambda: [{"index": 0, "gpu": None, "pid": os.getpid()}])
    reading = PoolStatus(health, metrics.render())
    assert reading.served == {"0": 1.0} and reading.rss_bytes["0"] > 1_000_000


def test_render_shows_a_reload_and_draining_runners_not_as_consumers() -> None:
    health = {
        "status": "READY",
        "concurrency": {"max": 2, "current": 1},
        "runners": [
            {"index": 0, "gpu": None, "pid": 11, "status": "BUSY", "busy": 1, "capacity": 1,
             "restarts": 0, "draining": "reload"},
            {"index": 2, "gpu": None, "pid": 12, "status": "READY", "busy": 0, "capacity": 1,
             "restarts": 0, "draining": None},
        ],
        "reload": {"state": "failed", "error": "reload aborted after 0 of 1 runners: boom",
                   "replaced": 0, "total": 1, "count": 1},
    }  # fmt: skip
    lines = render(PoolStatus(health, None), "http://x").splitlines()
    assert lines[1] == "reload failed (0/1 replaced): reload aborted after 0 of 1 runners: boom"
    rows = {line.split()[0]: line.split() for line in lines if line[:2] in ("0 ", "2 ")}
    assert rows["0"][1] == "DRAINING" and rows["2"][1] == "READY"
    assert not any(line.startswith("reload ") for line in lines[2:])  # not a consumer row
