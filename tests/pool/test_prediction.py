"""The prediction record: request parsing and how runner deltas accumulate."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool.config import HttpConfig, PredictionsConfig
from pool.errors import InvalidInput, InvalidRequest
from pool.files import FileOutput, OutputFiles
from pool.jsonstream import TextSlices
from pool.manager import _validate
from pool.prediction import (
    MAX_REPORTED,
    SECRET_MASK,
    SLIM_RECORD_BYTES,
    EndReason,
    LogBuffer,
    Prediction,
    PredictionRequest,
    check_wire_safe,
    find_non_finite,
    find_unencodable,
    secret_fields,
)
from pool.router import Router


def test_logs_accumulate_in_order_across_reads() -> None:
    prediction = Prediction(PredictionRequest(id="p", input={}))
    prediction.apply_delta({"status": "processing", "logs_append": "one\n"})
    assert prediction.logs == "one\n"
    for n in range(3):
        prediction.apply_delta({"status": "processing", "logs_append": f"line {n}\n"})
    prediction.apply_delta({"status": "succeeded", "logs_append": "last\n", "output": 1})
    assert prediction.logs == "one\nline 0\nline 1\nline 2\nlast\n"
    assert prediction.to_dict()["logs"] == prediction.logs
    assert prediction.status == "succeeded" and prediction.output == 1


def test_deltas_after_the_end_are_ignored() -> None:
    prediction = Prediction(PredictionRequest(id="p", input={}))
    prediction.apply_delta({"status": "failed", "error": "boom"})
    prediction.apply_delta({"status": "succeeded", "logs_append": "late\n", "output": 2})
    assert (prediction.status, prediction.error, prediction.output) == ("failed", "boom", None)
    assert prediction.logs == ""


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ([], ["body"]),
        ({"input": []}, ["body", "input"]),
        ({"id": "../etc", "input": {}}, ["body", "id"]),
        ({"input": {}, "webhook": "ftp://x"}, ["body", "webhook"]),
        ({"input": {}, "webhook_events_filter": ["nope"]}, ["body", "webhook_events_filter"]),
        ({"input": {}, "context": {"a": 1}}, ["body", "context"]),
    ],
)
def test_bad_bodies_name_the_field(body: object, loc: list[str]) -> None:
    with pytest.raises(InvalidRequest) as e:
        PredictionRequest.from_body(body)
    assert e.value.detail[0]["loc"] == loc


# --- wire safety: one check for HTTP and queues (PoolManager.submit) ---------------------------
@pytest.mark.parametrize(
    ("request_", "loc"),
    [
        (PredictionRequest(id=None, input={"a": "\ud800"}), ["body", "input", "a"]),
        (
            PredictionRequest(id=None, input={"a": ["ok", {"b": "x\udfffy"}]}),
            ["body", "input", "a", 1, "b"],
        ),
        (PredictionRequest(id=None, input={"a": {"\ud801": 1}}), ["body", "input", "a", "\\ud801"]),
        (PredictionRequest(id=None, input={"\ud802": 1}), ["body", "input", "\\ud802"]),
        (PredictionRequest(id=None, input={}, context={"k": "\udc00"}), ["body", "context", "k"]),
        (PredictionRequest(id=None, input={}, webhook="http://h/\udc00"), ["body", "webhook"]),
        (PredictionRequest(id=None, input={"f": math.inf}), ["body", "input", "f"]),
        (PredictionRequest(id=None, input={"f": [1.0, -math.inf]}), ["body", "input", "f", 1]),
        (PredictionRequest(id=None, input={"f": {"g": math.nan}}), ["body", "input", "f", "g"]),
    ],
)
def test_unencodable_values_are_named(request_: PredictionRequest, loc: list[object]) -> None:
    with pytest.raises(InvalidInput) as e:
        check_wire_safe(request_)
    assert e.value.detail[0]["loc"] == loc
    # The 422 body itself must be encodable.
    json.dumps(e.value.detail, allow_nan=False).encode("utf-8")


# Any text, with lone surrogates mixed in often (hypothesis leaves them out of text()).
_CHAR = st.characters() | st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
_TEXT = st.lists(_CHAR, max_size=8).map("".join)
_JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | _TEXT
_JSON = st.recursive(
    _JSON_LEAVES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_TEXT, children, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(_TEXT, _JSON, max_size=4))
def test_wire_safe_means_encodable_as_strict_json(value: dict[str, Any]) -> None:
    # Arbitrary unicode (surrogates included) and every float (inf, nan, 1e309): the check
    # refuses exactly what strict UTF-8 JSON cannot carry.
    request = PredictionRequest(id=None, input=value)
    try:
        encoded: bytes | None = json.dumps(value, allow_nan=False, ensure_ascii=False).encode()
    except (ValueError, UnicodeEncodeError):
        encoded = None
    if encoded is None:
        with pytest.raises(InvalidInput):
            check_wire_safe(request)
    else:
        check_wire_safe(request)
        record = Prediction(request)
        assert json.loads(record.encode_request(value))["input"] == json.loads(encoded)


def test_deep_values_are_checked_without_recursion() -> None:
    deep: Any = "\ud800"
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(InvalidInput):
        check_wire_safe(PredictionRequest(id=None, input={"a": deep}))


def test_a_value_full_of_problems_names_a_bounded_few() -> None:
    with pytest.raises(InvalidInput) as e:
        check_wire_safe(PredictionRequest(id=None, input={"xs": [math.nan] * 1_000_000}))
    assert len(e.value.detail) == MAX_REPORTED
    assert all(d["loc"][:3] == ["body", "input", "xs"] for d in e.value.detail)


def test_a_deep_output_is_checked_without_recursion() -> None:
    deep: Any = {"k": math.inf}
    for _ in range(100_000):
        deep = [deep]
    where = find_unencodable(deep)
    assert where is not None and where.endswith("[0][0].k (inf)")


# --- outputs and metrics that JSON cannot carry --------------------------------------------------
def test_a_non_finite_output_fails_the_prediction_naming_where() -> None:
    p = Prediction(PredictionRequest(id="p", input={}))
    p.apply_delta({"status": "processing", "output_append": [1.0]})
    p.apply_delta({"status": "succeeded", "output_append": [{"x": [0.5, math.nan]}]})
    assert p.status == "failed" and p.end_reason is EndReason.FAILED
    assert p.error is not None and "output[1].x[1] (NaN)" in p.error
    assert p.output == [1.0]  # the bad delta was not applied
    json.dumps(p.to_dict(), allow_nan=False)


def test_a_lone_surrogate_in_an_output_fails_the_prediction() -> None:
    p = Prediction(PredictionRequest(id="p", input={}))
    p.apply_delta({"status": "succeeded", "output": {"text": "ok \ud800"}})
    assert p.status == "failed"
    assert p.error is not None and "output.text (a lone surrogate)" in p.error
    json.dumps(p.to_dict(), ensure_ascii=False).encode("utf-8")


def test_non_finite_metrics_are_dropped_to_null() -> None:
    p = Prediction(PredictionRequest(id="p", input={}))
    p.apply_delta({"status": "succeeded", "output": 1, "metrics": {"a": math.inf, "b": 2.0}})
    assert p.metrics["a"] is None and p.metrics["b"] == 2.0
    json.dumps(p.to_dict(), allow_nan=False)


def test_find_non_finite() -> None:
    assert find_non_finite({"a": [1, 2.5, "nan"]}) is None
    assert find_non_finite(math.inf) == "output (inf)"


# --- end reasons ---------------------------------------------------------------------------------
def test_end_reasons_are_typed() -> None:
    ok = Prediction(PredictionRequest(id="a", input={}))
    ok.apply_delta({"status": "succeeded", "output": 1})
    model_failed = Prediction(PredictionRequest(id="b", input={}))
    model_failed.apply_delta({"status": "failed", "error": "runner 0 died (in the model's words)"})
    lost = Prediction(PredictionRequest(id="c", input={}))
    lost.lose_runner("runner 0 (cpu) died: killed by SIGKILL")
    canceled = Prediction(PredictionRequest(id="d", input={}))
    canceled.request_cancel()
    canceled.apply_delta({"status": "canceled"})
    drained = Prediction(PredictionRequest(id="e", input={}))
    drained.request_cancel(EndReason.SHUTDOWN)
    drained.apply_delta({"status": "canceled"})
    killed_in_drain = Prediction(PredictionRequest(id="f", input={}))
    killed_in_drain.request_cancel(EndReason.SHUTDOWN)
    killed_in_drain.lose_runner("runner 0 (cpu) died: killed by SIGKILL")
    assert [p.end_reason for p in (ok, model_failed, lost, canceled, drained, killed_in_drain)] == [
        EndReason.SUCCEEDED,
        EndReason.FAILED,
        EndReason.RUNNER_DIED,
        EndReason.CANCELED,
        EndReason.SHUTDOWN,
        EndReason.SHUTDOWN,
    ]
    assert lost.runner_died and not model_failed.runner_died
    assert canceled.error is None
    assert drained.error == "canceled: the pool shut down before the prediction finished"
    assert killed_in_drain.error is not None
    assert killed_in_drain.error.startswith("the pool shut down before the prediction finished")


def test_ended_by_shutdown_is_the_shutdown_end_reason() -> None:
    drained = Prediction(PredictionRequest(id="a", input={}))
    drained.ended_by_shutdown = True  # the drain marks it before it ends
    drained.finish("canceled")
    user = Prediction(PredictionRequest(id="b", input={}))
    user.finish("canceled")
    late = Prediction(PredictionRequest(id="c", input={}))
    late.finish("succeeded")
    late.ended_by_shutdown = True  # too late: it ended on its own
    assert drained.ended_by_shutdown and drained.end_reason is EndReason.SHUTDOWN
    assert not user.ended_by_shutdown and not late.ended_by_shutdown


def test_a_record_that_ended_keeps_its_reason_when_its_runner_dies_later() -> None:
    p = Prediction(PredictionRequest(id="t", input={}))
    p.fail("Prediction timed out", reason=EndReason.TIMED_OUT)
    p.lose_runner("runner 0 (cpu) died: killed by SIGKILL")
    p.runner_died = True  # the flag a queue consumer reads stays false too
    assert p.end_reason is EndReason.TIMED_OUT and not p.runner_died
    assert p.error == "Prediction timed out"


# --- secrets -------------------------------------------------------------------------------------
SCHEMA = {
    "components": {
        "schemas": {
            "Input": {
                "properties": {
                    "token": {"type": "string", "format": "password", "x-cog-secret": True},
                    "keys": {"type": "array", "items": {"type": "string", "x-cog-secret": True}},
                    "plain": {"type": "string"},
                }
            }
        }
    }
}


def test_secrets_are_masked_in_the_public_view_only() -> None:
    fields = secret_fields(SCHEMA)
    assert fields == {"token", "keys"}
    request = PredictionRequest(id="s", input={"token": "t0k", "keys": ["a", "b"], "plain": "p"})
    p = Prediction(request, secret_fields=fields)
    assert p.to_dict()["input"] == {"token": SECRET_MASK, "keys": [SECRET_MASK] * 2, "plain": "p"}
    assert json.loads(p.encode_request(request.input))["input"]["token"] == "t0k"  # the runner
    p.apply_delta({"status": "succeeded", "output": 1})
    slim, _ = p.slim(1024)
    assert "t0k" not in json.dumps(slim.to_dict()) and slim.input["token"] == SECRET_MASK


def test_no_schema_no_secret_fields() -> None:
    assert secret_fields(None) == frozenset()
    assert secret_fields({"components": {}}) == frozenset()


# --- logs cap ------------------------------------------------------------------------------------
def test_logs_under_the_cap_are_whole() -> None:
    logs = LogBuffer(100)
    for piece in ("a" * 30, "b" * 30, "c" * 40):
        logs.append(piece)
    assert logs.text == "a" * 30 + "b" * 30 + "c" * 40 and logs.dropped_bytes == 0


def test_logs_over_the_cap_keep_head_and_tail_in_bytes() -> None:
    logs = LogBuffer(100)
    for i in range(50):
        logs.append(f"{i:03d}é\n")  # 6 bytes, 5 characters each
    text = logs.text
    head, rest = text.split("\n[... ", 1)
    dropped = int(rest.split(" bytes")[0])
    tail = rest.split(" ...]\n", 1)[1]
    assert len(head.encode()) <= 50 and len(tail.encode()) <= 50
    assert head.startswith("000é\n") and tail.endswith("049é\n")
    assert len(head.encode()) + len(tail.encode()) + dropped == 50 * 6
    assert "predictions.logs_max_bytes=100" in text


def test_a_single_huge_log_piece_is_cut() -> None:
    logs = LogBuffer(1000)
    logs.append("x" * 10_000_000)
    assert len(logs.text) < 1100 and logs.dropped_bytes == 10_000_000 - 1000


# --- slim copies ---------------------------------------------------------------------------------
def test_slim_copy_omits_what_is_large_and_says_so() -> None:
    p = Prediction(PredictionRequest(id="big", input={"doc": "d" * 5000, "n": 1}))
    p.apply_delta({"status": "succeeded", "output": "o" * 5000, "logs_append": "l" * 5000})
    slim, size = p.slim(1000)
    body = slim.to_dict()
    assert body["input"] == {"doc": None, "n": 1} and body["output"] is None
    assert body["logs"] == "l" * 1000
    assert body["omitted"] == {"input.doc": 5002, "output": 5002, "logs": 5000}
    # The kept values (1000 bytes of logs, a small input) beside the copy's own objects.
    assert size < SLIM_RECORD_BYTES + 2000 and slim.done and slim.end_reason is EndReason.SUCCEEDED
    assert p.output == "o" * 5000  # the live record is untouched
    whole, _ = p.slim(10_000)
    assert whole.to_dict() == p.to_dict()


def test_the_error_text_names_each_field_for_dead_letter_reasons() -> None:
    with pytest.raises(InvalidInput) as e:
        check_wire_safe(
            PredictionRequest(id=None, input={"a": ["\ud800"]}, context={"k": "\udc00"})
        )
    text = str(e.value)
    assert "input.a.0: string holds a lone UTF-16 surrogate" in text
    assert "context.k: " in text


# --- the whole input check of submit(), on arbitrary input -------------------------------------
GOLDEN_SCHEMA = json.loads(
    (Path(__file__).resolve().parent.parent / "coglet" / "golden" / "inputs.json").read_text()
)
_FIELDS = sorted(GOLDEN_SCHEMA["components"]["schemas"]["Input"]["properties"])
_VALID = {"text": "abc", "image": "https://x/y.png", "legacy": "https://x/z", "words": ["w"]}
_SOME = st.dictionaries(st.sampled_from(_FIELDS) | _TEXT, _JSON, max_size=6)


@settings(max_examples=300, deadline=None)
@given(
    _SOME | _SOME.map(lambda changes: {**_VALID, **changes}),  # valid but for a few fields
    st.dictionaries(_TEXT, _TEXT, max_size=2),
)
def test_the_input_check_refuses_with_a_named_error_or_passes_encodable(
    value: dict[str, Any], context: dict[str, str]
) -> None:
    # What submit() runs before anything is taken: the wire check, then the schema. Either
    # it refuses with InvalidInput (a 422 naming fields / a dead letter), never another
    # exception (a 500, a stuck message), or what passes encodes as strict UTF-8 JSON.
    request = PredictionRequest(id=None, input=value, context=context)
    try:
        check_wire_safe(request)
        _validate(GOLDEN_SCHEMA, value)
    except InvalidInput as e:
        assert e.detail and all(d["loc"][0] == "body" and d["msg"] for d in e.detail)
        json.dumps(e.detail, allow_nan=False).encode("utf-8")
        return
    record = Prediction(request, secret_fields=secret_fields(GOLDEN_SCHEMA))
    body = record.encode_request(value)
    assert json.loads(body)["input"] == json.loads(json.dumps(value))
    json.dumps(record.to_dict(), allow_nan=False).encode("utf-8")


# --- output files kept on disk: who holds them, and when they go --------------------------------
class _Files:
    """A record's output files, with the removals recorded instead of done."""

    def __init__(self) -> None:
        self.removed: list[str] = []
        self.made: list[OutputFiles] = []

    def make(self, prediction_id: str) -> OutputFiles:
        files = OutputFiles("/outputs", prediction_id, self.removed.extend)
        self.made.append(files)
        return files


