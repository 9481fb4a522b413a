"""One runner handle: environment, output pipes, timeouts, Path outputs, exit decoding."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from pool_helpers import (
    fill_filesystem,
    fill_inodes,
    make_config,
    path_exists,
    pid_alive,
    running_pool,
    small_tmpfs,
    wait_until,
)

from coglet import protocol
from pool import runner as runner_module
from pool.config import project_root
from pool.manager import PoolManager
from pool.prediction import Prediction, PredictionRequest
from pool.runner import MAX_LINE_BYTES, RunnerHandle, Slot, describe_exit
from pool.supervisor import runner_gpus


async def submit(manager: PoolManager, **inputs: Any) -> Prediction:
    return await manager.submit(PredictionRequest(id=None, input=inputs))


def test_describe_exit() -> None:
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(-15) == "killed by SIGTERM"
    assert describe_exit(protocol.EXIT_SETUP_FAILED) == "exited with code 3 (setup failed)"
    assert describe_exit(1) == "exited with code 1"


def test_runner_gpus_per_gpu_and_cpu(tmp_path: Path) -> None:
    config = make_config(tmp_path, runners__gpus="0,1", runners__per_gpu=2)
    assert runner_gpus(config) == ["0", "0", "1", "1"]
    assert runner_gpus(make_config(tmp_path, runners__count=3)) == [None, None, None]


async def test_cpu_runner_env_and_working_dir(tmp_path: Path) -> None:
    config = make_config(tmp_path, runners__env={"EXTRA": "1"})
    async with running_pool(config) as manager:
        p = await submit(manager)
        await p.wait(30)
        workdir = Path(manager.state_dir, "runner-0")
        runner_config = json.loads((workdir / protocol.CONFIG_FILE).read_text())
    assert p.status == "succeeded"
    # CPU-only runners see no GPU: CUDA_VISIBLE_DEVICES is set, and empty.
    assert json.loads(p.output)["cuda"] == ""
    assert runner_config["predictor_ref"] == "predict.py:Predictor"
    assert runner_config["max_concurrency"] == 1


async def test_fd_output_goes_to_the_single_running_prediction(tmp_path: Path) -> None:
    async with running_pool(make_config(tmp_path)) as manager:
        p = await submit(manager, shout="from C code, say")
        await p.wait(30)
    assert "from C code, say\n" in p.logs


async def test_timeout_cancels_and_fails_the_prediction(tmp_path: Path) -> None:
    config = make_config(tmp_path, runners__predict_timeout_s=0.5)
    async with running_pool(config) as manager:
        # Steps: a prediction sleeps past the timeout; the runner honours the cancel.
        slow = await submit(manager, sleep_s=60)
        await slow.wait(30)
        await wait_until(lambda: manager.free_slots() == 1, what="slot freed by the runner")
        restarts = manager.health()["runners"][0]["restarts"]
        after = await submit(manager, n=1)
        await after.wait(30)
    # Result: failed with Cog's message; the runner was not restarted and serves on.
    assert slow.status == "failed" and slow.error == "Prediction timed out"
    assert restarts == 0
    assert after.status == "succeeded"


async def test_timeout_kills_a_runner_that_ignores_the_cancel(tmp_path: Path) -> None:
    config = make_config(tmp_path, runners__predict_timeout_s=0.5, runners__cancel_grace_s=0.5)
    async with running_pool(config) as manager:
        # Steps: the model swallows CancelationException; after the grace the pool kills it.
        stubborn = await submit(manager, sleep_s=60, stubborn=True)
        await stubborn.wait(30)
        await wait_until(
            lambda: manager.health()["runners"][0]["restarts"] == 1 and manager.status == "READY",
            what="runner killed and restarted",
        )
        after = await submit(manager, n=1)
        await after.wait(30)
    assert stubborn.status == "failed" and stubborn.error == "Prediction timed out"
    assert after.status == "succeeded"


async def test_path_output_becomes_a_data_uri_before_completion(tmp_path: Path) -> None:
    seen_at_completion: list[Any] = []
    async with running_pool(make_config(tmp_path, "file_out")) as manager:
        p = await submit(manager, text="hi there")
        p.add_listener(
            lambda pred, event: (
                seen_at_completion.append(pred.output) if event == "completed" else None
            )
        )
        await p.wait(30)
    assert p.status == "succeeded", p.error
    assert isinstance(p.output, str) and p.output.startswith("data:text/plain")
    assert base64.b64decode(p.output.split(",", 1)[1]) == b"hi there"
    assert seen_at_completion == [p.output]


async def test_a_returned_file_object_is_encoded_and_its_temporary_copy_removed(
    tmp_path: Path,
) -> None:
    runner_tmp = tmp_path / "runner-tmp"
    runner_tmp.mkdir()
    config = make_config(tmp_path, "file_obj_out", runners__env={"TMPDIR": str(runner_tmp)})
    async with running_pool(config) as manager:
        p = await submit(manager, text="from a buffer")
        await p.wait(30)
        # The copy lives in the runner's private temporary root, not in the model's TMPDIR,
        # and is removed (in a worker thread) once the prediction is complete.
        temp_dir = manager._supervisor.runners[0].temp_dir
        await wait_until(lambda: os.listdir(temp_dir) == [], what="the spilled copy removed")
        in_model_tmp = [path.name for path in runner_tmp.iterdir()]
    assert p.status == "succeeded", p.error
    assert p.output.startswith("data:text/plain")
    assert base64.b64decode(p.output.split(",", 1)[1]) == b"from a buffer"
    assert in_model_tmp == []


async def test_default_state_dir_is_private_and_removed(tmp_path: Path) -> None:
    config = make_config(tmp_path, state_dir=None)
    async with running_pool(config) as manager:
        state_dir = manager.state_dir
        assert path_exists(os.path.join(state_dir, "runner-0"), is_dir=True)
        if path_exists("/dev/shm", is_dir=True):
            assert state_dir.startswith("/dev/shm/")
    assert not path_exists(state_dir)


def test_project_root_holds_the_packages() -> None:
    assert os.path.isfile(os.path.join(project_root(), "coglet", "protocol.py"))


async def test_many_quick_predictions_keep_order_of_deltas(tmp_path: Path) -> None:
    # Each prediction's response files are applied strictly in epoch order: every one of
    # many quick predictions ends with its own output and one start.
    async with running_pool(make_config(tmp_path, runners__count=2)) as manager:
        starts: dict[str, int] = {}

        def count(pred: Prediction, event: str) -> None:
            if event == "start":
                starts[pred.id] = starts.get(pred.id, 0) + 1

        predictions = []
        for i in range(40):
            p = await submit(manager, n=i)
            p.add_listener(count)
            predictions.append(p)
        await asyncio.gather(*(p.wait(30) for p in predictions))
    assert [json.loads(p.output)["n"] for p in predictions] == list(range(40))
    assert all(starts.get(p.id, 0) <= 1 for p in predictions)


class _Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self._log_fd = None  # no coglet log channel: every line is the model's

    def _on_output_line(self, line: str) -> None:
        self.lines.append(line)


def test_fd_output_lines_end_at_newline_or_bare_return_and_stay_bounded() -> None:
    sink = _Lines()
    buf = bytearray(b"a\r\nb 10%\rb 20%\rdone\npartial")
    RunnerHandle._emit_lines(sink, 1, buf, final=False)  # type: ignore[arg-type]
    assert sink.lines == ["a", "b 10%", "b 20%", "done"] and buf == b"partial"
    RunnerHandle._emit_lines(sink, 1, buf, final=True)  # type: ignore[arg-type]
    assert sink.lines[-1] == "partial" and buf == b""
    # A line with no end at all is cut at MAX_LINE_BYTES: the buffer never grows past it.
    buf = bytearray(b"x" * (MAX_LINE_BYTES + 10))
    RunnerHandle._emit_lines(sink, 1, buf, final=False)  # type: ignore[arg-type]
    assert len(sink.lines[-1]) == MAX_LINE_BYTES and len(buf) == 10


# --- large responses, failed writes, the runner's own log lines (issue 7: 2, 3, 6) -----------
async def test_an_output_larger_than_a_small_tmpfs_state_dir_succeeds(tmp_path: Path) -> None:
    # Steps: the state dir is a 4 MiB tmpfs (a small /dev/shm); the model returns 8 MiB.
    with small_tmpfs(tmp_path / "shm") as shm:
        config = make_config(tmp_path, "proc", state_dir=str(shm / "state"))
        async with running_pool(config) as manager:
            p = await submit(manager, big_mb=8)
            await p.wait(60)
            temp_dir = manager._supervisor.runners[0].temp_dir
            left = os.listdir(temp_dir)
    # Result: the delta went through the runner's temp root on disk, and was removed after.
    assert p.status == "succeeded", p.error
    assert p.output == "x" * (8 * 1024 * 1024)
    assert left == []


async def test_an_input_larger_than_a_small_tmpfs_state_dir_reaches_the_model(
    tmp_path: Path,
) -> None:
    # Steps: the state dir is a 4 MiB tmpfs; the input is an 8 MiB string.
    with small_tmpfs(tmp_path / "shm") as shm:
        config = make_config(tmp_path, "proc", state_dir=str(shm / "state"))
        async with running_pool(config) as manager:
            p = await submit(manager, text="t" * (8 * 1024 * 1024))
            await p.wait(60)
            left = os.listdir(manager._supervisor.runners[0].temp_dir)
    # Result: the request went through the runner's temp root on disk, removed once read.
    assert p.status == "succeeded", p.error
    assert p.output == 8 * 1024 * 1024
    assert left == []


async def test_setup_logs_larger_than_a_small_tmpfs_state_dir_are_cut_not_fatal(
    tmp_path: Path,
) -> None:
    # Steps: the state dir is a 4 MiB tmpfs; setup() prints 8 MiB.
    with small_tmpfs(tmp_path / "shm") as shm:
        config = make_config(tmp_path, "loud_setup", state_dir=str(shm / "state"))
        async with running_pool(config) as manager:
            setup = manager.health()["setup"]
            p = await submit(manager)
            await p.wait(30)
    # Result: setup succeeded; its logs keep their end, behind a marker saying what was cut.
    assert setup["status"] == "succeeded"
    assert setup["logs"].startswith("[") and "characters of setup logs cut]" in setup["logs"]
    assert setup["logs"].endswith("setup done\n")
    assert p.status == "succeeded"


async def test_a_response_that_cannot_be_written_fails_the_prediction_not_the_slot(
    tmp_path: Path,
) -> None:
    # Steps: state dir on a 4 MiB tmpfs; a prediction runs; the tmpfs fills up meanwhile, so
    # the runner cannot write its response, not even a failure notice.
    with small_tmpfs(tmp_path / "shm") as shm:
        config = make_config(tmp_path, "proc", state_dir=str(shm / "state"))
        async with running_pool(config) as manager:
            p = await submit(manager, sleep_s=1.0, say="working")
            await wait_until(lambda: "working" in p.logs, what="prediction running")
            await asyncio.to_thread(fill_filesystem, shm / "filler")
            await p.wait(30)
            status, error = p.status, p.error or ""
            # Result: the prediction failed, naming the cause; the slot was freed, and once
            # there is room again a fresh runner serves.
            (shm / "filler").unlink()
            await wait_until(lambda: manager.status == "READY", what="runner back")
            after = await submit(manager)
            await after.wait(30)
    assert status == "failed"
    assert "could not write a response" in error, error
    assert after.status == "succeeded", after.error


async def test_coglet_lines_go_to_the_pool_log_not_the_prediction_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    # Steps: as above, the runner cannot write a response while one prediction runs, and
    # says so in its own log line (response_write_failed).
    with small_tmpfs(tmp_path / "shm") as shm:
        config = make_config(tmp_path, "proc", state_dir=str(shm / "state"))
        async with running_pool(config) as manager:
            p = await submit(manager, sleep_s=1.0, say="working")
            await wait_until(lambda: "working" in p.logs, what="prediction running")
            await asyncio.to_thread(fill_filesystem, shm / "filler")
            await wait_until(
                lambda: "response_write_failed" in caplog.text + p.logs,
                what="the runner's response_write_failed line",
            )
            await p.wait(30)
            (shm / "filler").unlink()
    # Result: the line is in the pool's log, attributed to the runner, not in the user's logs.
    assert "response_write_failed" not in p.logs, p.logs
    assert "working" in p.logs
    lines = [r.getMessage() for r in caplog.records if "response_write_failed" in r.getMessage()]
    assert lines and lines[0].startswith("runner_log runner=0 "), lines


async def test_a_large_response_is_read_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    real_load = runner_module._load_delta_file

    def recording_load(path: str) -> dict[str, Any]:
        threads.append(threading.current_thread().name)
        return real_load(path)

    monkeypatch.setattr(runner_module, "_load_delta_file", recording_load)
    # Steps: a 3 MiB output (above the spill size); a small one.
    config = make_config(tmp_path, "proc")
    async with running_pool(config) as manager:
        big = await submit(manager, big_mb=3)
        await big.wait(60)
        small = await submit(manager)
        await small.wait(30)
    # Result: the big delta was read and parsed in a worker thread, never on the loop's
    # thread; the small one took the inline path; both came through whole.
    assert big.output == "x" * (3 * 1024 * 1024) and small.output == "ok"
    assert len(threads) == 1 and threads[0] != threading.main_thread().name, threads


# --- what the runner leaves behind (issue 7: 9, 10) ---------------------------------------------
def _kill_if_alive(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


async def test_a_models_child_dies_with_its_runner_on_kill_9(tmp_path: Path) -> None:
    config = make_config(tmp_path, "proc")
    async with running_pool(config) as manager:
        # Steps: the model starts a child (sleep 300) and returns; kill -9 the runner.
        p = await submit(manager, child=True)
        await p.wait(30)
        child = int(p.output)
        try:
            assert pid_alive(child)
            os.kill(manager.runners[0]["pid"], signal.SIGKILL)
            # Result: the model's child is gone too, and the runner comes back.
            await wait_until(lambda: not pid_alive(child), what="the model's child gone")
            await wait_until(lambda: manager.status == "READY", what="runner restarted")
        finally:
            _kill_if_alive(child)


async def test_a_models_child_dies_with_its_runner_on_clean_shutdown(tmp_path: Path) -> None:
    config = make_config(tmp_path, "proc")
    async with running_pool(config) as manager:
        # Steps: the model starts a child (sleep 300) and returns; then the pool shuts down.
        p = await submit(manager, child=True)
        await p.wait(30)
        child = int(p.output)
        assert pid_alive(child)
    # Result: the runner exited on its stop file, and its child did not outlive it.
    try:
        await wait_until(lambda: not pid_alive(child), what="the model's child gone")
    finally:
        _kill_if_alive(child)


async def test_a_path_the_model_returns_is_never_deleted(tmp_path: Path) -> None:
    own = tmp_path / "model-files"
    config = make_config(tmp_path, "proc")
    async with running_pool(config) as manager:
        # Steps: the model returns a Path of its own, in a dir named cog-output-mine.
        p = await submit(manager, own_file_in=str(own))
        await p.wait(30)
    # Result: the output is the file's content, and the model's file and dir are still there.
    assert p.status == "succeeded", p.error
    assert base64.b64decode(p.output.split(",", 1)[1]) == b"mine"
    assert path_exists(str(own / "cog-output-mine" / "keep.txt"))


async def test_a_cancel_that_cannot_be_written_still_frees_the_slot(tmp_path: Path) -> None:
    # Steps: the state dir is a tmpfs with few inodes; a long prediction runs; the inodes run
    # out; the prediction is canceled (the cancel file cannot be created).
    with small_tmpfs(tmp_path / "shm", nr_inodes=64) as shm:
        config = make_config(
            tmp_path, "proc", state_dir=str(shm / "state"), runners__cancel_grace_s=0.5
        )
        async with running_pool(config) as manager:
            p = await submit(manager, sleep_s=120, say="working")
            await wait_until(lambda: "working" in p.logs, what="prediction running")
            await asyncio.to_thread(fill_inodes, shm / "filler")
            assert await manager.cancel(p.id)
            # Result: the runner is killed after the cancel grace, which ends the prediction
            # and frees its slot; with inodes back, a fresh runner serves.
            await p.wait(30)
            await asyncio.to_thread(shutil.rmtree, shm / "filler")
            await wait_until(lambda: manager.status == "READY", what="runner back")
    assert p.status in ("failed", "canceled") and p.done


def _handle_with_slot(tmp_path: Path) -> tuple[RunnerHandle, Prediction]:
    """A runner handle (no process) holding one prediction in flight, epoch 0 next."""
    config = make_config(tmp_path, "proc")
    handle = RunnerHandle(
        0, None, config, str(tmp_path / "state"), wake=lambda: None, temp_root=str(tmp_path)
    )
    os.makedirs(handle.working_dir)
    os.makedirs(handle.temp_dir)
    prediction = Prediction(PredictionRequest(id="p1", input={}))
    handle.slots["p1"] = Slot(prediction=prediction, dispatched_at=0.0)
    return handle, prediction


async def test_a_delta_file_outside_the_runners_temp_root_is_neither_read_nor_removed(
    tmp_path: Path,
) -> None:
    handle, prediction = _handle_with_slot(tmp_path)
    outside = tmp_path / "not-the-runners.json"
    outside.write_text('{"status": "succeeded", "output": "stolen"}')
    # Steps: the runner's response points the pool at a file outside its temporary root.
    protocol.write_json_atomic(
        os.path.join(handle.working_dir, protocol.response_name("p1", 0)),
        {"status": "succeeded", protocol.DELTA_FILE_KEY: str(outside)},
    )
    handle.scan()
    # Result: the prediction fails as a bad response; the file is untouched.
    assert prediction.status == "failed" and prediction.output is None
    assert "outside" in (prediction.error or "")
    assert path_exists(str(outside))


async def test_a_spilled_delta_is_applied_in_epoch_order_and_removed(tmp_path: Path) -> None:
    handle, prediction = _handle_with_slot(tmp_path)
    spilled = Path(handle.temp_dir) / "delta-p1-0.json"
    spilled.write_text('{"status": "processing", "logs_append": "first\\n"}')
    # Steps: epoch 0 is spilled (read in a thread), epoch 1 is inline and comes right after.
    for epoch, delta in enumerate(
        [
            {"status": "processing", protocol.DELTA_FILE_KEY: str(spilled)},
            {"status": "succeeded", "logs_append": "second\n", "output": "done"},
        ]
    ):
        protocol.write_json_atomic(
            os.path.join(handle.working_dir, protocol.response_name("p1", epoch)), delta
        )
    handle.scan()
    await prediction.wait(10)
    # Result: both applied, in order; the spilled file is gone.
    assert prediction.logs == "first\nsecond\n" and prediction.output == "done"
    assert not path_exists(str(spilled))
async def test_train_ref_reaches_the_runner(tmp_path: Path) -> None:
    """cog.yaml train: (model.train) goes to each runner as config.json train_ref."""
    config = make_config(
        tmp_path,
        model=str(Path(project_root(), "tests", "models", "compat")),
        model__predict="train.py:Predictor",
        model__train="train.py:train",
    )
    async with running_pool(config) as manager:
        workdir = Path(manager.state_dir, "runner-0")
        runner_config = json.loads((workdir / protocol.CONFIG_FILE).read_text())
        setup = json.loads((workdir / protocol.SETUP_RESULT_FILE).read_text())
    assert runner_config["train_ref"] == "train.py:train"
    assert setup["features"]["training"] is True


async def test_a_healthchecks_prints_stay_out_of_the_running_predictions_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    config = make_config(tmp_path, "health")

    def checks() -> int:
        return caplog.text.count("healthcheck ran")

    async with running_pool(config) as manager:
        before = checks()
        # Steps: one prediction runs for longer than the healthcheck interval (5 s), so the
        # runner's healthcheck() prints while it is the only prediction in flight.
        p = await submit(manager, sleep_s=6.5)
        await p.wait(30)
        during = checks() - before + p.logs.count("healthcheck ran")
    # Result: a check ran meanwhile; its print is in the pool's log as the runner's, not in
    # the prediction's logs.
    assert during >= 1
    assert "healthcheck ran" not in p.logs and "predicting" in p.logs
    assert checks() > before
