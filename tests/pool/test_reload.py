"""Runners at run time (issue 10): reload without downtime, scaling, probes during both.

A real PoolManager serves real coglet runners behind a real HTTP server; clients send real
requests throughout. Reloads are asked through the real ``cog-pool reload`` command (request
file + SIGHUP to this process, which holds the pool), scaling through real SIGTTIN/SIGTTOU
and ``cog-pool scale``. The ``versioned`` fixture model reports its code's version, its pid and
its CUDA_VISIBLE_DEVICES; the tests copy it and edit it as an operator deploying new code would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pool_helpers import MODELS, PROJECT, make_config, pid_alive, wait_until

from pool.api import create_app
from pool.config import PoolConfig
from pool.manager import PoolManager
from pool.metrics import Metrics
from pool.server import start_http

DEADLINE_S = 120.0
READY_RE = re.compile(r"^runner_ready runner=(\d+) pid=(\d+) ")


def model_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(MODELS / "versioned", dest)
    return dest


def edit_model(model: Path, *, version: str, setup_fails: bool = False) -> None:
    """Deploy new code into the model dir, as an operator would before a reload."""
    path = model / "predict.py"
    text = path.read_text()
    text = re.sub(r'^VERSION = ".*"$', f'VERSION = "{version}"', text, flags=re.M)
    text = re.sub(r"^SETUP_FAILS = .*$", f"SETUP_FAILS = {setup_fails}", text, flags=re.M)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Load:
    """HTTP clients sending predictions until told to stop (each at most ``max_each``)."""

    base: str
    clients: int = 3
    max_each: int = 300
    sleep_s: float = 0.05
    results: list[tuple[int, Any]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, session: aiohttp.ClientSession) -> None:
        for _ in range(self.clients):
            self.tasks.append(asyncio.create_task(self._client(session)))

    async def _client(self, session: aiohttp.ClientSession) -> None:
        for _ in range(self.max_each):
            if self.stop.is_set():
                return
            body = {"input": {"sleep_s": self.sleep_s}}
            try:
                async with session.post(self.base + "/predictions", json=body) as r:
                    self.results.append((r.status, await r.json()))
            except aiohttp.ClientError as e:  # counted as a failure, never hidden
                self.results.append((0, repr(e)))

    async def finish(self) -> None:
        self.stop.set()
        async with asyncio.timeout(DEADLINE_S):
            await asyncio.gather(*self.tasks)

    def failures(self) -> list[tuple[int, Any]]:
        return [
            (s, b)
            for s, b in self.results
            if s != 200 or not isinstance(b, dict) or b.get("status") != "succeeded"
        ]

    def outputs(self) -> list[dict[str, Any]]:
        return [json.loads(b["output"]) for s, b in self.results if s == 200]


@contextlib.asynccontextmanager
async def served(
    config: PoolConfig,
    metrics: Metrics | None = None,
    config_loader: Callable[[], PoolConfig] | None = None,
) -> AsyncIterator[tuple[PoolManager, str]]:
    """A started pool behind a real HTTP server on a free port; shut down and checked after."""
    manager = PoolManager(config, metrics=metrics, config_loader=config_loader)
    app = create_app(config, manager, manage_lifecycle=False)
    runner = web.AppRunner(app)
    await runner.setup()
    await start_http(runner, config.http, host="127.0.0.1", port=0)
    await manager.start()
    pids: set[int] = set()
    try:
        await wait_until(lambda: all_serving(manager), timeout_s=DEADLINE_S, what="pool READY")
        yield manager, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        pids.update(r["pid"] for r in manager.health()["runners"] if r["pid"])
        await manager.shutdown(10.0)
        await runner.cleanup()
        assert not [p for p in pids if pid_alive(p)], "runner processes left after shutdown"


def serving(manager: PoolManager) -> list[dict[str, Any]]:
    """Runners that can take work now (READY or BUSY, not draining)."""
    return [
        r
        for r in manager.health()["runners"]
        if r["status"] in ("READY", "BUSY") and r["draining"] is None
    ]


def all_serving(manager: PoolManager) -> bool:
    runners = manager.health()["runners"]
    return bool(runners) and len(serving(manager)) == len(runners)


def ready_pids(caplog: pytest.LogCaptureFixture) -> set[int]:
    """Pids of every runner that logged runner_ready (setup succeeded)."""
    found = set()
    for record in caplog.records:
        m = READY_RE.match(record.getMessage())
        if m:
            found.add(int(m.group(2)))
    return found


async def cog_pool(*args: str) -> tuple[int, str]:
    """Run the real ``cog-pool`` command line (bounded)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cogpool",
        *args,
        cwd=PROJECT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


