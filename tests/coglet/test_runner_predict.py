"""Predictions through a real runner: outputs, deltas, inputs, iterators, async concurrency."""

from __future__ import annotations

import os
import shutil

from coglet import protocol
from tests.coglet.harness import PROJECT_ROOT


def test_sync_prediction_epochs_output_and_metrics(spawn) -> None:
    runner = spawn("sync_models.py:Hello")
    runner.wait_ready()
    runner.submit("p1", {"text": "world"})
    state = runner.wait_done("p1")

    assert state.status == "succeeded"
    assert state.output == "hello world"
    assert state.error is None
    # Epoch 0 ("processing") is written only for a prediction still running when it is
    # announced; a quick one usually says everything in its terminal delta.
    assert state.deltas[-1]["status"] == "succeeded"
    assert all(d["status"] == "processing" for d in state.deltas[:-1])
    assert isinstance(state.metrics["predict_time"], float)
    assert state.metrics["predict_time"] >= 0
    # The request was consumed and every response read: nothing is left behind.
    assert runner.stray_files() == []


def test_ids_with_dashes_and_digits(spawn) -> None:
    runner = spawn("sync_models.py:Hello")
    runner.wait_ready()
    ids = ["abc-123-4", "7-1", "x.y_z-0", "A-1-2-3-4-5"]
    for prediction_id in ids:
        runner.submit(prediction_id, {"text": prediction_id})
        assert runner.wait_done(prediction_id).output == f"hello {prediction_id}"
    assert runner.stray_files() == []


def test_many_predictions_in_a_row_reuse_one_runner(spawn) -> None:
    runner = spawn("sync_models.py:Hello")
    runner.wait_ready()
    for i in range(30):
        runner.submit(f"seq-{i}", {"text": str(i)})
        assert runner.wait_done(f"seq-{i}").output == f"hello {i}"


def test_queued_sync_requests_run_one_after_another(spawn) -> None:
    runner = spawn("sync_models.py:Hello", max_concurrency=3)  # clamped to 1 for sync
    assert runner.wait_ready()["max_concurrency"] == 1  # the pool lowers its admission to it
    for i in range(5):
        runner.submit(f"q-{i}", {"text": str(i)}, signal_runner=False)
    runner.send(protocol.SIG_RESCAN)
    outputs = [runner.wait_done(f"q-{i}").output for i in range(5)]
    assert outputs == [f"hello {i}" for i in range(5)]
    runner.wait_stderr("concurrency_clamped max_concurrency=3 to=1")


def test_invalid_input_fails_with_cogs_message(spawn) -> None:
    runner = spawn("sync_models.py:Numbers")
    runner.wait_ready()
    runner.submit("bad-1", {"a": 0})
    state = runner.wait_done("bad-1")
    assert state.status == "failed"
    assert state.error == "invalid input value: a=0 fails constraint >= 1"

    runner.submit("bad-2", {})
    state = runner.wait_done("bad-2")
    assert state.status == "failed"
    assert state.error == "missing required input field: a"

    runner.submit("good", {"a": 2})  # an int for a float is coerced
    assert runner.wait_done("good").output == 2.5


def test_malformed_request_bodies_fail_that_prediction(spawn) -> None:
    runner = spawn("sync_models.py:Hello")
    runner.wait_ready()
    runner.submit("mismatch", {}, body={"id": "other", "input": {"text": "x"}})
    assert "does not match its file name" in runner.wait_done("mismatch").error
    runner.submit("not-object", {}, body={"id": "not-object", "input": [1, 2]})
    assert runner.wait_done("not-object").error == "input must be a JSON object"
    # ... and the runner keeps serving.
    runner.submit("after", {"text": "ok"})
    assert runner.wait_done("after").output == "hello ok"


def test_unknown_input_fields_warn_in_that_predictions_logs(spawn) -> None:
    runner = spawn("sync_models.py:Hello")
    runner.wait_ready()
    runner.submit("unk", {"text": "a", "colour": "red"})
    state = runner.wait_done("unk")
    assert state.status == "succeeded"
    assert "colour" in state.logs
    assert "unknown input field" in state.logs
    assert "colour" in state.deltas[0]["logs_append"]  # in the first update already


def test_failing_prediction_reports_error_and_traceback(spawn) -> None:
    runner = spawn("sync_models.py:Failing")
    runner.wait_ready()
    runner.submit("f1", {"text": "oops"})
    state = runner.wait_done("f1")
    assert state.status == "failed"
    assert state.error == "Prediction failed: Prediction failed: ValueError: bad text: oops"
    assert "about to fail\n" in state.logs
    assert "Traceback (most recent call last)" in state.logs
    assert "ValueError: bad text: oops" in state.logs
    assert "predict_time" in state.metrics


def test_scope_context_and_user_metrics(spawn) -> None:
    runner = spawn("sync_models.py:ScopeEcho")
    runner.wait_ready()
    runner.submit("s1", {"key": "tenant"}, context={"tenant": "acme"})
    state = runner.wait_done("s1")
    assert state.output == "acme"
    assert state.metrics["tokens"] == 42
    assert "predict_time" in state.metrics
    runner.submit("s2", {"key": "tenant"})  # no context: a fresh, empty scope
    assert runner.wait_done("s2").output == "<missing>"


