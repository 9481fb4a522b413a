"""Supervision with real coglet children and real signals: spread, death, restart, setup failure."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from pool_helpers import make_config, pid_alive, running_pool, wait_until

from cogpool import cli
from pool.errors import NotReady
from pool.manager import PoolManager
from pool.metrics import Metrics
from pool.prediction import EndReason, Prediction, PredictionRequest
from pool.router import Router
from pool.runner import RunnerHandle
from pool.supervisor import WAKE_SIGNALS


async def submit(manager: PoolManager, **inputs: Any) -> Prediction:
    return await manager.submit(PredictionRequest(id=None, input=inputs))


def max_overlap(outputs: list[dict[str, Any]]) -> int:
    """The most predictions running at one instant, from their start/end times."""
    edges = sorted(
        [(o["started"], 1) for o in outputs] + [(o["ended"], -1) for o in outputs],
        key=lambda e: (e[0], e[1]),
    )
    running = best = 0
    for _, step in edges:
        running += step
        best = max(best, running)
    return best


def all_ready(manager: PoolManager) -> Any:
    return lambda: all(r["status"] == "READY" for r in manager.health()["runners"])


def runner(manager: PoolManager, index: int) -> dict[str, Any]:
    return manager.health()["runners"][index]


async def test_three_gpu_runners_share_thirty_predictions(tmp_path: Path) -> None:
    # Steps: 3 runners on GPUs 0,1,2; 30 predictions of 200 ms submitted at once.
    config = make_config(tmp_path, runners__gpus="0,1,2")
    async with running_pool(config) as manager:
        await wait_until(all_ready(manager), what="all three runners READY")
        predictions = [await submit(manager, sleep_s=0.2, n=i) for i in range(30)]
        waiting = -manager.free_slots()  # predictions queued behind busy runners
        await asyncio.gather(*(p.wait(60) for p in predictions))
        health = manager.health()
    # Result: all succeed; work waited in the queue; 3 ran at once; each runner saw its GPU.
    assert [p.status for p in predictions] == ["succeeded"] * 30, [p.error for p in predictions]
    assert waiting >= 20
    outputs = [json.loads(p.output) for p in predictions]
    assert max_overlap(outputs) >= 3
    gpu_of_pid = {r["pid"]: r["gpu"] for r in health["runners"]}
    assert {o["cuda"] for o in outputs} == {"0", "1", "2"}
    for o in outputs:
        assert o["cuda"] == gpu_of_pid[o["pid"]]
    for p in predictions:
        assert p.runner_index is not None
        assert json.loads(p.output)["cuda"] == health["runners"][p.runner_index]["gpu"]


async def test_kill_9_of_a_runner_fails_its_prediction_and_it_comes_back(tmp_path: Path) -> None:
    config = make_config(tmp_path, runners__gpus="0,1")
    async with running_pool(config) as manager:
        await wait_until(all_ready(manager), what="both runners READY")
        # Steps: a long prediction goes to runner 0; kill -9 that runner mid-prediction.
        victim = await submit(manager, sleep_s=60, shout="about to sleep")
        await wait_until(lambda: "about to sleep" in victim.logs, what="prediction running")
        assert victim.runner_index == 0
        old_pid = runner(manager, 0)["pid"]
        os.kill(old_pid, signal.SIGKILL)
        await victim.wait(30)
        # Meanwhile runner 1 keeps serving.
        others = [await submit(manager, sleep_s=0.05, n=i) for i in range(3)]
        await asyncio.gather(*(p.wait(30) for p in others))
        # The killed runner comes back with a new process.
        await wait_until(
            lambda: runner(manager, 0)["status"] == "READY" and runner(manager, 0)["restarts"] == 1,
            what="runner 0 restarted",
        )
        assert runner(manager, 0)["pid"] != old_pid
        after = await submit(manager, sleep_s=0.0)
        await after.wait(30)
    # Result: the prediction failed naming the runner and the exit, with its last output.
    assert victim.status == "failed"
    assert victim.error is not None
    assert victim.error.startswith("runner 0 (gpu 0) died: killed by SIGKILL")
    assert "about to sleep" in victim.error
    assert [p.status for p in others] == ["succeeded"] * 3
    assert after.status == "succeeded"


async def test_a_run_lost_to_a_runner_death_is_rerun_when_its_id_comes_again(
    tmp_path: Path,
) -> None:
    # Steps: a prediction with a client id is running; its runner is killed; the same id is
    # submitted again (a queue redelivery, or a client retrying its PUT).
    config = make_config(tmp_path, runners__count=1)
    async with running_pool(config) as manager:
        request = PredictionRequest(id="lost-1", input={"sleep_s": 60, "shout": "first run"})
        first = await manager.submit(request)
        await wait_until(lambda: "first run" in first.logs, what="prediction running")
        os.kill(runner(manager, 0)["pid"], signal.SIGKILL)
        await first.wait(30)
        assert first.status == "failed" and first.runner_died
        await wait_until(lambda: runner(manager, 0)["status"] == "READY", what="restart")
        second = await manager.submit(request)
        # Result: a new run under the same id, not the recorded failure.
        assert second is not first
        await wait_until(lambda: "first run" in second.logs, what="the rerun running")
        assert manager.get("lost-1") is second
        await manager.cancel("lost-1")
        await second.wait(30)
        assert second.status == "canceled"
        # A finished run that the model itself ended is returned, never rerun.
        again = await manager.submit(request)
        assert again.done and again.to_dict() == second.to_dict()


async def test_setup_failure_is_reported_and_never_restarted(tmp_path: Path) -> None:
    config = make_config(tmp_path, "setup_fails", runners__count=2)
    async with running_pool(config, ready=False) as manager:
        # Steps: both runners run a setup() that raises.
        await wait_until(
            lambda: (
                all(r["pid"] is None for r in manager.health()["runners"])
                and manager.status == "SETUP_FAILED"
            ),
            what="both runners exited with SETUP_FAILED",
        )
        health = manager.health()
        with pytest.raises(NotReady):
            await submit(manager, x=1)
    # Result: SETUP_FAILED with the setup logs and error; no restart.
    assert health["status"] == "SETUP_FAILED"
    assert health["setup"]["status"] == "failed"
    assert "loading weights from /nowhere" in health["setup"]["logs"]
    assert "weights missing" in health["setup"].get("error", "") + health["setup"]["logs"]
    assert [r["status"] for r in health["runners"]] == ["SETUP_FAILED", "SETUP_FAILED"]
    assert [r["restarts"] for r in health["runners"]] == [0, 0]


async def test_restart_limit_leaves_runner_defunct_while_others_serve(tmp_path: Path) -> None:
    config = make_config(tmp_path, runners__count=2, runners__max_restarts=1)
    async with running_pool(config) as manager:
        await wait_until(all_ready(manager), what="both runners READY")
        # Steps: a prediction kills runner 0; it restarts once; a second death in the window.
        first = await submit(manager, die=True)
        await first.wait(30)
        await wait_until(
            lambda: runner(manager, 0)["status"] == "READY", what="runner 0 back after 1st death"
        )
        second = await submit(manager, die=True)
        await second.wait(30)
        await wait_until(lambda: runner(manager, 0)["pid"] is None, what="runner 0 reaped")
        state = runner(manager, 0)
        status = manager.status
        served = [await submit(manager, n=i) for i in range(3)]
        await asyncio.gather(*(p.wait(30) for p in served))
        state_later = runner(manager, 0)
    # Result: runner 0 stays DEFUNCT after 1 restart; runner 1 serves everything else.
    assert first.error is not None and first.error.startswith("runner 0 (cpu) died: killed by")
    assert second.runner_index == 0 and second.status == "failed"
    assert state["status"] == "DEFUNCT" and state["restarts"] == 1
    assert state_later["status"] == "DEFUNCT" and state_later["restarts"] == 1
    assert status == "READY"
    assert [p.status for p in served] == ["succeeded"] * 3
    assert {p.runner_index for p in served} == {1}


async def test_queued_work_fails_when_no_runner_can_ever_serve(tmp_path: Path) -> None:
    config = make_config(tmp_path, runners__count=1, runners__max_restarts=0)
    async with running_pool(config) as manager:
        # Steps: the only runner takes a prediction that kills it; three more wait behind it.
        fatal = await submit(manager, sleep_s=0.5, die=True)
        waiting = [await submit(manager, n=i) for i in range(3)]
        await asyncio.gather(*(p.wait(30) for p in [fatal, *waiting]))
    # Result: the runner is given up at once, and the waiting work fails instead of waiting
    # forever, marked as lost to the runtime so a queue hands it to another pool.
    assert fatal.runner_died
    for p in waiting:
        assert p.status == "failed" and p.runner_died
        assert p.error is not None and p.error.startswith("no runner can serve this model")


async def test_all_runners_defunct_means_not_ready(tmp_path: Path) -> None:
    config = make_config(tmp_path, runners__count=1, runners__max_restarts=0)
    async with running_pool(config) as manager:
        doomed = await submit(manager, die=True)
        await doomed.wait(30)
        await wait_until(lambda: manager.status == "DEFUNCT", what="pool DEFUNCT")
        with pytest.raises(NotReady):
            await submit(manager, n=1)
    assert doomed.status == "failed"


async def test_async_runner_takes_up_to_its_concurrency(tmp_path: Path) -> None:
    config = make_config(tmp_path, "async_worker", runners__count=1)
    async with running_pool(config) as manager:
        # Steps: 6 predictions of 0.5 s on one runner with concurrency.max 4.
        predictions = [await submit(manager, sleep_s=0.5) for _ in range(6)]
        busy = runner(manager, 0)["busy"]
        waiting = -manager.free_slots()
        await asyncio.gather(*(p.wait(30) for p in predictions))
    # Result: 4 at once on the runner, 2 waited in the pool's queue; all succeed.
    assert (busy, waiting) == (4, 2)
    assert [p.status for p in predictions] == ["succeeded"] * 6
    outputs = [json.loads(p.output) for p in predictions]
    assert max_overlap(outputs) == 4
    assert len({o["pid"] for o in outputs}) == 1


# --- recycling (issue 7: 11) -----------------------------------------------------------------
async def test_a_runner_is_recycled_after_max_predictions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    metrics = Metrics()
    config = make_config(tmp_path, runners__max_predictions=2)
    async with running_pool(config, metrics=metrics) as manager:
        # Steps: five predictions, one after another, on one runner that serves two at most.
        pids = []
        for i in range(5):
            p = await submit(manager, n=i)
            await p.wait(60)
            assert p.status == "succeeded", p.error
            pids.append(json.loads(p.output)["pid"])
        await wait_until(lambda: runner(manager, 0)["recycles"] == 2, what="two recycles")
        state = runner(manager, 0)
    # Result: a fresh process every two predictions; recycles are not restarts (no backoff, no
    # count against max_restarts); one log line and one counted metric per recycle.
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4], pids
    assert state["restarts"] == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("runner_recycle ")]
    assert len(lines) == 2 and all("reason=max_predictions" in line for line in lines), lines
    assert 'cog_pool_runner_recycles_total{reason="max_predictions",runner="0"} 2' in (
        metrics.render()
    )


async def test_a_runner_above_max_rss_mb_is_recycled_after_its_prediction(tmp_path: Path) -> None:
    config = make_config(tmp_path, "proc", runners__max_rss_mb=100)
    async with running_pool(config) as manager:
        before = runner(manager, 0)["pid"]
        # Steps: a prediction that keeps 150 MiB for good (a leak); then another one.
        leaky = await submit(manager, leak_mb=150)
        await leaky.wait(60)
        await wait_until(lambda: runner(manager, 0)["recycles"] == 1, what="a recycle")
        after = await submit(manager)
        await after.wait(60)
        state = runner(manager, 0)
    # Result: the leaky prediction finished normally; the next one ran in a fresh process.
    assert leaky.status == "succeeded" and after.status == "succeeded", (leaky.error, after.error)
    assert state["pid"] not in (None, before) and state["restarts"] == 0


async def test_a_runner_whose_prediction_fails_with_memory_error_is_recycled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    config = make_config(tmp_path, "proc")
    async with running_pool(config) as manager:
        before = runner(manager, 0)["pid"]
        # Steps: a prediction fails with MemoryError; then another one.
        failed = await submit(manager, memory_error=True)
        await failed.wait(60)
        await wait_until(lambda: runner(manager, 0)["recycles"] == 1, what="a recycle")
        after = await submit(manager)
        await after.wait(60)
        state = runner(manager, 0)
    # Result: the first failed (MemoryError), the runner was replaced, the next one succeeded.
    assert failed.status == "failed" and after.status == "succeeded", after.error
    assert state["pid"] not in (None, before)
    assert any("reason=memory_error" in r.getMessage() for r in caplog.records)


# --- honest health (issue 7: 15) -------------------------------------------------------------
async def test_a_runner_defunct_for_good_shows_the_pool_degraded(tmp_path: Path) -> None:
    config = make_config(tmp_path, runners__count=2, runners__max_restarts=0)
    async with running_pool(config) as manager:
        await wait_until(all_ready(manager), what="both runners READY")
        healthy = manager.health()
        # Steps: runner 0 dies with no restarts allowed: it stays DEFUNCT for good.
        p = await submit(manager, die=True)
        await p.wait(30)
        await wait_until(lambda: runner(manager, 0)["status"] == "DEFUNCT", what="DEFUNCT")
        health = manager.health()
    # Result: Cog's status still says a slot is free (READY), and degraded says why not all.
    assert healthy["degraded"] is False and healthy["degraded_reasons"] == []
    assert health["status"] == "READY"
    assert health["degraded"] is True
    assert health["degraded_reasons"] == ["runner 0 (cpu) is DEFUNCT: restarts given up"]


async def test_a_supervisor_pass_that_keeps_failing_makes_serve_exit_non_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    config = make_config(tmp_path, http__port=0, runners__max_failed_ticks=3)

    def broken_dispatch(self: Router) -> None:
        raise RuntimeError("dispatch is broken")

    # Steps: every supervisor pass fails (the router's dispatch raises), as a wedged pool's would.
    monkeypatch.setattr(Router, "dispatch", broken_dispatch)
    code = await asyncio.wait_for(cli.serve(config), 120)
    # Result: after three failing passes in a row the pool shut down and exits non-zero, so an
    # orchestrator restarts it; no runner is left behind.
    assert code == cli.EXIT_SUPERVISOR_FAILED
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("supervisor_failed consecutive_failed_ticks=3") for m in messages)
    spawned = [int(m.split("pid=")[1]) for m in messages if m.startswith("runner_spawned ")]
    assert spawned and not any(pid_alive(pid) for pid in spawned)


async def test_a_recycle_costs_only_the_recycled_runners_capacity(tmp_path: Path) -> None:
    config = make_config(tmp_path, runners__count=2, runners__max_predictions=1)
    async with running_pool(config) as manager:
        await wait_until(all_ready(manager), what="both runners READY")
        # Steps: one prediction; its runner has then served its one and is recycled.
        p = await submit(manager, n=1)
        await p.wait(30)
        used, other = p.runner_index, 1 - (p.runner_index or 0)
        await wait_until(lambda: runner(manager, used)["recycles"] == 1, what="a recycle")
        # Result: while it drains and restarts, the other runner is READY and serves at once.
        assert runner(manager, other)["status"] == "READY"
        assert manager.free_slots() >= 1
        q = await submit(manager, n=2)
        await q.wait(30)
        assert q.status == "succeeded" and q.runner_index == other
        await wait_until(all_ready(manager), what="the recycled runner back")


# --- the cancel grace is the supervisor's policy ----------------------------------------------
async def test_a_runner_that_ignores_a_client_cancel_is_killed_and_the_prediction_canceled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    config = make_config(tmp_path, runners__cancel_grace_s=0.5)
    async with running_pool(config) as manager:
        # Steps: a model that swallows every cancel runs; a client cancels it.
        body = {"sleep_s": 120, "stubborn": True, "shout": "running"}
        stubborn = await manager.submit(PredictionRequest(id="stubborn-c", input=body))
        await wait_until(lambda: "running" in stubborn.logs, what="the model running")
        pid = runner(manager, 0)["pid"]
        assert await manager.cancel(stubborn.id)
        await stubborn.wait(30)
        await wait_until(lambda: manager.status == "READY", what="runner back")
        # A PUT of the same id returns the canceled prediction; it is not run again.
        again = await manager.submit(PredictionRequest(id="stubborn-c", input=body))
        after = await submit(manager, n=1)
        await after.wait(30)
        restarts = runner(manager, 0)["restarts"]
    # Result: the supervisor killed the runner past the grace (its whole group), the
    # prediction ended canceled as the client asked, and a fresh runner serves.
    assert stubborn.status == "canceled" and stubborn.end_reason is EndReason.CANCELED
    assert not stubborn.runner_died
    assert again is manager.get("stubborn-c") and again.status == "canceled"
    assert not pid_alive(pid) and restarts == 1
    assert after.status == "succeeded"
    kills = [r.getMessage() for r in caplog.records if "runner_kill" in r.getMessage()]
    assert len(kills) == 1 and "reason=cancel_grace_over prediction=stubborn-c" in kills[0]


async def test_a_runner_that_lets_go_within_the_grace_is_not_killed(tmp_path: Path) -> None:
    config = make_config(tmp_path, runners__cancel_grace_s=0.5)
    async with running_pool(config) as manager:
        # Steps: a cooperative prediction is canceled and lets go; the next one on the same
        # runner runs well past the first one's grace.
        first = await submit(manager, sleep_s=120, shout="running")
        await wait_until(lambda: "running" in first.logs, what="the model running")
        pid = runner(manager, 0)["pid"]
        assert await manager.cancel(first.id)
        await first.wait(30)
        second = await submit(manager, sleep_s=1.5)
        await second.wait(30)
        health = runner(manager, 0)
    # Result: the runner was never killed: the second prediction ran to its end on it.
    assert first.status == "canceled"
    assert second.status == "succeeded", second.error
    assert json.loads(second.output)["pid"] == pid
    assert health["pid"] == pid and health["restarts"] == 0


async def test_a_runner_handle_alone_never_kills_its_runner(tmp_path: Path) -> None:
    # The handle only writes the cancel and remembers when: with no supervisor, a runner that
    # ignores the cancel is left alone past the grace (killing is the supervisor's policy).
    config = make_config(tmp_path, runners__cancel_grace_s=0.1)
    loop = asyncio.get_running_loop()
    for sig in WAKE_SIGNALS:  # the runner's hints would otherwise kill this process
        loop.add_signal_handler(sig, lambda: None)
    handle = RunnerHandle(0, None, config, str(tmp_path / "state"), wake=lambda: None)
    try:
        handle.spawn()
        await wait_until(lambda: (handle.scan(), handle.state == "READY")[1], what="READY")
        prediction = Prediction(
            PredictionRequest(id="alone", input={"sleep_s": 1.5, "stubborn": True, "shout": "go"})
        )
        handle.dispatch(prediction, prediction.encode_request(prediction.input))
        await wait_until(lambda: (handle.scan(), "go" in prediction.logs)[1], what="running")
        assert handle.cancel("alone")
        sent_at = handle.slots["alone"].cancel_sent_at
        # Steps: the model ignores the cancel and runs 1.5 s, 15 graces, to its end.
        await wait_until(lambda: (handle.scan(), prediction.done)[1], what="prediction ends")
        assert sent_at is not None and handle.alive
        assert prediction.status == "succeeded", prediction.error
        assert "ignoring a cancel" in prediction.logs
    finally:
        handle.kill()
        await wait_until(lambda: handle.reap() is not None or not handle.alive, what="reaped")
        handle.close()
        for sig in WAKE_SIGNALS:
            loop.remove_signal_handler(sig)
