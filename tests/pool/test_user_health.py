"""User healthcheck() in the pool, through a real socket with real runners (issue 9).

Cog answers ``/health-check`` ``status: "UNHEALTHY"`` with ``user_healthcheck_error`` while the
check fails (checked against Cog 0.23.1: the field is absent while healthy). Beyond Cog: a
runner whose check fails takes no new work while its peers serve; the pool is UNHEALTHY only
when no runner passes; a runner failing ``runners.healthcheck_max_failures`` checks in a row
is recycled. The model (tests/models/pool/user_health) reads its mode from
``$HEALTH_DIR/<runner pid>``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from pool_helpers import FAST, MODELS, wait_until

from pool.api import create_app
from pool.config import load_config
from pool.manager import PoolManager
from pool.metrics import Metrics
from pool.server import start_http

INTERVAL_S = 0.1


class Pool:
    def __init__(self, port: int, session: aiohttp.ClientSession, health_dir: Path) -> None:
        self.port = port
        self.session = session
        self.health_dir = health_dir

    async def get(self, path: str) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.port}{path}"
        async with self.session.get(url) as resp:
            return resp.status, json.loads(await resp.text())

    async def predict(self) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.port}/predictions"
        async with self.session.post(url, json={"input": {}}) as resp:
            return resp.status, await resp.json()

    async def health(self) -> dict[str, Any]:
        status, body = await self.get("/health-check")
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    def set_mode(self, pid: int, mode: str) -> None:
        (self.health_dir / str(pid)).write_text(mode)


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[Pool, PoolManager]]:
    health_dir = tmp_path / "health"
    health_dir.mkdir()
    values = {
        "model.path": str(MODELS / "user_health"),
        "state_dir": str(tmp_path / "state"),
        **FAST,
        "runners.env": {"HEALTH_DIR": str(health_dir)},
        "runners.healthcheck_interval_s": INTERVAL_S,
        **{k.replace("__", "."): v for k, v in overrides.items()},
    }
    config = load_config(None, env={}, overrides=values)
    metrics = Metrics()
    manager = PoolManager(config, metrics=metrics)
    app_runner = web.AppRunner(create_app(config, manager, metrics=metrics))
    await app_runner.setup()
    try:
        await start_http(app_runner, config.http, host="127.0.0.1", port=0)
        async with aiohttp.ClientSession() as session:
            pool = Pool(app_runner.addresses[0][1], session, health_dir)
            await wait_until(
                lambda: all(r["status"] == "READY" for r in manager.runners),
                timeout_s=60,
                what="every runner READY",
            )
            yield pool, manager
    finally:
        await app_runner.cleanup()


def pids(manager: PoolManager) -> list[int]:
    return [r["pid"] for r in manager.runners]


async def test_a_failing_check_makes_the_pool_unhealthy_in_cogs_words_then_recovers(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path, runners__healthcheck_max_failures=1_000_000) as (pool, manager):
        body = await pool.health()
        assert body["status"] == "READY" and "user_healthcheck_error" not in body, body
        [pid] = pids(manager)
        pool.set_mode(pid, "false")
        await wait_until(
            lambda: manager.user_health_error is not None, what="the failing check seen"
        )
        body = await pool.health()
        assert body["status"] == "UNHEALTHY", body
        assert body["user_healthcheck_error"] == (
            "Healthcheck failed: user-defined healthcheck returned False"
        )
        assert body["runners"][0]["healthy"] is False
        status, ready = await pool.get("/health/ready")
        assert status == 503 and ready["ready"] is False, ready

        pool.set_mode(pid, "raise")
        await wait_until(
            lambda: (manager.user_health_error or "").endswith("database unreachable"),
            what="the raising check seen",
        )
        body = await pool.health()
        assert body["user_healthcheck_error"] == (
            "Healthcheck failed: RuntimeError: database unreachable"
        )

        pool.set_mode(pid, "ok")
        await wait_until(lambda: manager.user_health_error is None, what="the check passing")
        body = await pool.health()
        assert body["status"] == "READY" and "user_healthcheck_error" not in body, body
        assert pids(manager) == [pid]  # recovered in place: no recycle below the limit
        status, out = await pool.predict()
        assert status == 200 and out["output"] == pid, out


async def test_an_unhealthy_runner_takes_no_work_while_its_peer_serves(tmp_path: Path) -> None:
    async with serving(tmp_path, runners__count=2, runners__healthcheck_max_failures=1_000_000) as (
        pool,
        manager,
    ):
        sick, well = pids(manager)
        pool.set_mode(sick, "false")
        await wait_until(
            lambda: manager.runners[0]["healthy"] is False, what="runner 0 seen unhealthy"
        )
        body = await pool.health()
        # One runner passes: the pool is not UNHEALTHY, and says which runner fails.
        assert body["status"] == "READY" and "user_healthcheck_error" not in body, body
        assert body["runners"][0]["healthcheck_error"] == (
            "Healthcheck failed: user-defined healthcheck returned False"
        )
        served = set()
        for _ in range(8):
            status, out = await pool.predict()
            assert status == 200 and out["status"] == "succeeded", out
            served.add(out["output"])
        assert served == {well}

        pool.set_mode(well, "false")  # now neither passes: UNHEALTHY
        await wait_until(lambda: manager.user_health_error is not None, what="no runner passing")
        assert (await pool.health())["status"] == "UNHEALTHY"


async def test_a_runner_failing_max_failures_checks_in_a_row_is_recycled(tmp_path: Path) -> None:
    async with serving(tmp_path, runners__count=2, runners__healthcheck_max_failures=3) as (
        pool,
        manager,
    ):
        sick, well = pids(manager)
        pool.set_mode(sick, "false")
        await wait_until(lambda: manager.runners[0]["recycles"] == 1, what="runner 0 recycled")
        # A fresh process (its mode file names the old pid: it passes) serves again; the
        # peer was never touched.
        await wait_until(
            lambda: (
                manager.runners[0]["status"] == "READY"
                and manager.runners[0]["pid"] not in (None, sick)
            ),
            timeout_s=60,
            what="runner 0 back as a new process",
        )
        assert manager.runners[1]["pid"] == well and manager.runners[1]["recycles"] == 0
        assert manager.runners[0]["restarts"] == 0  # a recycle, not a death
        body = await pool.health()
        assert body["status"] == "READY" and "user_healthcheck_error" not in body, body
        _, metrics = await _text(pool, "/metrics")
        assert 'cog_pool_runner_recycles_total{reason="healthcheck",runner="0"} 1' in metrics


async def _text(pool: Pool, path: str) -> tuple[int, str]:
    async with pool.session.get(f"http://127.0.0.1:{pool.port}{path}") as resp:
        return resp.status, await resp.text()


async def test_the_check_interval_reaches_the_runner_config(tmp_path: Path) -> None:
    async with serving(tmp_path, runners__healthcheck_interval_s=0.25) as (_, manager):
        config = _read_json(Path(manager.state_dir, "runner-0", "config.json"))
        assert config["healthcheck_interval_s"] == 0.25


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())