def test_sync_iterator_streams_item_by_item(spawn, tmp_path) -> None:
    """Steps: the predictor yields item i, then waits for ack-i, written by the test only after
    it has read item i from a response file. Result: each item arrives on its own, in order,
    before the prediction ends (it could not end without the acks)."""
    runner = spawn("sync_models.py:Gated")
    runner.wait_ready()
    runner.submit("g1", {"gate_dir": str(tmp_path), "n": 3})
    state = runner.predictions["g1"]
    for i in range(3):
        runner.wait_for(
            lambda i=i: isinstance(state.output, list) and len(state.output) > i,
            timeout_s=30,
            what=f"item {i}",
        )
        assert state.output == [f"item-{j}" for j in range(i + 1)]
        assert not state.done
        (tmp_path / f"ack-{i}").touch()
    runner.wait_done("g1")
    assert state.status == "succeeded"
    assert state.output == ["item-0", "item-1", "item-2"]
    assert "yielding 2\n" in state.logs
    epochs_with_items = [d for d in state.deltas if d.get("output_append")]
    assert len(epochs_with_items) == 3  # one response file per item


def test_fast_iterator_items_all_arrive_in_order(spawn) -> None:
    runner = spawn("sync_models.py:Burst")
    runner.wait_ready()
    runner.submit("burst", {"n": 500})
    state = runner.wait_done("burst")
    assert state.status == "succeeded"
    assert state.output == list(range(500))


def test_empty_iterator_outputs_an_empty_list(spawn) -> None:
    runner = spawn("sync_models.py:Empty")
    runner.wait_ready()
    runner.submit("e1", {})
    state = runner.wait_done("e1")
    assert state.status == "succeeded"
    assert state.output == []


def test_async_predictions_run_concurrently(spawn) -> None:
    """Steps: three predictions each wait until all three have started. Result: all succeed,
    which they can only do if the runner ran them at the same time."""
    runner = spawn("async_models.py:Overlap", max_concurrency=3)
    setup = runner.wait_ready()
    assert "async setup ran" in setup["logs"]
    assert setup["max_concurrency"] == 3
    for tag in ("a", "b", "c"):
        runner.submit(f"ov-{tag}", {"tag": tag, "want": 3})
    states = [runner.wait_done(f"ov-{tag}") for tag in ("a", "b", "c")]
    assert [s.status for s in states] == ["succeeded"] * 3, [s.error for s in states]
    for tag, state in zip("abc", states, strict=True):
        assert state.output == f"{tag} ran with 3 started"
        # Logs are attributed per task even though the three interleave.
        assert state.logs == f"{tag} started\n{tag} finished\n"
        assert state.metrics["tag_len"] == 1


def test_async_capacity_queues_the_rest(spawn) -> None:
    """Steps: max_concurrency 2, three long predictions. Result: two start (print), the third
    waits; canceling one of the first two lets the third start."""
    runner = spawn("async_models.py:AsyncSleeper", max_concurrency=2)
    runner.wait_ready()
    for tag in ("a", "b", "c"):
        runner.submit(f"cap-{tag}", {"seconds": 120}, signal_runner=False)
    runner.send(protocol.SIG_RESCAN)

    def started() -> list[str]:
        return sorted(i for i, s in runner.predictions.items() if "sleeping" in s.logs)

    runner.wait_for(lambda: len(started()) >= 2, timeout_s=30, what="two starts")
    first_two = started()
    assert len(first_two) == 2
    (waiting,) = set(runner.predictions) - set(first_two)

    runner.cancel(first_two[0])
    assert runner.wait_done(first_two[0]).status == "canceled"
    runner.wait_for(lambda: waiting in started(), timeout_s=30, what="the third to start")
    assert not runner.predictions[first_two[1]].done


def test_async_iterator_streams(spawn, tmp_path) -> None:
    runner = spawn("async_models.py:AsyncGated", max_concurrency=2)
    runner.wait_ready()
    runner.submit("ag", {"gate_dir": str(tmp_path), "n": 2})
    state = runner.predictions["ag"]
    for i in range(2):
        runner.wait_for(
            lambda i=i: isinstance(state.output, list) and len(state.output) > i,
            timeout_s=30,
            what=f"async item {i}",
        )
        assert not state.done
        (tmp_path / f"ack-{i}").touch()
    assert runner.wait_done("ag").output == ["item-0", "item-1"]


def test_runner_never_writes_into_the_model_dir(spawn, tmp_path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(os.path.join(PROJECT_ROOT, "examples", "files"), model_dir)
    before = sorted(os.listdir(model_dir))
    source = tmp_path / "in.txt"
    source.write_text("abc", encoding="utf-8")
    runner = spawn("predict.py:Predictor", model_dir=str(model_dir))
    runner.wait_ready()
    runner.submit("m1", {"file": str(source)})
    assert runner.wait_done("m1").status == "succeeded"
    assert runner.stop() == 0
    assert sorted(os.listdir(model_dir)) == before  # not even __pycache__
