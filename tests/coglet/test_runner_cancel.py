"""Cancel and stop through a real runner: signals raise inside sync code, tasks are canceled."""

from __future__ import annotations

import signal

from coglet import protocol


def test_sync_cancel_by_signal_interrupts_a_blocking_call(spawn) -> None:
    runner = spawn("sync_models.py:Sleeper")
    runner.wait_ready()
    runner.submit("c1", {"seconds": 120})
    state = runner.predictions["c1"]
    runner.wait_for(lambda: "sleeping" in state.logs, timeout_s=30, what="predict() to start")

    runner.cancel("c1")  # cancel-c1, then SIG_CANCEL

    runner.wait_done("c1", timeout_s=30)
    assert state.status == "canceled"
    assert state.output is None
    assert "predict_time" in state.metrics
    # The runner goes on serving, and the cancel file is gone.
    runner.submit("c2", {"seconds": 0})
    assert runner.wait_done("c2").output == "woke up"
    assert runner.stray_files() == []


def test_sync_cancel_raises_cancelation_exception_inside_python_code(spawn) -> None:
    runner = spawn("sync_models.py:Spinner")
    runner.wait_ready()
    runner.submit("spin", {"seconds": 120})
    state = runner.predictions["spin"]
    runner.wait_for(lambda: "spinning" in state.logs, timeout_s=30, what="predict() to start")
    runner.cancel("spin")
    runner.wait_done("spin")
    assert state.status == "canceled"
    assert "interrupted by CancelationException" in state.logs


def test_sync_cancel_found_by_rescan_when_the_signal_is_a_rescan(spawn) -> None:
    """A cancel file announced with SIGHUP instead of SIGUSR1 still cancels the sync one."""
    runner = spawn("sync_models.py:Sleeper")
    runner.wait_ready()
    runner.submit("c3", {"seconds": 120})
    state = runner.predictions["c3"]
    runner.wait_for(lambda: "sleeping" in state.logs, timeout_s=30, what="predict() to start")
    runner.cancel("c3", sig=protocol.SIG_RESCAN)
    assert runner.wait_done("c3").status == "canceled"


def test_sync_cancel_without_any_signal_is_caught_by_the_safety_rescan(spawn) -> None:
    runner = spawn("sync_models.py:Sleeper")
    runner.wait_ready()
    runner.submit("c4", {"seconds": 120})
    state = runner.predictions["c4"]
    runner.wait_for(lambda: "sleeping" in state.logs, timeout_s=30, what="predict() to start")
    runner.cancel("c4", sig=None)
    assert runner.wait_done("c4", timeout_s=30).status == "canceled"


def test_cancel_of_a_queued_sync_prediction_never_runs_it(spawn) -> None:
    runner = spawn("sync_models.py:Sleeper")
    runner.wait_ready()
    runner.submit("first", {"seconds": 120})
    runner.wait_for(
        lambda: "sleeping" in runner.predictions["first"].logs, timeout_s=30, what="first start"
    )
    runner.submit("second", {"seconds": 120})
    runner.cancel("second", sig=None)  # its file is there before the first one ends
    runner.cancel("first")
    assert runner.wait_done("first").status == "canceled"
    second = runner.wait_done("second")
    assert second.status == "canceled"
    assert "sleeping" not in second.logs  # predict() never ran for it


def test_async_cancel_by_file_cancels_the_task(spawn) -> None:
    runner = spawn("async_models.py:AsyncSleeper", max_concurrency=3)
    runner.wait_ready()
    for tag in ("a", "b"):
        runner.submit(f"as-{tag}", {"seconds": 120})
    a, b = runner.predictions["as-a"], runner.predictions["as-b"]
    runner.wait_for(
        lambda: "sleeping" in a.logs and "sleeping" in b.logs, timeout_s=30, what="both start"
    )

    runner.cancel("as-a")

    runner.wait_done("as-a")
    assert a.status == "canceled"
    assert "cancelled inside" in a.logs  # asyncio.CancelledError reached the model's code
    assert not b.done  # the other task goes on
    runner.cancel("as-b")
    assert runner.wait_done("as-b").status == "canceled"


def test_cancel_of_an_unknown_or_finished_id_is_dropped(spawn) -> None:
    runner = spawn("sync_models.py:Hello")
    runner.wait_ready()
    runner.submit("done-1", {"text": "x"})
    runner.wait_done("done-1")
    runner.cancel("done-1")
    runner.cancel("never-seen")
    runner.submit("next", {"text": "y"})
    assert runner.wait_done("next").output == "hello y"
    runner.wait_for(lambda: runner.stray_files() == [], timeout_s=10, what="stale cancels gone")


def test_stop_cancels_a_running_sync_prediction_and_exits_zero(spawn) -> None:
    runner = spawn("sync_models.py:Sleeper")
    runner.wait_ready()
    runner.submit("s1", {"seconds": 120})
    runner.wait_for(lambda: "sleeping" in runner.predictions["s1"].logs, timeout_s=30, what="start")
    assert runner.stop() == protocol.EXIT_OK
    assert runner.predictions["s1"].status == "canceled"  # flushed before the exit


def test_sigterm_cancels_running_async_predictions_and_exits_zero(spawn) -> None:
    runner = spawn("async_models.py:AsyncSleeper", max_concurrency=2)
    runner.wait_ready()
    for tag in ("a", "b"):
        runner.submit(f"t-{tag}", {"seconds": 120})
    runner.wait_for(
        lambda: all("sleeping" in s.logs for s in runner.predictions.values()),
        timeout_s=30,
        what="both start",
    )
    runner.send(signal.SIGTERM)
    assert runner.wait_exit() == protocol.EXIT_OK
    runner.pump()
    assert [s.status for s in runner.predictions.values()] == ["canceled", "canceled"]


def test_stop_while_busy_ignores_new_requests(spawn) -> None:
    runner = spawn("sync_models.py:Sleeper")
    runner.wait_ready()
    runner.submit("busy", {"seconds": 120})
    runner.wait_for(
        lambda: "sleeping" in runner.predictions["busy"].logs, timeout_s=30, what="start"
    )
    protocol.write_atomic(runner.path(protocol.STOP_FILE), b"")
    runner.submit("late", {"seconds": 0})  # same SIGHUP as the stop
    assert runner.wait_exit() == protocol.EXIT_OK
    runner.pump()
    assert runner.predictions["busy"].status == "canceled"
    # Not taken: its request file is still there for the pool to fail or re-route.
    assert runner.predictions["late"].status is None
    assert protocol.request_name("late") in runner.stray_files()