def _finished_with_a_file(store: _Files, prediction_id: str, size: int) -> Prediction:
    prediction = Prediction(PredictionRequest(id=prediction_id, input={}))
    prediction.mark_started(0)
    files = prediction.output_files(store.make)
    assert files is not None
    path = files.new_dir()
    kept = FileOutput(path + "/out.bin", "application/octet-stream", size)
    files.settled(path, kept)
    prediction.apply_delta({"status": "succeeded", "output": kept})
    return prediction


def test_the_recent_store_holds_a_kept_file_until_it_lets_the_copy_go() -> None:
    store = _Files()
    router = Router(HttpConfig(), [], PredictionsConfig(recent_max=1))
    # Steps: a finished record with a 5 MB file; a reader holds it; the router records it.
    first = _finished_with_a_file(store, "p1", 5_000_000)
    first.hold_output()
    router.record_finished(first)
    kept = router.get("p1")
    assert kept is not None and kept is not first and kept.files is first.files
    assert isinstance(kept.output, FileOutput) and "omitted" not in kept.to_dict()
    assert router.recent_file_bytes == 5_000_000
    assert router.recent_bytes < SLIM_RECORD_BYTES + 1_000  # the file counts on disk, not here
    first.release_output()
    # Result: the reader let go, the store still holds it.
    assert store.removed == []
    # Steps: a GET reads the kept copy; a second record pushes the first out of the store.
    kept.hold_output()
    router.record_finished(_finished_with_a_file(store, "p2", 10))
    assert router.get("p1") is None and store.removed == []
    kept.release_output()
    # Result: once the reader is done too, the first record's directory goes.
    assert store.removed == ["/outputs/p1-0"]
    assert router.recent_file_bytes == 10


