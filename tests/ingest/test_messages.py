from __future__ import annotations

import json

import pytest

from ingest import names
from ingest.messages import Poison, after_runner_died, over_delivered, parse_request
from ingest.port import End, end_of
from ingest.results import MemoryResultStore
from pool.prediction import EndReason, Prediction, PredictionRequest


def parse(raw: bytes | str | None, max_bytes: int = 1000):
    return parse_request(raw, max_bytes=max_bytes, fallback_id="1700000000000-7")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, names.REASON_MISSING_VALUE),
        ("{not json", names.REASON_INVALID_JSON),
        (b"\xff\xfe", names.REASON_INVALID_JSON),
        ("[1, 2]", "request body must be a JSON object"),
        ('"text"', "request body must be a JSON object"),
        ('{"id": "x"}', "missing required field 'input'"),
        ('{"input": 3}', "input must be a JSON object"),
        ('{"id": "../etc", "input": {}}', "invalid prediction id"),
        ('{"input": {"s": "' + "a" * 2000 + '"}}', names.REASON_TOO_LARGE),
    ],
)
def test_poison_messages_name_their_reason(raw, reason):
    with pytest.raises(Poison) as err:
        parse(raw)
    assert reason in err.value.reason


def test_body_id_wins_and_extra_fields_are_kept():
    request = parse(json.dumps({"id": "abc", "input": {"n": 1}, "reply_to": "replies"}))
    assert request.id == "abc"
    assert request.input == {"n": 1}
    assert request.extra == {"reply_to": "replies"}


def test_missing_id_comes_from_the_message_id_made_safe():
    assert parse('{"input": {}}').id == "1700000000000-7"
    request = parse_request('{"input": {}}', max_bytes=100, fallback_id="amq.ctag/1:2")
    assert request.id == "amq.ctag_1_2"
    assert names.safe_id("..//") == "msg"


def test_the_end_of_a_prediction_is_read_from_its_fields_not_its_error_text():
    p = Prediction(PredictionRequest(id="a", input={}))
    p.fail("runner 1 (gpu 1) died: killed by SIGKILL", reason=EndReason.RUNNER_DIED)
    assert end_of(p) is End.RUNTIME_LOST
    lost = Prediction(PredictionRequest(id="e", input={}))
    lost.fail("no runner can ever serve", reason=EndReason.NO_RUNNER)
    assert end_of(lost) is End.RUNTIME_LOST
    q = Prediction(PredictionRequest(id="b", input={}))
    q.fail("ValueError: runner 1 died; the pool shut down (the model's own words)")
    assert end_of(q) is End.RESULT
    r = Prediction(PredictionRequest(id="c", input={}))
    r.finish("canceled", reason=EndReason.SHUTDOWN)  # as the manager's drain ends it
    assert end_of(r) is End.SHUTDOWN
    user = Prediction(PredictionRequest(id="d", input={}))
    user.finish("canceled")  # a user's cancel is a result like any other
    assert end_of(user) is End.RESULT


async def test_memory_store_keeps_results_and_counts_deliveries():
    store = MemoryResultStore(ttl_s=60, max_entries=2)
    assert await store.get("a") is None
    await store.put("a", '{"id":"a","status":"succeeded"}')
    assert json.loads(await store.get("a"))["status"] == "succeeded"
    assert not await store.published("a")
    await store.mark_published("a")
    assert await store.published("a")
    assert [await store.count_delivery("a") for _ in range(3)] == [1, 2, 3]
    await store.put("b", "{}")
    await store.put("c", "{}")
    assert await store.get("a") is None  # bounded: the oldest goes first


async def test_memory_store_is_bounded_in_bytes():
    store = MemoryResultStore(ttl_s=60, max_entries=1000, max_bytes=1000)
    for n in range(10):
        await store.put(f"p{n}", "x" * 300)  # 3,000 bytes offered, 1,000 allowed
    assert store.bytes <= 1000 and len(store) == 3
    assert await store.get("p9") is not None and await store.get("p6") is None
    await store.put("big", "y" * 5000)  # larger than the bound alone: not kept at all
    assert store.bytes <= 1000 and await store.get("big") is None


@pytest.mark.parametrize(
    ("raw", "reason", "detail"),
    [
        ('{"input": {"x": NaN}}', names.REASON_INVALID_REQUEST, "input.x: number nan is not"),
        ('{"input": {"x": Infinity}}', names.REASON_INVALID_REQUEST, "input.x: number inf is not"),
        ('{"input": {}, "extra": [NaN]}', names.REASON_INVALID_REQUEST, "body.extra[0] is nan"),
        ('{"input": {"x": [1, -1e400]}}', names.REASON_INVALID_REQUEST, "input.x.1: number -inf"),
        ('{"input": {"t": "a\\ud800b"}}', names.REASON_INVALID_REQUEST, "input.t: string holds"),
        ('{"input": {}, "context": {"\\udc00": "v"}}', names.REASON_INVALID_REQUEST, "surrogate"),
    ],
)
def test_non_finite_numbers_and_lone_surrogates_are_poison(raw, reason, detail):
    with pytest.raises(Poison) as err:
        parse(raw, max_bytes=10_000)
    assert err.value.reason.startswith(reason) and detail in err.value.reason