class Watch:
    """Samples the pool every few ms while running: the fewest serving runners seen, and
    every /health/ready answer."""

    def __init__(self, manager: PoolManager, session: aiohttp.ClientSession, base: str) -> None:
        self.manager = manager
        self.session = session
        self.base = base
        self.min_serving: int | None = None
        self.ready_answers: list[int] = []
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            n = len(serving(self.manager))
            self.min_serving = n if self.min_serving is None else min(self.min_serving, n)
            async with self.session.get(self.base + "/health/ready") as r:
                self.ready_answers.append(r.status)
            with contextlib.suppress(TimeoutError):  # the sampling period, or the stop
                await asyncio.wait_for(self._stop.wait(), 0.01)

    async def finish(self) -> None:
        self._stop.set()
        async with asyncio.timeout(DEADLINE_S):
            await self._task


def reload_state(manager: PoolManager) -> str:
    return str(manager.health()["reload"]["state"])


@pytest.mark.parametrize("count", [1, 2])
async def test_reload_under_load_replaces_every_runner_and_fails_no_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, count: int
) -> None:
    caplog.set_level(logging.INFO, logger="pool")
    model = model_copy(tmp_path)
    config = make_config(tmp_path, runners__count=count, **{"model.path": str(model)})
    async with served(config) as (manager, base), aiohttp.ClientSession() as session:
        old_pids = {r["pid"] for r in manager.health()["runners"]}
        load = Load(base)
        load.start(session)
        await wait_until(lambda: len(load.results) >= 10, what="load running")
        watch = Watch(manager, session, base)
        # Steps: new code lands in the model dir; `cog-pool reload` asks for a reload while
        # the clients keep sending.
        edit_model(model, version="v2")
        code, out = await cog_pool("reload", "--state-dir", config.state_dir or "")
        assert code == 0, out
        await wait_until(
            lambda: reload_state(manager) == "succeeded", timeout_s=DEADLINE_S, what="reload"
        )
        done_at = len(load.results)
        await wait_until(lambda: len(load.results) >= done_at + 20, what="load after reload")
        await load.finish()
        await watch.finish()
        # Result: no request failed; every answer came from a runner that had reached READY;
        # capacity never dropped by more than one runner; /health/ready stayed 200 (with
        # one runner too: the probe during a reload).
        assert load.failures() == [], load.failures()[:3]
        outputs = load.outputs()
        assert {o["pid"] for o in outputs} <= ready_pids(caplog)
        # (The bound is one runner less; a fresh runner is READY before an old one drains,
        # so in fact none is lost.)
        assert watch.min_serving == count, watch.min_serving
        assert set(watch.ready_answers) == {200}, watch.ready_answers
        # Result: the answers after the reload come from the new code, on new processes.
        # (Each client had at most one request in flight when the reload ended: skip those.)
        after = outputs[done_at + load.clients :]
        assert after and {o["version"] for o in after} == {"v2"}
        health = manager.health()
        assert health["reload"]["state"] == "succeeded" and health["reload"]["replaced"] == count
        runners = health["runners"]
        assert len(runners) == count and not old_pids & {r["pid"] for r in runners}
        assert not [p for p in old_pids if pid_alive(p)], "old runners still running"
        assert {o["version"] for o in outputs[:10]} == {"v1"}


