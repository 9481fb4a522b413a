"""Routing with real runners: FIFO order, queue limit, reject-when-busy, cancel, recent, slots."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from pool_helpers import make_config, running_pool, wait_until

from pool.errors import InvalidInput, NotReady, PoolBusy, PoolFull
from pool.manager import PoolManager
from pool.prediction import Prediction, PredictionRequest


async def submit(manager: PoolManager, pid: str | None = None, **inputs: Any) -> Prediction:
    return await manager.submit(PredictionRequest(id=pid, input=inputs))


async def test_fifo_order_on_one_runner(tmp_path: Path) -> None:
    async with running_pool(make_config(tmp_path)) as manager:
        predictions = [await submit(manager, n=i, sleep_s=0.02) for i in range(6)]
        await asyncio.gather(*(p.wait(30) for p in predictions))
    starts = [json.loads(p.output)["started"] for p in predictions]
    assert starts == sorted(starts)
    assert [json.loads(p.output)["n"] for p in predictions] == list(range(6))


async def test_queue_limit_gives_pool_full(tmp_path: Path) -> None:
    config = make_config(tmp_path, http__queue_limit=2)
    async with running_pool(config) as manager:
        running = await submit(manager, sleep_s=60)
        queued = [await submit(manager, n=i) for i in range(2)]
        with pytest.raises(PoolFull, match="queue is full"):
            await submit(manager, n=9)
        assert manager.free_slots() == -2
        # Cancel everything: the queued ones never reach a runner.
        for p in [*queued, running]:
            assert await manager.cancel(p.id)
        await asyncio.gather(*(p.wait(30) for p in [running, *queued]))
    assert [p.status for p in queued] == ["canceled", "canceled"]
    assert all(p.started_at is None and p.runner_index is None for p in queued)
    assert running.status == "canceled"


async def test_reject_when_busy_gives_pool_busy(tmp_path: Path) -> None:
    config = make_config(tmp_path, http__reject_when_busy=True)
    async with running_pool(config) as manager:
        running = await submit(manager, sleep_s=60)
        with pytest.raises(PoolBusy):
            await submit(manager, n=1)
        await manager.cancel(running.id)
        await running.wait(30)
        await wait_until(lambda: manager.free_slots() == 1, what="slot freed")
        after = await submit(manager, n=2)
        await after.wait(30)
    assert running.status == "canceled" and after.status == "succeeded"


async def test_cancel_running_frees_the_slot_for_the_next(tmp_path: Path) -> None:
    async with running_pool(make_config(tmp_path)) as manager:
        # Steps: one long prediction runs, one waits; cancel the running one.
        running = await submit(manager, sleep_s=60)
        waiting = await submit(manager, n=5)
        await wait_until(lambda: running.status == "processing", what="running")
        assert waiting.status == "starting"
        assert await manager.cancel(running.id)
        await running.wait(30)
        await waiting.wait(30)
    # Result: canceled on the runner, and the waiting one ran on the freed slot.
    assert running.status == "canceled"
    assert waiting.status == "succeeded" and json.loads(waiting.output)["n"] == 5


async def test_idempotent_by_id_and_recent_predictions(tmp_path: Path) -> None:
    async with running_pool(make_config(tmp_path)) as manager:
        first = await submit(manager, "job-1", n=1)
        again = await submit(manager, "job-1", n=2)  # same id: the same prediction
        assert again is first
        await first.wait(30)
        kept = manager.get("job-1")  # a slim copy of the finished record
        assert kept is not None and kept.to_dict() == first.to_dict()
        after = await submit(manager, "job-1", n=3)  # recently finished: still the same
        assert after is kept and json.loads(after.output)["n"] == 1
        assert manager.get("never-seen") is None


async def test_recent_predictions_are_bounded(tmp_path: Path) -> None:
    config = make_config(tmp_path, predictions__recent_max=2)
    async with running_pool(config) as manager:
        done = [await submit(manager, f"r{i}") for i in range(3)]
        await asyncio.gather(*(p.wait(30) for p in done))
        assert manager.get("r0") is None
        kept = [manager.get(f"r{i}") for i in (1, 2)]
        assert [k.to_dict() if k else None for k in kept] == [p.to_dict() for p in done[1:]]


async def test_recent_predictions_expire(tmp_path: Path) -> None:
    config = make_config(tmp_path, predictions__recent_ttl_s=0.3)
    async with running_pool(config) as manager:
        done = await submit(manager, "old")
        await done.wait(30)
        assert manager.get("old") is not None
        await wait_until(lambda: manager.get("old") is None, what="the record expired")
        # Expired: the same id runs again.
        again = await submit(manager, "old", n=4)
        await again.wait(30)
    assert again is not done and json.loads(again.output)["n"] == 4


async def test_cancel_unknown_goes_to_forwarders_finished_does_not(tmp_path: Path) -> None:
    forwarded: list[str] = []

    async def forward(prediction_id: str) -> None:
        forwarded.append(prediction_id)

    async with running_pool(make_config(tmp_path)) as manager:
        manager.add_cancel_forwarder(forward)
        assert await manager.cancel("elsewhere") is False
        finished = await submit(manager, "here")
        await finished.wait(30)
        assert await manager.cancel("here") is False
    assert forwarded == ["elsewhere"]


async def test_a_forwarder_that_hangs_does_not_hang_the_cancel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pool.manager.CANCEL_FORWARD_TIMEOUT_S", 0.2)
    never = asyncio.Event()

    async def blocked_broker(prediction_id: str) -> None:
        await never.wait()

    async with running_pool(make_config(tmp_path)) as manager:
        manager.add_cancel_forwarder(blocked_broker)
        # Bounded by the forward timeout; the outer deadline only keeps a regression finite.
        assert await asyncio.wait_for(manager.cancel("elsewhere"), 30) is False


async def test_wait_for_free_slot(tmp_path: Path) -> None:
    async with running_pool(make_config(tmp_path)) as manager:
        assert manager.free_slots() == 1
        await asyncio.wait_for(manager.wait_for_free_slot(), 5)  # free now: returns at once
        running = await submit(manager, sleep_s=60)
        waiter = asyncio.ensure_future(manager.wait_for_free_slot())
        await wait_until(lambda: running.status == "processing", what="running")
        assert not waiter.done()
        await manager.cancel(running.id)
        await asyncio.wait_for(waiter, 30)
        assert manager.free_slots() == 1


async def test_invalid_input_is_422_shaped_before_any_runner(tmp_path: Path) -> None:
    async with running_pool(make_config(tmp_path)) as manager:
        with pytest.raises(InvalidInput) as e:
            await submit(manager, sleep_s=-1, n="many")
        assert manager.health()["concurrency"]["current"] == 0
    locs = {tuple(d["loc"]) for d in e.value.detail}
    assert locs == {("body", "input", "sleep_s"), ("body", "input", "n")}
    assert all(d["msg"] and d["type"] for d in e.value.detail)


async def test_not_ready_before_setup(tmp_path: Path) -> None:
    async with running_pool(make_config(tmp_path), ready=False) as manager:
        # start() returns at once: no runner has finished setup yet
        with pytest.raises(NotReady):
            await submit(manager, n=1)
        setup = manager.health()["setup"]
        assert setup["status"] is None and setup["started_at"].endswith("Z")
        await wait_until(lambda: manager.status == "READY", what="READY")
        ok = await submit(manager, n=1)
        await ok.wait(30)
    assert ok.status == "succeeded"


async def test_slot_listeners_are_told_in_the_same_turn_and_one_failing_stops_none(
    tmp_path: Path,
) -> None:
    async with running_pool(make_config(tmp_path)) as manager:
        seen: list[int] = []

        def broken() -> None:
            raise RuntimeError("a listener with a bug")

        def listener() -> None:
            seen.append(manager.free_slots())

        manager.add_slot_listener(broken)
        manager.add_slot_listener(listener)
        running = await submit(manager, sleep_s=0.2)
        assert seen and seen[-1] == 0  # told when the slot was taken, before any await
        seen.clear()
        await running.wait(30)
        await wait_until(lambda: 1 in seen, what="told the slot freed")
        manager.remove_slot_listener(listener)
        manager.remove_slot_listener(broken)
        seen.clear()
        after = await submit(manager, n=1)
        await after.wait(30)
        assert seen == []
