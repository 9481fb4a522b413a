"""The runner's lifecycle: config, setup, READY, stop, SIGTERM, parent death (real processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

from coglet import protocol
from tests.coglet.harness import PROJECT_ROOT, RunnerHarness, wait_until


def test_missing_config_exits_bad_config_with_a_message(spawn) -> None:
    runner = spawn("sync_models.py:Hello", write_config=False)
    assert runner.wait_exit() == protocol.EXIT_BAD_CONFIG
    assert "config.json: missing" in runner.stderr
    assert not os.path.exists(runner.path(protocol.SETUP_RESULT_FILE))


def test_malformed_config_exits_bad_config(spawn) -> None:
    runner = spawn("x", config={"predictor_ref": 7, "max_concurrency": 1})
    assert runner.wait_exit() == protocol.EXIT_BAD_CONFIG
    assert "predictor_ref must be a string" in runner.stderr

    runner = spawn("x", config={"predictor_ref": "p.py:P", "max_concurrency": 0})
    assert runner.wait_exit() == protocol.EXIT_BAD_CONFIG
    assert "max_concurrency must be an integer >= 1" in runner.stderr


def test_setup_succeeds_writes_schema_result_and_signals_ready(spawn) -> None:
    runner = spawn("sync_models.py:Hello")
    result = runner.wait_ready()

    assert result["status"] == "succeeded"
    assert result["started_at"] <= result["completed_at"]
    assert "setup says hi\n" in result["logs"]  # print() during setup
    assert "INFO:hello:setup logged\n" in result["logs"]  # logging during setup
    schema = protocol.read_json(runner.path(protocol.OPENAPI_FILE))
    assert schema["components"]["schemas"]["Input"]["properties"]["text"]["type"] == "string"
    runner.wait_for(
        lambda: runner.signals.counts[protocol.SIG_READY] > 0, timeout_s=10, what="SIG_READY"
    )
    assert runner.proc.poll() is None


def test_definition_error_fails_setup_with_cogs_message(spawn) -> None:
    runner = spawn("setup_models.py:MissingAnnotation")
    assert runner.wait_exit() == protocol.EXIT_SETUP_FAILED
    result = protocol.read_json(runner.path(protocol.SETUP_RESULT_FILE))
    assert result["status"] == "failed"
    assert "missing type annotation for input: s" in result["error"]


def test_unknown_predictor_file_fails_setup(spawn) -> None:
    runner = spawn("no_such_file.py:Predictor")
    assert runner.wait_exit() == protocol.EXIT_SETUP_FAILED
    result = protocol.read_json(runner.path(protocol.SETUP_RESULT_FILE))
    assert result["status"] == "failed" and result["error"]


def test_setup_exception_fails_setup_with_message_and_traceback(spawn) -> None:
    runner = spawn("setup_models.py:SetupRaises")
    assert runner.wait_exit() == protocol.EXIT_SETUP_FAILED
    result = protocol.read_json(runner.path(protocol.SETUP_RESULT_FILE))
    assert result["status"] == "failed"
    assert result["error"] == "weights are missing"
    assert "loading weights\n" in result["logs"]
    assert "Traceback (most recent call last)" in result["logs"]
    assert "RuntimeError: weights are missing" in result["logs"]
    # The schema was written before setup() ran.
    assert os.path.exists(runner.path(protocol.OPENAPI_FILE))


def test_setup_that_exits_leaves_no_setup_result(spawn) -> None:
    runner = spawn("setup_models.py:SetupExits")
    assert runner.wait_exit() == 7
    assert not os.path.exists(runner.path(protocol.SETUP_RESULT_FILE))


def test_stop_file_exits_zero_when_idle(spawn) -> None:
    runner = spawn("sync_models.py:Hello")
    runner.wait_ready()
    assert runner.stop() == protocol.EXIT_OK
    assert "runner_exit reason=stopped code=0" in runner.stderr


def test_sigterm_stops_like_the_stop_file(spawn) -> None:
    runner = spawn("sync_models.py:Hello")
    runner.wait_ready()
    runner.send(signal.SIGTERM)
    assert runner.wait_exit() == protocol.EXIT_OK
    assert "runner_stopping reason=sigterm" in runner.stderr


def test_busy_then_ready_hints_around_a_long_prediction(spawn) -> None:
    runner = spawn("sync_models.py:Sleeper")
    runner.wait_ready()
    ready_before = runner.signals.counts[protocol.SIG_READY]
    busy_before = runner.signals.counts[protocol.SIG_BUSY]
    runner.submit("long", {"seconds": 120})
    runner.wait_for(
        lambda: runner.signals.counts[protocol.SIG_BUSY] > busy_before,
        timeout_s=10,
        what="SIG_BUSY while the only slot is taken",
    )
    runner.cancel("long")
    assert runner.wait_done("long").status == "canceled"
    runner.wait_for(
        lambda: runner.signals.counts[protocol.SIG_READY] > ready_before,
        timeout_s=10,
        what="SIG_READY once the slot is free",
    )


def test_runner_has_its_own_session(spawn) -> None:
    runner = spawn("sync_models.py:Hello")
    runner.wait_ready()
    # A terminal's SIGINT/SIGHUP goes to its foreground process group, not to the runner.
    assert os.getsid(runner.pid) == runner.pid
    assert os.getsid(runner.pid) != os.getsid(0)


_INTERMEDIATE_PARENT = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    sys.path.insert(0, {root!r})
    from coglet import protocol
    workdir, model_dir, log_path = sys.argv[1:4]
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(sig, lambda *a: None)
    protocol.write_json_atomic(os.path.join(workdir, "config.json"),
                               {{"predictor_ref": "sync_models.py:Sleeper", "max_concurrency": 1}})
    with open(log_path, "wb") as log:
        child = subprocess.Popen([sys.executable, "-m", "coglet", "--working-dir", workdir],
                                 cwd=model_dir, stdout=log, stderr=log,
                                 env=dict(os.environ, PYTHONPATH={root!r}))
    print(child.pid, flush=True)
    while True:  # until killed; pause() returns after each handled signal
        signal.pause()
    """
).format(root=PROJECT_ROOT)