def test_a_reader_from_before_the_file_existed_holds_it_too() -> None:
    store = _Files()
    router = Router(HttpConfig(), [], PredictionsConfig(recent_max=0))  # no store at all
    prediction = Prediction(PredictionRequest(id="p1", input={}))
    prediction.hold_output()  # e.g. the sync HTTP request, right after submit
    prediction.mark_started(0)
    files = prediction.output_files(store.make)
    assert files is not None
    path = files.new_dir()
    files.settled(path, FileOutput(path + "/f", "image/png", 300_000))
    prediction.apply_delta({"status": "succeeded", "output": "x"})
    router.record_finished(prediction)
    # Result: nothing keeps the record, but its reader still holds the file; then it goes.
    assert store.removed == []
    prediction.release_output()
    assert store.removed == [path]
    # A finished record keeps nothing more.
    assert prediction.output_files(store.make) is None


def test_kept_files_over_their_bound_are_not_kept() -> None:
    store = _Files()
    limits = PredictionsConfig(recent_files_max_bytes=1_000_000)
    router = Router(HttpConfig(), [], limits)
    router.record_finished(_finished_with_a_file(store, "big", 2_000_000))
    kept = router.get("big")
    # Result: the copy is kept, without its output; the file went with the live record.
    assert kept is not None and kept.output is None and kept.files is None
    assert kept.to_dict()["omitted"] == {"output": 2_000_000}
    assert store.removed == ["/outputs/big-0"] and router.recent_file_bytes == 0
    # Two of 600 KB: the older goes, with its file.
    router.record_finished(_finished_with_a_file(store, "a", 600_000))
    router.record_finished(_finished_with_a_file(store, "b", 600_000))
    assert router.get("a") is None and router.get("b") is not None
    assert store.removed[-1] == "/outputs/a-0" and router.recent_file_bytes == 600_000


def test_a_long_string_held_as_slices_with_a_lone_surrogate_fails_the_record() -> None:
    prediction = Prediction(PredictionRequest(id="p1", input={}))
    prediction.mark_started(0)
    prediction.apply_delta({"status": "succeeded", "output": TextSlices(["ok", "a\ud800"])})
    assert prediction.status == "failed" and "output (a lone surrogate)" in (prediction.error or "")
