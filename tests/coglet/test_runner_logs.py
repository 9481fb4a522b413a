"""Prediction logs: Python-level output travels in the responses; fd-level output does not."""

from __future__ import annotations

from coglet import protocol


def test_prints_logging_and_progress_bars_reach_the_logs_in_order(spawn) -> None:
    runner = spawn("sync_models.py:Printer")
    runner.wait_ready()
    runner.submit("pr", {"n": 3})
    state = runner.wait_done("pr")
    assert state.status == "succeeded"
    assert state.output == "done"
    assert state.logs == (
        "line 0\nline 1\nline 2\n"
        "INFO:printer:an info record\n"
        "\r 50%|#####     |\r100%|##########|\n"
        "last words"  # printed just before return, without a newline: not lost
    )


def test_print_right_before_return_is_in_the_terminal_delta(spawn) -> None:
    runner = spawn("sync_models.py:Printer")
    runner.wait_ready()
    for i in range(5):  # each time, not just when a flush timer happens to fire first
        runner.submit(f"last-{i}", {"n": 0})
        state = runner.wait_done(f"last-{i}")
        assert state.logs.endswith("last words"), state.logs
        assert state.deltas[-1]["status"] == "succeeded"


def test_fd_level_writes_go_to_the_runners_stdout_not_the_logs(spawn) -> None:
    runner = spawn("sync_models.py:FdWriter")
    runner.wait_ready()
    runner.submit("fd", {"text": "marker-7"})
    state = runner.wait_done("fd")
    assert state.logs == "python-level marker-7\n"
    runner.wait_for(
        lambda: "fd-level marker-7\n" in runner.stdout, timeout_s=10, what="the stdout pipe"
    )
    assert "python-level marker-7" not in runner.stdout


def test_a_thread_started_by_the_model_logs_into_the_single_prediction(spawn) -> None:
    runner = spawn("sync_models.py:ThreadPrinter")
    runner.wait_ready()
    runner.submit("th", {"text": "hi"})
    assert runner.wait_done("th").logs == "from a thread: hi\n"


def test_logs_of_a_long_prediction_arrive_before_it_ends(spawn) -> None:
    runner = spawn("sync_models.py:Sleeper")
    runner.wait_ready()
    runner.submit("long", {"seconds": 120})
    state = runner.predictions["long"]
    runner.wait_for(lambda: state.logs == "sleeping\n", timeout_s=30, what="the log line")
    assert state.status == "processing"
    runner.cancel("long")
    runner.wait_done("long")


def test_setup_logs_stay_in_setup_result_not_the_first_prediction(spawn) -> None:
    runner = spawn("sync_models.py:Hello")
    setup = runner.wait_ready()
    assert "setup says hi" in setup["logs"]
    runner.submit("h1", {"text": "x"})
    state = runner.wait_done("h1")
    assert state.logs == ""
    assert all("logs_append" not in delta for delta in state.deltas)
    assert state.deltas[-1]["status"] == protocol.STATUS_SUCCEEDED
