"""Graceful drain (DESIGN §7): in-flight work finishes, new work is refused, no child is left."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from pool_helpers import (
    fill_inodes,
    make_config,
    pid_alive,
    runner_pids,
    running_pool,
    small_tmpfs,
    wait_until,
)

from pool.errors import ShuttingDown
from pool.manager import PoolManager
from pool.prediction import Prediction, PredictionRequest


async def submit(manager: PoolManager, **inputs: Any) -> Prediction:
    return await manager.submit(PredictionRequest(id=None, input=inputs))


async def started_pool(tmp_path: Path, **overrides: Any) -> PoolManager:
    manager = PoolManager(make_config(tmp_path, **overrides))
    await manager.start()
    await wait_until(
        lambda: all(r["status"] == "READY" for r in manager.health()["runners"]),
        timeout_s=60,
        what="all runners READY",
    )
    return manager


async def test_drain_lets_in_flight_finish_and_refuses_new_work(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    manager = await started_pool(tmp_path, runners__count=2)
    pids = runner_pids(manager)
    # Steps: two predictions run, a third waits; shutdown starts with a generous grace.
    in_flight = [await submit(manager, sleep_s=0.5, n=i) for i in range(3)]
    draining = asyncio.ensure_future(manager.shutdown(30))
    await wait_until(lambda: manager.shutting_down, what="shutdown begun")
    with pytest.raises(ShuttingDown):
        await submit(manager, n=99)
    assert manager.free_slots() == 0
    with pytest.raises(ShuttingDown):
        await asyncio.wait_for(manager.wait_for_free_slot(), 10)
    await asyncio.wait_for(draining, 60)
    # Result: all accepted work finished; the runners were stopped by the stop file.
    assert [p.status for p in in_flight] == ["succeeded"] * 3
    assert [json.loads(p.output)["n"] for p in in_flight] == [0, 1, 2]
    assert not [pid for pid in pids if pid_alive(pid)]
    steps = [r.getMessage() for r in caplog.records if "shutdown_step" in r.getMessage()]
    assert steps == ["shutdown_step step=stop_file runners=0,1"]


async def test_work_past_the_grace_is_canceled(tmp_path: Path) -> None:
    manager = await started_pool(tmp_path)
    pids = runner_pids(manager)
    running = await submit(manager, sleep_s=60)
    queued = await submit(manager, n=1)
    await wait_until(lambda: running.status == "processing", what="running")
    await asyncio.wait_for(manager.shutdown(0.2), 60)
    assert running.status == "canceled"
    assert queued.status == "canceled" and queued.started_at is None
    assert not [pid for pid in pids if pid_alive(pid)]


async def test_a_runner_that_ignores_stop_is_terminated_then_killed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    manager = await started_pool(tmp_path, runners__stop_grace_s=0.3, runners__cancel_grace_s=0.3)
    pids = runner_pids(manager)
    # A model that swallows every cancel keeps its runner busy through stop and SIGTERM.
    stubborn = await submit(manager, sleep_s=120, stubborn=True)
    await wait_until(lambda: stubborn.status == "processing", what="running")
    await asyncio.wait_for(manager.shutdown(0.2), 60)
    steps = [r.getMessage() for r in caplog.records if "shutdown_step" in r.getMessage()]
    assert stubborn.done and stubborn.status in ("failed", "canceled")
    assert not [pid for pid in pids if pid_alive(pid)]
    assert steps[0] == "shutdown_step step=cancel predictions=1"
    assert "shutdown_step step=stop_file runners=0" in steps
    assert steps[-1] in (
        "shutdown_step step=sigterm runners=0",
        "shutdown_step step=sigkill runners=0",
    )


async def test_shutdown_is_shared_and_repeatable(tmp_path: Path) -> None:
    manager = await started_pool(tmp_path)
    pids = runner_pids(manager)
    await asyncio.wait_for(asyncio.gather(manager.shutdown(5), manager.shutdown(5)), 60)
    await asyncio.wait_for(manager.shutdown(5), 10)
    assert not [pid for pid in pids if pid_alive(pid)]
    with pytest.raises(ShuttingDown):
        await submit(manager, n=1)


async def test_shutdown_stops_runners_when_the_state_dir_is_full(tmp_path: Path) -> None:
    # Steps: the state dir is a tmpfs with few inodes; they run out; the pool shuts down.
    with small_tmpfs(tmp_path / "shm", nr_inodes=64) as shm:
        config = make_config(tmp_path, state_dir=str(shm / "state"))
        # Result (checked by running_pool): shutdown completes, no runner process is left;
        # the stop file could not be created, so the runner was asked with SIGTERM instead.
        async with running_pool(config) as manager:
            pid = manager.runners[0]["pid"]
            await asyncio.to_thread(fill_inodes, shm / "filler")
        assert not pid_alive(pid)
