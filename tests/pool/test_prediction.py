"""The prediction record: request parsing and how runner deltas accumulate."""

from __future__ import annotations

import pytest

from pool.errors import InvalidRequest
from pool.prediction import Prediction, PredictionRequest


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
