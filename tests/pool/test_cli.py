"""`cog-pool` as a real process: serve, SIGTERM drain, POST /shutdown, kill -9, config errors."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pool_helpers import MODELS, PROJECT, make_config, pid_alive, wait_until

from cogpool import cli

WORKER = str(MODELS / "worker")


def cli_env() -> dict[str, str]:
    # The suite's event loop switch (tests/conftest.py) reaches the pools; no other key does.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("COG_POOL_") or k == "COG_POOL_EVENT_LOOP"
    }
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(PROJECT) + (os.pathsep + old if old else "")
    return env


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cogpool", *args],
        cwd=PROJECT,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


class Served:
    """A ``cog-pool serve`` child process with its stderr in a file."""

    def __init__(
        self,
        tmp_path: Path,
        *args: str,
        cwd: Path = PROJECT,
        env: dict[str, str] | None = None,
    ) -> None:
        self.log_path = tmp_path / "serve.log"
        self.log = open(self.log_path, "w")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cogpool", "serve", *args, "--port", "0"],
            cwd=cwd,
            env={**cli_env(), **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.port: int | None = None

    def text(self) -> str:
        return self.log_path.read_text()

    def find_port(self) -> int | None:
        m = re.search(r"http_listening host=\S+ port=(\d+)", self.text())
        self.port = int(m.group(1)) if m else None
        return self.port

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for s in started:
        s.stop()


async def start_serving(
    served: list[Served],
    tmp_path: Path,
    *args: str,
    cwd: Path = PROJECT,
    env: dict[str, str] | None = None,
) -> Served:
    s = Served(tmp_path, *args, cwd=cwd, env=env)
    served.append(s)
    await wait_until(lambda: s.find_port() or s.proc.poll() is not None, what="http_listening")
    assert s.proc.poll() is None, s.text()
    return s


async def health_when_ready(session: aiohttp.ClientSession, s: Served) -> dict[str, Any]:
    async def ready() -> dict[str, Any] | None:
        async with session.get(s.url("/health-check")) as r:
            body: dict[str, Any] = await r.json()
        return body if all(x["status"] == "READY" for x in body["runners"]) else None

    body: dict[str, Any] = await wait_until(ready, timeout_s=60, what="every runner READY")
    return body


async def wait_exit(proc: subprocess.Popen[bytes], timeout_s: float = 60) -> int:
    await wait_until(lambda: proc.poll() is not None, timeout_s=timeout_s, what="serve exited")
    return proc.returncode


async def test_serve_predict_and_drain_on_sigterm(tmp_path: Path, served: list[Served]) -> None:
    s = await start_serving(
        served, tmp_path, WORKER, "--runners", "2", "--state-dir", str(tmp_path / "st")
    )
    async with aiohttp.ClientSession() as session:
        health = await health_when_ready(session, s)
        pids = [r["pid"] for r in health["runners"]]
        async with session.post(s.url("/predictions"), json={"input": {"n": 4}}) as r:
            body = await r.json()
            assert r.status == 200
    assert body["status"] == "succeeded" and json.loads(body["output"])["n"] == 4
    # Steps: SIGTERM the pool. Result: exit 0, no runner left.
    s.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(s.proc) == 0, s.text()
    await wait_until(lambda: not any(pid_alive(p) for p in pids), what="runners gone")
    log = s.text()
    assert "shutdown_step step=stop_file" in log and "serve_exit code=0" in log


async def test_post_shutdown_drains_and_exits(tmp_path: Path, served: list[Served]) -> None:
    config = tmp_path / "pool.yaml"
    config.write_text("http:\n  allow_shutdown: true\n")
    s = await start_serving(served, tmp_path, WORKER, "--config", str(config))
    async with aiohttp.ClientSession() as session:
        health = await health_when_ready(session, s)
        async with session.post(s.url("/shutdown")) as r:
            assert r.status == 200
    assert await wait_exit(s.proc) == 0, s.text()
    pid = health["runners"][0]["pid"]
    await wait_until(lambda: not pid_alive(pid), what="runner gone")


async def test_kill_9_of_the_pool_leaves_no_runner(tmp_path: Path, served: list[Served]) -> None:
    s = await start_serving(served, tmp_path, WORKER, "--runners", "2")
    async with aiohttp.ClientSession() as session:
        health = await health_when_ready(session, s)
    pids = [r["pid"] for r in health["runners"]]
    assert all(pid_alive(p) for p in pids)
    # Steps: kill -9 the pool. Result: its runners notice (PDEATHSIG / getppid) and exit.
    s.proc.kill()
    s.proc.wait(30)
    await wait_until(
        lambda: not any(pid_alive(p) for p in pids), timeout_s=30, what="orphaned runners exit"
    )


async def test_serve_without_model_dir_serves_examples_hello(
    tmp_path: Path, served: list[Served]
) -> None:
    # From another working directory: the default model resolves against the project root.
    s = await start_serving(served, tmp_path, cwd=tmp_path)
    async with aiohttp.ClientSession() as session:
        await health_when_ready(session, s)
        async with session.post(s.url("/predictions"), json={"input": {"text": "pool"}}) as r:
            body = await r.json()
    assert body["status"] == "succeeded" and body["output"] == "hello pool"
    s.proc.send_signal(signal.SIGINT)
    assert await wait_exit(s.proc) == 0, s.text()


async def test_serve_on_uvloop_predicts_over_a_real_socket_and_drains_on_sigterm(
    tmp_path: Path, served: list[Served]
) -> None:
    pytest.importorskip("uvloop")
    # Steps: serve examples/hello with event_loop uvloop (from its environment variable).
    s = await start_serving(
        served, tmp_path, str(PROJECT / "examples" / "hello"), env={"COG_POOL_EVENT_LOOP": "uvloop"}
    )
    # Result: the pool says which loop it runs on, before it listens.
    log = s.text()
    assert "serve_starting event_loop=uvloop" in log
    assert log.index("serve_starting") < log.index("http_listening")
    async with aiohttp.ClientSession() as session:
        health = await health_when_ready(session, s)
        assert health["status"] == "READY"
        # Steps: predictions one after another. Result: each succeeds, woken by the runner's
        # signals: through the 1 s safety rescan alone, 20 would take ~10 s.
        started = time.monotonic()
        for i in range(20):
            body = {"input": {"text": f"uvloop {i}"}}
            async with session.post(s.url("/predictions"), json=body) as r:
                assert r.status == 200
                answer = await r.json()
            assert answer["status"] == "succeeded" and answer["output"] == f"hello uvloop {i}"
        assert time.monotonic() - started < 5.0
    pids = [r["pid"] for r in health["runners"]]
    # Steps: SIGTERM. Result: a clean drain, exit 0, no runner left.
    s.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(s.proc) == 0, s.text()
    await wait_until(lambda: not any(pid_alive(p) for p in pids), what="runners gone")
    log = s.text()
    assert "serve_stopping reason=signal" in log and "serve_exit code=0" in log


def test_uvloop_asked_for_but_missing_exits_2_before_serving(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert cli.main(["serve", WORKER, "--event-loop", "uvloop"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "cog-pool: configuration error: event_loop: uvloop was asked for" in err


async def test_serve_removes_its_signal_handlers_before_it_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    config = make_config(tmp_path, http__port=0)
    task = asyncio.create_task(cli.serve(config))

    def listening() -> bool:
        return task.done() or any(r.message.startswith("http_listening") for r in caplog.records)

    await wait_until(listening, timeout_s=60, what="http_listening")
    assert not task.done(), task.result()  # a SIGTERM with no handler would end the suite
    # Steps: SIGTERM this process while serve() runs. Result: serve() drains and returns 0...
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(task, 120) == 0
    # ...and has given SIGTERM and SIGINT back their default handlers (a closed uvloop's
    # handler left installed would swallow them).
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_config_error_names_the_key_and_exits_2() -> None:
    done = run_cli("serve", WORKER, "--port", "70000")
    assert done.returncode == 2
    assert "configuration error: http.port: must be between 0 and 65535" in done.stderr
    env = {**cli_env(), "COG_POOL_RUNNERS_PER_GPU": "zero"}
    done = run_cli("serve", WORKER, env=env)
    assert done.returncode == 2
    assert "runners.per_gpu" in done.stderr and "COG_POOL_RUNNERS_PER_GPU" in done.stderr


def test_config_command_shows_precedence(tmp_path: Path) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text("http:\n  port: 6001\nrunners:\n  count: 2\n")
    env = {**cli_env(), "COG_POOL_HTTP_PORT": "6002", "COG_POOL_RUNNERS_COUNT": "3"}
    done = run_cli("config", WORKER, "--config", str(path), "--runners", "4", env=env)
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    assert config["http"]["port"] == 6002  # env over YAML
    assert config["runners"]["count"] == 4  # flag over env
    assert config["model"]["path"] == WORKER


async def test_serve_scales_and_reloads_when_asked_by_the_command_line(
    tmp_path: Path, served: list[Served]
) -> None:
    # A pool on its default state dir (/dev/shm/cog-pool-<pid>-*), found by --pid.
    model = tmp_path / "model"
    model.mkdir()
    for name in ("cog.yaml", "predict.py"):
        (model / name).write_text((MODELS / "versioned" / name).read_text())
    s = await start_serving(served, tmp_path, str(model), "--runners", "1")
    pid = str(s.proc.pid)
    async with aiohttp.ClientSession() as session:
        first = await health_when_ready(session, s)
        assert len(first["runners"]) == 1
        # Steps: `cog-pool scale +1`. Result: SIGTTIN reaches the serving process; 2 runners.
        done = run_cli("scale", "+1", "--pid", pid)
        assert done.returncode == 0, done.stderr

        async def health() -> dict[str, Any]:
            async with session.get(s.url("/health-check")) as r:
                body: dict[str, Any] = await r.json()
                return body

        async def runners(n: int) -> bool:
            return len((await health())["runners"]) == n

        await wait_until(lambda: runners(2), timeout_s=60, what=f"2 runners: {s.text()}")
        body = await health_when_ready(session, s)
        # Steps: new code, then `cog-pool reload`. Result: both runners replaced; new answers.
        text = (model / "predict.py").read_text().replace('VERSION = "v1"', 'VERSION = "v2"')
        (model / "predict.py").write_text(text)
        done = run_cli("reload", "--pid", pid)
        assert done.returncode == 0, done.stderr

        async def reloaded() -> bool:
            return bool((await health())["reload"]["state"] == "succeeded")

        await wait_until(reloaded, timeout_s=120, what="the reload")
        body = await health()
        assert len(body["runners"]) == 2 and body["reload"]["replaced"] == 2
        async with session.post(s.url("/predictions"), json={"input": {}}) as r:
            assert json.loads((await r.json())["output"])["version"] == "v2"
    s.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(s.proc) == 0, s.text()
    assert "reload_succeeded replaced=2" in s.text()
