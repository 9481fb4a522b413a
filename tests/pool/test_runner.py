"""One runner handle: environment, output pipes, timeouts, Path outputs, exit decoding."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path
from typing import Any

from pool_helpers import make_config, path_exists, running_pool, wait_until

from coglet import protocol
from pool.config import project_root
from pool.manager import PoolManager
from pool.prediction import Prediction, PredictionRequest
from pool.runner import MAX_LINE_BYTES, RunnerHandle, describe_exit
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
        left = [path.name for path in runner_tmp.iterdir()]
    assert p.status == "succeeded", p.error
    assert p.output.startswith("data:text/plain")
    assert base64.b64decode(p.output.split(",", 1)[1]) == b"from a buffer"
    assert left == []  # the runner's spilled copy is gone


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

    def _on_output_line(self, line: str) -> None:
        self.lines.append(line)


def test_fd_output_lines_end_at_newline_or_bare_return_and_stay_bounded() -> None:
    sink = _Lines()
    buf = bytearray(b"a\r\nb 10%\rb 20%\rdone\npartial")
    RunnerHandle._emit_lines(sink, buf, final=False)  # type: ignore[arg-type]
    assert sink.lines == ["a", "b 10%", "b 20%", "done"] and buf == b"partial"
    RunnerHandle._emit_lines(sink, buf, final=True)  # type: ignore[arg-type]
    assert sink.lines[-1] == "partial" and buf == b""
    # A line with no end at all is cut at MAX_LINE_BYTES: the buffer never grows past it.
    buf = bytearray(b"x" * (MAX_LINE_BYTES + 10))
    RunnerHandle._emit_lines(sink, buf, final=False)  # type: ignore[arg-type]
    assert len(sink.lines[-1]) == MAX_LINE_BYTES and len(buf) == 10


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