async def test_a_reload_whose_new_runner_fails_setup_is_aborted_and_old_runners_serve(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pool")
    model = model_copy(tmp_path)
    config = make_config(tmp_path, runners__count=2, **{"model.path": str(model)})
    metrics = Metrics()
    async with served(config, metrics) as (manager, base), aiohttp.ClientSession() as session:
        old_pids = {r["pid"] for r in manager.health()["runners"]}
        load = Load(base, clients=2)
        load.start(session)
        # Steps: a broken model (setup raises) is deployed; a reload is asked.
        edit_model(model, version="broken", setup_fails=True)
        code, out = await cog_pool(
            "reload", "--state-dir", config.state_dir or "", "--wait", base, "--wait-s", "60"
        )
        # Result (of the command, which follows /health-check): exit 6 with the setup error.
        assert code == 6 and "reload aborted after 0 of 2 runners" in out, out
        assert "broken model broken" in out, out
        assert reload_state(manager) == "failed"
        done_at = len(load.results)
        await wait_until(lambda: len(load.results) >= done_at + 10, what="load after abort")
        await load.finish()
        # Result: the reload is aborted with the setup error, logged and in /health-check;
        # the old runners (the old code) keep serving; no request failed.
        health = manager.health()
        assert "broken model broken" in health["reload"]["error"], health["reload"]
        assert health["reload"]["replaced"] == 0
        assert {r["pid"] for r in health["runners"]} == old_pids
        assert health["status"] == "READY" and health["degraded"] is False
        assert load.failures() == [], load.failures()[:3]
        assert {o["version"] for o in load.outputs()} == {"v1"}
        assert any(r.getMessage().startswith("reload_failed ") for r in caplog.records)
        # Steps: the model is fixed; a second reload is asked. Result: it succeeds.
        edit_model(model, version="v3")
        code, out = await cog_pool("reload", "--state-dir", config.state_dir or "", "--wait", base)
        assert code == 0 and "reload succeeded" in out, out
        assert reload_state(manager) == "succeeded"
        assert manager.health()["reload"]["count"] == 2
        text = metrics.render()
        assert 'cog_pool_reloads_total{result="failed"} 1.0' in text, text
        assert 'cog_pool_reloads_total{result="succeeded"} 1.0' in text
        async with session.post(base + "/predictions", json={"input": {}}) as r:
            assert json.loads((await r.json())["output"])["version"] == "v3"


def runner_cuda(pid: int) -> str:
    """A runner process's CUDA_VISIBLE_DEVICES, read from the OS."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return env[b"CUDA_VISIBLE_DEVICES"].decode()


def gpu_counts(manager: PoolManager) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in serving(manager):
        gpu = runner_cuda(r["pid"])
        counts[gpu] = counts.get(gpu, 0) + 1
    return counts


async def test_scaling_up_and_down_under_load_follows_placement_and_fails_no_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pool")
    config = make_config(
        tmp_path,
        runners__gpus=["0", "1"],
        runners__max_runners=4,
        **{"model.path": str(MODELS / "versioned")},
    )
    me = os.getpid()
    async with served(config) as (manager, base), aiohttp.ClientSession() as session:
        load = Load(base)
        load.start(session)
        watch = Watch(manager, session, base)

        async def count_becomes(n: int) -> None:
            await wait_until(
                lambda: len(manager.health()["runners"]) == n and len(serving(manager)) == n,
                timeout_s=DEADLINE_S,
                what=f"{n} runners serving",
            )

        # Steps: SIGTTIN twice (one at a time: signals coalesce). Result: one more runner on
        # each GPU in turn, the least loaded first (a tie goes to the first listed).
        os.kill(me, signal.SIGTTIN)
        await count_becomes(3)
        assert gpu_counts(manager) == {"0": 2, "1": 1}
        code, out = await cog_pool("scale", "+1", "--state-dir", config.state_dir or "")
        assert code == 0, out
        await count_becomes(4)
        assert gpu_counts(manager) == {"0": 2, "1": 2}
        # Steps: one more. Result: refused at runners.max_runners, logged.
        os.kill(me, signal.SIGTTIN)
        await wait_until(
            lambda: any(
                r.getMessage().startswith("scale_refused direction=up") for r in caplog.records
            ),
            what="scale_refused",
        )
        assert len(manager.health()["runners"]) == 4
        # Steps: SIGTTOU / scale -1 down to one runner, then once more.
        for n in (3, 2, 1):
            if n == 2:
                code, out = await cog_pool("scale", "-1", "--state-dir", config.state_dir or "")
                assert code == 0, out
            else:
                os.kill(me, signal.SIGTTOU)
            await count_becomes(n)
        os.kill(me, signal.SIGTTOU)
        await wait_until(
            lambda: any(
                r.getMessage().startswith("scale_refused direction=down") for r in caplog.records
            ),
            what="scale_refused down",
        )
        done_at = len(load.results)
        await wait_until(lambda: len(load.results) >= done_at + 10, what="load on one runner")
        await load.finish()
        await watch.finish()
        # Result: no request failed while runners came and went (removal drains first); the
        # pool never dropped below one serving runner and stayed ready; health shows 1.
        assert load.failures() == [], load.failures()[:3]
        assert watch.min_serving is not None and watch.min_serving >= 1
        assert set(watch.ready_answers) == {200}
        health = manager.health()
        assert len(health["runners"]) == 1 and health["reload"]["runners"] == 1


async def test_cog_pool_reload_finds_a_pool_by_pid_and_refuses_a_missing_one(
    tmp_path: Path,
) -> None:
    model = model_copy(tmp_path)
    config = make_config(tmp_path, **{"model.path": str(model)})
    config = type(config)(**{**config.__dict__, "state_dir": None})  # the default state dir
    async with served(config) as (manager, base), aiohttp.ClientSession() as session:
        assert manager.state_dir.startswith(("/dev/shm/", "/tmp/"))
        edit_model(model, version="v2")
        code, out = await cog_pool("reload", "--pid", str(os.getpid()))
        assert code == 0, out
        await wait_until(
            lambda: reload_state(manager) == "succeeded", timeout_s=DEADLINE_S, what="reload"
        )
        async with session.post(base + "/predictions", json={"input": {}}) as r:
            assert json.loads((await r.json())["output"])["version"] == "v2"
    # A state dir no live pool holds, and a pid with no pool: exit 5, saying what was looked at.
    code, out = await cog_pool("reload", "--state-dir", str(tmp_path))
    assert code == 5 and "no live pool holds state dir" in out, out
    code, out = await cog_pool("scale", "+1", "--pid", "999999999")
    assert code == 5 and "no state dir of pool pid 999999999" in out, out
    # Neither given, or a change other than one runner: usage errors (exit 2).
    code, out = await cog_pool("reload")
    assert code == 2 and "give --pid PID or --state-dir DIR" in out, out
    code, out = await cog_pool("scale", "+2", "--pid", "1")
    assert code == 2 and "invalid choice: '+2'" in out, out


async def test_a_reload_keeps_each_runner_on_its_gpu_and_drops_the_old_series(
    tmp_path: Path,
) -> None:
    model = model_copy(tmp_path)
    config = make_config(tmp_path, runners__gpus=["0", "1"], **{"model.path": str(model)})
    metrics = Metrics()
    async with served(config, metrics) as (manager, base), aiohttp.ClientSession() as session:
        for _ in range(4):
            async with session.post(base + "/predictions", json={"input": {}}) as r:
                assert r.status == 200
        assert 'cog_pool_runner_predictions_total{runner="0"}' in metrics.render()
        old_pids = {r["pid"] for r in manager.health()["runners"]}
        assert gpu_counts(manager) == {"0": 1, "1": 1}
        # Steps: a reload. Result: two fresh processes, one per GPU, as before.
        edit_model(model, version="v2")
        code, out = await cog_pool("reload", "--state-dir", config.state_dir or "")
        assert code == 0, out
        await wait_until(
            lambda: reload_state(manager) == "succeeded", timeout_s=DEADLINE_S, what="reload"
        )
        assert not old_pids & {r["pid"] for r in manager.health()["runners"]}
        assert gpu_counts(manager) == {"0": 1, "1": 1}
        # Result: the removed runners' series are gone (runner indices are never reused).
        text = metrics.render()
        assert 'runner="0"' not in text and 'runner="1"' not in text


async def test_a_reload_held_in_setup_keeps_serving_and_a_shutdown_stops_every_runner(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "setup-gate"
    gate.touch()
    config = make_config(tmp_path, "gated", runners__env={"SETUP_GATE_FILE": str(gate)})
    async with served(config) as (manager, base), aiohttp.ClientSession() as session:
        old = manager.health()["runners"][0]
        # Steps: fresh runners' setup is held (the gate is gone); a reload is asked.
        gate.unlink()
        manager.request_reload()
        await wait_until(lambda: len(manager.health()["runners"]) == 2, what="a fresh runner")
        # Result: the reload waits for the fresh runner; the old one keeps serving, ready.
        health = manager.health()
        assert health["reload"]["state"] == "running"
        assert [r["status"] for r in health["runners"]] == ["READY", "STARTING"]
        async with session.post(base + "/predictions", json={"input": {"text": "x"}}) as r:
            assert (await r.json())["output"] == "hello x"
        async with session.get(base + "/health/ready") as r:
            assert r.status == 200
        assert manager.health()["runners"][0]["pid"] == old["pid"]
    # Result (served's exit): the shutdown stopped both, the one still in setup too.


async def test_a_reload_whose_fresh_runner_outlasts_setup_timeout_is_aborted(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "setup-gate"
    gate.touch()
    config = make_config(
        tmp_path,
        "gated",
        runners__env={"SETUP_GATE_FILE": str(gate)},
        runners__setup_timeout_s=1.0,
    )
    async with served(config) as (manager, _):
        old_pid = manager.health()["runners"][0]["pid"]
        gate.unlink()
        manager.request_reload()
        await wait_until(
            lambda: reload_state(manager) == "failed", timeout_s=DEADLINE_S, what="reload failed"
        )
        health = manager.health()
        assert "setup timed out after 1.0s" in health["reload"]["error"], health["reload"]
        assert [r["pid"] for r in health["runners"]] == [old_pid]
        assert health["status"] == "READY" and health["degraded"] is False


async def test_scaling_down_removes_a_runner_still_in_setup_first(tmp_path: Path) -> None:
    gate = tmp_path / "setup-gate"
    gate.touch()
    config = make_config(tmp_path, "gated", runners__env={"SETUP_GATE_FILE": str(gate)})
    async with served(config) as (manager, base), aiohttp.ClientSession() as session:
        old_pid = manager.health()["runners"][0]["pid"]
        # Steps: a runner is added while setups are held; then one runner less is asked.
        gate.unlink()
        manager.request_scale(1)
        await wait_until(lambda: len(manager.health()["runners"]) == 2, what="a second runner")
        starting_pid = manager.health()["runners"][1]["pid"]
        manager.request_scale(-1)
        # Result: the one still in setup goes (SIGTERM: it may not handle SIGHUP yet); the
        # serving one stays and serves.
        await wait_until(lambda: len(manager.health()["runners"]) == 1, what="back to one")
        assert manager.health()["runners"][0]["pid"] == old_pid
        await wait_until(lambda: not pid_alive(starting_pid), what="the starting runner gone")
        async with session.post(base + "/predictions", json={"input": {"text": "y"}}) as r:
            assert (await r.json())["output"] == "hello y"


async def test_a_reload_reads_cog_yaml_again_and_a_bad_one_aborts_it(tmp_path: Path) -> None:
    model = model_copy(tmp_path)
    (model / "other.py").write_text(
        (model / "predict.py").read_text().replace('VERSION = "v1"', 'VERSION = "other"')
    )

    def load() -> PoolConfig:
        return make_config(tmp_path, runners__count=2, **{"model.path": str(model)})

    async with (
        served(load(), config_loader=load) as (manager, base),
        aiohttp.ClientSession() as session,
    ):
        old_pids = {r["pid"] for r in manager.health()["runners"]}
        # Steps: cog.yaml names a predictor that does not parse; a reload is asked.
        (model / "cog.yaml").write_text('predict: "nonsense"\n')
        manager.request_reload()
        await wait_until(lambda: reload_state(manager) == "failed", what="reload failed")
        # Result: aborted before any runner was touched, with the configuration error.
        error = manager.health()["reload"]["error"]
        assert error.startswith("reload aborted after 0 of 2 runners: configuration: "), error
        assert "cog.yaml" in error, error
        assert {r["pid"] for r in manager.health()["runners"]} == old_pids
        # Steps: cog.yaml names another predictor file; a reload. Result: it answers.
        (model / "cog.yaml").write_text('predict: "other.py:Predictor"\n')
        manager.request_reload()
        await wait_until(lambda: reload_state(manager) == "succeeded", what="reload")
        async with session.post(base + "/predictions", json={"input": {}}) as r:
            assert json.loads((await r.json())["output"])["version"] == "other"
