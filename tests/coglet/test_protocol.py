"""The protocol's files on the runner's side: large deltas spill, failed writes, reading memory."""

from __future__ import annotations

import json
import os
import subprocess
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from coglet import protocol
from coglet.responder import RawText, Responder
from tests.coglet.harness import PredictionState, RunnerHarness


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (the suite runs as root), unmounted after."""
    path = tmp_path / "tmpfs"
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, f"cannot mount a tmpfs (needs root): {done.stderr}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path: Path) -> None:
    with open(path, "wb", buffering=0) as f:
        for size in (65536, 512, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass


def _responder(working_dir: Path, spill_dir: Path | None = None) -> Responder:
    options: dict[str, Any] = {} if spill_dir is None else {"spill_dir": str(spill_dir)}
    return Responder(
        str(working_dir),
        "p1",
        notify=lambda: None,
        schedule_flush=lambda responder, delay_s: None,
        late_log=lambda text: None,
        **options,
    )


def _response(working_dir: Path, epoch: int) -> Any:
    return protocol.read_json(str(working_dir / protocol.response_name("p1", epoch)))


def test_a_delta_larger_than_the_spill_size_goes_to_the_temp_root(
    tmpfs: Path, tmp_path: Path
) -> None:
    spill = tmp_path / "runner-tmp"
    spill.mkdir()
    # Steps: a 2 MiB output, with the working dir on a 1 MiB tmpfs.
    responder = _responder(tmpfs, spill)
    responder.finish(protocol.STATUS_SUCCEEDED, output_json=json.dumps("y" * (2 << 20)))
    # Result: the response file points to the delta on disk, which holds the whole output.
    pointer = _response(tmpfs, 0)
    assert pointer == {
        "status": "succeeded",
        protocol.DELTA_FILE_KEY: str(spill / "delta-p1-0.json"),
    }
    assert protocol.read_json_file(pointer[protocol.DELTA_FILE_KEY])["output"] == "y" * (2 << 20)


def test_a_terminal_delta_that_cannot_be_written_becomes_a_failure_notice(tmpfs: Path) -> None:
    # Steps: a 2 MiB output, on a 1 MiB tmpfs, nowhere to spill.
    responder = _responder(tmpfs)
    responder.finish(protocol.STATUS_SUCCEEDED, output_json=json.dumps("y" * (2 << 20)))
    # Result: epoch 0 is a short "failed" delta naming the error; no temp file is left.
    delta = _response(tmpfs, 0)
    assert delta["status"] == "failed"
    assert "could not write this prediction's response" in delta["error"]
    assert "No space left on device" in delta["error"]
    assert delta[protocol.ERROR_TYPE_KEY] == "OSError"
    assert sorted(os.listdir(tmpfs)) == [protocol.response_name("p1", 0)]


def test_a_failed_flush_keeps_its_epoch_and_its_logs(tmpfs: Path) -> None:
    responder = _responder(tmpfs)
    # Steps: logs are pending; the tmpfs is full, so the flush fails; room comes back.
    responder.append_log("line 1\n")
    _fill(tmpfs / "filler")
    with pytest.raises(OSError):
        responder.flush()
    (tmpfs / "filler").unlink()
    responder.finish(protocol.STATUS_SUCCEEDED, output_json='"done"')
    # Result: the terminal delta is epoch 0 (no epoch was skipped) and carries the logs.
    assert _response(tmpfs, 0) == {
        "status": "succeeded",
        "logs_append": "line 1\n",
        "output": "done",
    }


def test_when_not_even_the_failure_notice_fits_finish_raises(tmpfs: Path) -> None:
    responder = _responder(tmpfs)
    _fill(tmpfs / "filler")
    # The runner exits (EXIT_RESPONSE_WRITE_FAILED) on this, so the pool never waits for it.
    with pytest.raises(OSError):
        responder.finish(protocol.STATUS_SUCCEEDED, output_json='"done"')
    assert responder.done


def test_reading_a_large_response_holds_at_most_twice_its_size(tmp_path: Path) -> None:
    path = tmp_path / "response.json"
    size = 20 << 20
    path.write_text(json.dumps({"status": "succeeded", "output": "z" * size}))
    tracemalloc.start()
    try:
        delta = protocol.read_json(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert delta["output"] == "z" * size
    # The bytes, the text and the value never all live at once (json.loads(bytes) would).
    assert peak <= 2.1 * size, f"peak {peak / size:.2f}x the response size"


def test_a_large_request_is_read_from_the_runners_temp_root_and_removed(
    spawn: Callable[..., RunnerHarness], tmp_path: Path
) -> None:
    temp_dir = tmp_path / "runner-tmp"
    temp_dir.mkdir()
    config = {"predictor_ref": "sync_models.py:Hello", "max_concurrency": 1}
    runner = spawn("sync_models.py:Hello", config={**config, "temp_dir": str(temp_dir)})
    runner.wait_ready()
    # Steps: a 2 MiB request, written as the pool does (spilled, with a pointer).
    text = "w" * (2 << 20)
    body = json.dumps({"id": "p1", "input": {"text": text}, "stream": False}).encode()
    runner.predictions["p1"] = PredictionState("p1")
    runner._next_epoch["p1"] = 0
    protocol.write_request(runner.working_dir, "p1", body, spill_dir=str(temp_dir))
    assert os.listdir(temp_dir) == [protocol.request_name("p1")]
    runner.send(protocol.SIG_RESCAN)
    state = runner.wait_done("p1")
    # Result: the model saw the whole input; the spilled request is gone.
    assert state.status == "succeeded" and state.output == "hello " + text
    assert os.listdir(temp_dir) == []


def test_a_request_pointing_elsewhere_is_refused_and_left_alone(
    spawn: Callable[..., RunnerHarness], tmp_path: Path
) -> None:
    elsewhere = tmp_path / "request-p1.json"
    elsewhere.write_text('{"id": "p1", "input": {"text": "x"}}')
    runner = spawn("sync_models.py:Hello")
    runner.wait_ready()
    # Steps: a request file that points the runner at a file outside its temporary root.
    runner.submit("p1", {}, body={"id": "p1", protocol.REQUEST_FILE_KEY: str(elsewhere)})
    state = runner.wait_done("p1")
    # Result: the prediction fails naming the problem; the file is neither read nor removed.
    assert state.status == "failed" and "is not this runner's" in (state.error or "")
    assert elsewhere.exists()


def test_a_large_string_output_is_spilled_raw_and_read_back_exactly(tmp_path: Path) -> None:
    spill = tmp_path / "runner-tmp"
    spill.mkdir()
    # Multi-byte characters across the reader's 1 MiB slices, and a lone surrogate.
    text = ("é€😀a" * (1 << 18)) + "\ud800" + "end"
    responder = _responder(tmp_path, spill)
    responder.append_log("a log line\n")
    responder.finish(protocol.STATUS_SUCCEEDED, output_json=RawText(text))
    pointer = _response(tmp_path, 0)
    raw = Path(pointer[protocol.DELTA_FILE_KEY]).read_bytes()
    head, _, body = raw.partition(b"\n")
    # The file: the delta's JSON head (no "output"), a newline, the string as UTF-8.
    assert json.loads(head) == {
        "status": "succeeded",
        "logs_append": "a log line\n",
        protocol.RAW_OUTPUT_KEY: True,
    }
    assert body == text.encode("utf-8", "surrogatepass")
    assert protocol.read_delta_file(pointer[protocol.DELTA_FILE_KEY]) == {
        "status": "succeeded",
        "logs_append": "a log line\n",
        "output": text,
    }


def test_reading_a_raw_string_delta_holds_at_most_twice_its_size(tmp_path: Path) -> None:
    path = tmp_path / "delta-p1-0.json"
    size = 20 << 20
    path.write_bytes(b'{"status":"succeeded","output_raw":true}\n' + b"r" * size)
    tracemalloc.start()
    try:
        delta = protocol.read_delta_file(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert delta == {"status": "succeeded", "output": "r" * size}
    assert peak <= 2.1 * size, f"peak {peak / size:.2f}x the delta's size"


def test_a_raw_string_kept_as_slices_is_held_once(tmp_path: Path) -> None:
    path = tmp_path / "delta-p1-0.json"
    size = 20 << 20
    path.write_bytes(b'{"status":"succeeded","output_raw":true}\n' + b"r" * size)
    # Steps: read it, keeping the output as the slices it was decoded in (the pool's way).
    tracemalloc.start()
    try:
        delta = protocol.read_delta_file(str(path), text=list)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Result: the file was never whole in memory: the slices, plus the few being read and
    # decoded (before: the file's bytes, then the slices, then their join: 2x).
    assert "".join(delta["output"]) == "r" * size
    assert max(len(s) for s in delta["output"]) <= 1 << 20
    assert peak <= size + (5 << 20), f"peak {peak / size:.2f}x the delta's size"


def test_a_raw_delta_whose_head_is_over_a_slice_is_read_whole(tmp_path: Path) -> None:
    # The head carries 1.5 MiB of logs: its newline lies in the reader's second slice.
    logs = "l" * (3 << 19)
    text = "é" * (1 << 20) + "end"
    head = json.dumps({"status": "succeeded", "logs_append": logs, "output_raw": True})
    path = tmp_path / "delta-p1-0.json"
    path.write_bytes(head.encode() + b"\n" + text.encode())
    delta = protocol.read_delta_file(str(path))
    assert delta == {"status": "succeeded", "logs_append": logs, "output": text}


def test_a_raw_string_without_its_marker_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "delta-p1-0.json"
    path.write_bytes(b'{"status":"succeeded"}\nnot announced')
    with pytest.raises(ValueError, match="output_raw"):
        protocol.read_delta_file(str(path))


def test_a_processing_delta_carries_the_metrics_once_they_changed(tmp_path: Path) -> None:
    from cog.scope import MetricRecorder

    responder = _responder(tmp_path)
    recorded = MetricRecorder()
    responder.watch_metrics(recorded)
    recorded.record("tokens", 1, "incr")
    recorded.record("steps", 1, "append")
    responder.append_output("1")
    responder.flush()
    assert _response(tmp_path, 0)["metrics"] == {"tokens": 1, "steps": [1]}
    responder.append_output("2")
    responder.flush()
    assert "metrics" not in _response(tmp_path, 1)  # unchanged: not sent again
    recorded.record("steps", 2, "append")  # a change inside a list counts too
    responder.append_output("3")
    responder.flush()
    assert _response(tmp_path, 2)["metrics"] == {"tokens": 1, "steps": [1, 2]}