def test_bytes_that_are_not_utf8_are_poison_even_when_they_look_like_utf16():
    with pytest.raises(Poison) as err:
        parse('{"input": {}}'.encode("utf-16"))
    assert "not UTF-8" in err.value.reason


def nested(levels: int) -> str:
    """A request whose input nests ``levels`` lists deep."""
    return '{"input": {"x": ' + "[" * levels + "]" * levels + "}}"


@pytest.mark.parametrize("levels", [100_000, 3_000, 100, 63])
def test_deeply_nested_json_is_poison_not_a_crash(levels):
    # 100_000 and 3_000 exhaust the decoder's recursion (RecursionError, not ValueError);
    # 100 and 63 parse but nest deeper than the HTTP API's limit, which queues share.
    with pytest.raises(Poison) as err:
        parse(nested(levels), max_bytes=1_000_000)
    assert err.value.reason.startswith(names.REASON_INVALID_JSON)
    assert "nested deeper than 64 levels" in err.value.reason


def test_nesting_up_to_the_limit_is_accepted():
    # The body object is level 1 and "input" level 2, so 62 lists reach the limit of 64.
    request = parse(nested(62), max_bytes=1_000_000)
    assert request.input["x"] == json.loads(nested(62))["input"]["x"]


def test_delivery_limits_give_the_dead_letter_reason():
    p = Prediction(PredictionRequest(id="a", input={}))
    p.runner_died = True
    p.fail("runner 0 died: killed by SIGKILL")
    # A runner death hands the message back until its last allowed delivery.
    assert after_runner_died(p, deliveries=1, max_deliveries=2) is None
    reason = after_runner_died(p, deliveries=2, max_deliveries=2)
    assert reason is not None and reason.startswith(names.REASON_MAX_DELIVERIES)
    assert "delivered 2 times (max_deliveries=2)" in reason and "killed by SIGKILL" in reason
    # Delivered past the limit (its runners died before it could be dead-lettered): never run.
    assert over_delivered(2, 2) is None
    reason = over_delivered(3, 2)
    assert reason is not None and "delivered 3 times" in reason and "kept dying" in reason


def test_kind_says_training_and_defaults_to_prediction() -> None:
    assert parse('{"input": {}}').kind == "prediction"
    training = parse('{"kind": "training", "input": {"steps": 2}}')
    assert training.is_training and "kind" not in training.extra
    with pytest.raises(Poison, match=r"kind must be one of \['prediction', 'training'\]"):
        parse('{"kind": "train", "input": {}}')


def test_the_in_memory_store_takes_its_bounds_from_the_config():
    import ingest
    from pool.config import AmqpConfig, PoolConfig, QueuesConfig

    amqp = AmqpConfig(result_store_max_entries=7, result_store_max_bytes=1234)
    store = ingest._result_store(PoolConfig(queues=QueuesConfig(amqp=amqp)))
    assert isinstance(store, MemoryResultStore)
    assert (store._max, store._max_bytes) == (7, 1234)


HOSTILE_LARGE = [
    b'{"input": {"data": "data:,' + b"a" * (2 << 20),  # truncated
    b'{"input": {"data": "data:,' + b"a" * (2 << 20) + b'\\ud800"}}',  # a lone surrogate
    b'{"input": {"data": "data:,' + b"a" * (2 << 20) + b'\xff"}}',  # not UTF-8
    b'{"input": {"data": "data:,' + b"a" * (2 << 20) + b'", "x": NaN}}',
    b'{"input": {"data": "' + b"a" * (2 << 20) + b'"}, "n": ' + b"[" * 100 + b"]" * 100 + b"}",
    b'{"id": "../x", "input": {"data": "data:,' + b"a" * (2 << 20) + b'"}}',
]


@pytest.mark.parametrize("raw", HOSTILE_LARGE, ids=range(len(HOSTILE_LARGE)))
def test_a_large_message_is_refused_as_a_whole_parse_refuses_it(
    raw: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(Poison) as split:
        parse(raw, max_bytes=8 << 20)
    monkeypatch.setattr("ingest.messages.loads_large", lambda raw, loads: (False, None))
    with pytest.raises(Poison) as whole:
        parse(raw, max_bytes=8 << 20)
    assert split.value.reason == whole.value.reason


def test_a_large_data_uri_in_a_message_stays_a_slice_of_it() -> None:
    from pool.jsonstream import RawText

    uri = "data:application/octet-stream;base64," + "QUJD" * (1 << 19)
    raw = json.dumps({"id": "big", "input": {"data": uri}, "reply_to": "r"}).encode()
    request = parse(raw, max_bytes=8 << 20)
    assert isinstance(request.input["data"], RawText) and request.input["data"] == uri
    assert request.id == "big" and request.extra == {"reply_to": "r"}
