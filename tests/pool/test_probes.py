"""/health/live and /health/ready through a real socket: during start, serving, drain and after.

A real PoolManager with a real coglet runner serves the ``gated`` fixture model, whose setup and
predictions wait for files the test creates, so each phase is held open without timing guesses.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from pool_helpers import make_config, wait_until

from pool.api import SHUTDOWN_KEY, create_app
from pool.manager import PoolManager

DEADLINE_S = 60.0


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as r:
        return r.status, await r.json()


async def eventually(
    session: aiohttp.ClientSession, url: str, status: int, *, timeout_s: float = DEADLINE_S
) -> Any:
    """GET ``url`` until it answers ``status``; fail after the deadline."""
    seen: list[tuple[int, Any]] = []

    async def check() -> bool:
        seen.append(await get(session, url))
        return seen[-1][0] == status

    await wait_until(check, timeout_s=timeout_s, what=f"{url} to answer {status}")
    return seen[-1][1]


async def test_probes_through_start_serving_drain_and_stop(tmp_path: Path) -> None:
    setup_gate = tmp_path / "setup-gate"
    hold = tmp_path / "hold"
    config = make_config(
        tmp_path,
        "gated",
        runners__env={"SETUP_GATE_FILE": str(setup_gate)},
        http__live_tick_age_s=3.0,
        http__allow_shutdown=True,  # the test drains through POST /shutdown
    )
    manager = PoolManager(config)
    app = create_app(config, manager, manage_lifecycle=False)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    drain: asyncio.Task[None] | None = None
    try:
        async with aiohttp.ClientSession() as session:
            # Steps: the server listens before the manager has started. Result: not alive yet.
            status, body = await get(session, base + "/health/live")
            assert (status, body["status"]) == (503, "stalled")
            # Steps: the manager starts; setup waits for its gate. Result: alive, not ready.
            await manager.start()
            live = await eventually(session, base + "/health/live", 200)
            assert live["status"] == "alive" and live["last_tick_age_s"] <= 3.0
            status, ready = await get(session, base + "/health/ready")
            assert status == 503 and ready["reason"] == "pool status STARTING", ready
            status, health = await get(session, base + "/health-check")
            assert status == 200 and health["status"] == "STARTING"
            # Steps: setup finishes. Result: ready.
            setup_gate.touch()
            ready = await eventually(session, base + "/health/ready", 200)
            assert ready == {"ready": True, "status": "READY", "reason": None}
            # Steps: one prediction is held in flight; the only slot is taken. Result: BUSY
            # is still ready (requests wait in the pool's queue).
            async with session.post(
                base + "/predictions",
                json={"input": {"text": "x", "hold_file": str(hold)}},
                headers={"Prefer": "respond-async"},
            ) as r:
                assert r.status == 202
                prediction_id = (await r.json())["id"]
            await wait_until(lambda: manager.status == "BUSY", what="pool BUSY")
            status, ready = await get(session, base + "/health/ready")
            assert status == 200 and ready["status"] == "BUSY"
            # Steps: POST /shutdown, then the drain starts with the prediction still held.
            # Result: not ready (draining) and still alive while the drain waits.
            async with session.post(base + "/shutdown") as r:
                assert r.status == 200
            assert app[SHUTDOWN_KEY].is_set()
            drain = asyncio.ensure_future(manager.shutdown(30))
            await wait_until(lambda: manager.shutting_down, what="drain begun")
            status, ready = await get(session, base + "/health/ready")
            assert (status, ready["reason"]) == (503, "draining")
            status, live = await get(session, base + "/health/live")
            assert status == 200, live
            assert not manager.get(prediction_id).done  # type: ignore[union-attr]
            # Steps: the prediction is released; the drain ends and the supervisor loop stops.
            # Result: it finished, and liveness fails once the loop's last pass is stale.
            hold.touch()
            await asyncio.wait_for(drain, DEADLINE_S)
            assert manager.get(prediction_id).status == "succeeded"  # type: ignore[union-attr]
            stalled = await eventually(session, base + "/health/live", 503, timeout_s=20)
            assert stalled["status"] == "stalled" and stalled["last_tick_age_s"] > 3.0
            status, _ = await get(session, base + "/health/ready")
            assert status == 503
    finally:
        setup_gate.touch()
        hold.touch()
        if drain is None:
            await manager.shutdown(10)
        await runner.cleanup()


async def test_ready_with_reject_when_busy_needs_a_free_slot(tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    config = make_config(tmp_path, "gated", http__reject_when_busy=True)
    manager = PoolManager(config)
    runner = web.AppRunner(create_app(config, manager))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            await eventually(session, base + "/health/ready", 200)
            # Steps: the only slot is taken. Result: a pool that answers 409 when busy is
            # not ready, so a load balancer sends the request elsewhere.
            async with session.post(
                base + "/predictions",
                json={"input": {"hold_file": str(hold)}},
                headers={"Prefer": "respond-async"},
            ) as r:
                assert r.status == 202
            ready = await eventually(session, base + "/health/ready", 503)
            assert ready["reason"] == "pool status BUSY"
            hold.touch()
            await eventually(session, base + "/health/ready", 200)
    finally:
        hold.touch()
        await runner.cleanup()


async def test_live_fails_when_the_supervisor_loop_stops_turning(tmp_path: Path) -> None:
    config = make_config(tmp_path, "gated", http__live_tick_age_s=2.0)
    manager = PoolManager(config)
    runner = web.AppRunner(create_app(config, manager))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            await eventually(session, base + "/health/ready", 200)
            # Steps: the loop task dies (as an escaped bug would end it) while the server and
            # the runner stay up, and predictions keep the runner signalling.
            task = manager._supervisor._task
            assert task is not None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            served = 0

            async def keep_predicting() -> None:
                nonlocal served
                while True:
                    async with session.post(base + "/predictions", json={"input": {}}) as r:
                        assert r.status == 200
                        served += 1

            predicting = asyncio.ensure_future(keep_predicting())
            try:
                # Result: liveness fails once the loop's last pass is older than the limit,
                # although runner signals still drive ticks (and predictions still finish).
                stalled = await eventually(session, base + "/health/live", 503, timeout_s=20)
            finally:
                predicting.cancel()
                await asyncio.gather(predicting, return_exceptions=True)
            assert stalled["last_tick_age_s"] > 2.0 and served > 3
    finally:
        await runner.cleanup()