def test_runner_exits_when_its_parent_is_killed(tmp_path) -> None:
    """Steps: a parent process spawns a runner, which starts a long prediction; the parent is
    killed with SIGKILL. Result: the runner leaves on its own with EXIT_PARENT_DIED."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    log_path = tmp_path / "runner.log"
    from tests.coglet.conftest import RUNNER_MODELS

    parent = subprocess.Popen(
        [sys.executable, "-c", _INTERMEDIATE_PARENT, str(workdir), RUNNER_MODELS, str(log_path)],
        stdout=subprocess.PIPE,
    )
    try:
        runner_pid = int(parent.stdout.readline())
        setup_path = workdir / protocol.SETUP_RESULT_FILE
        wait_until(setup_path.exists, timeout_s=60, what="the runner's setup")
        protocol.write_json_atomic(
            str(workdir / protocol.request_name("long-1")),
            {"id": "long-1", "input": {"seconds": 120}},
        )
        os.kill(runner_pid, protocol.SIG_RESCAN)
        wait_until(
            (workdir / protocol.response_name("long-1", 0)).exists,
            timeout_s=30,
            what="the prediction to start",
        )

        parent.kill()
        parent.wait(timeout=30)

        wait_until(lambda: not _alive(runner_pid), timeout_s=30, what="the orphaned runner to exit")
        wait_until(
            lambda: "reason=parent_died" in log_path.read_text(),
            timeout_s=10,
            what="the runner's exit line",
        )
        assert f"code={protocol.EXIT_PARENT_DIED}" in log_path.read_text()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody has reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_config_json_roundtrip_is_what_the_runner_reads(spawn) -> None:
    """The runner reads optional runner_index and logs it on its lifecycle lines."""
    runner = spawn("sync_models.py:Hello", runner_index=5)
    runner.wait_ready()
    runner.wait_stderr("runner_ready runner=5")
    assert json.loads(open(runner.path(protocol.CONFIG_FILE)).read())["runner_index"] == 5


def test_harness_is_reusable_as_a_context_manager() -> None:
    from tests.coglet.conftest import RUNNER_MODELS

    with RunnerHarness(RUNNER_MODELS, "sync_models.py:Hello") as runner:
        runner.wait_ready()
        runner.submit("ctx-1", {"text": "there"})
        assert runner.wait_done("ctx-1").output == "hello there"
    assert runner.proc.returncode is not None
    assert not os.path.exists(runner.working_dir)
