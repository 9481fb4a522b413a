"""Property-based: the pool's input validation and its reading of runner responses (issue 7).

Arbitrary JSON-shaped values — any unicode including lone surrogates, integers of hundreds of
digits, infinities and NaN, deep nesting — must get a clear answer: accepted, or refused with
an error that names the field. Never another exception, never a hang (hypothesis' deadline).
What the validator accepts must also be writable to the runner as a request file, since that
is where a lone surrogate used to jam a runner slot (finding 1) and 1e309 came back as
``Infinity`` (finding 16).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coglet import protocol
from pool.errors import InvalidInput, InvalidRequest
from pool.manager import _validate
from pool.prediction import Prediction, PredictionRequest

SETTINGS = settings(max_examples=300, deadline=5000, suppress_health_check=[HealthCheck.too_slow])

SCHEMA: dict[str, Any] = {
    "components": {
        "schemas": {
            "Input": {
                "type": "object",
                "required": ["text"],
                "properties": {
                    "text": {"type": "string"},
                    "count": {"type": "integer", "minimum": 0, "maximum": 100},
                    "scale": {"type": "number"},
                    "flag": {"type": "boolean"},
                    "color": {"allOf": [{"$ref": "#/components/schemas/color"}]},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "image": {"type": "string", "format": "uri"},
                    "anything": {},
                    "pattern": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 8},
                },
            },
            "color": {"type": "string", "enum": ["red", "green"]},
        }
    }
}
FIELDS = list(SCHEMA["components"]["schemas"]["Input"]["properties"])

# Every code point, the surrogates included (hypothesis leaves them out by default).
ANY_CHAR = st.characters(codec=None, exclude_categories=())
TEXT = st.text(ANY_CHAR, max_size=20)
NUMBERS = (
    st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([1e308, -0.0, 2**53 + 1, 10**19])
)
SCALARS = st.none() | st.booleans() | NUMBERS | TEXT
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=20,
)
# Mostly well-typed inputs (so acceptance is exercised too), with any value anywhere.
WELL_TYPED = {
    "count": st.integers(0, 100) | JSON_VALUES,
    "scale": NUMBERS | JSON_VALUES,
    "flag": st.booleans() | JSON_VALUES,
    "color": st.sampled_from(["red", "green"]) | JSON_VALUES,
    "tags": st.lists(TEXT, max_size=3) | JSON_VALUES,
    "anything": JSON_VALUES,
    "pattern": TEXT | JSON_VALUES,
}
INPUTS = st.tuples(
    st.fixed_dictionaries({"text": TEXT}, optional=WELL_TYPED),
    st.dictionaries(TEXT, JSON_VALUES, max_size=2),  # unknown fields: ignored, still sent
).map(lambda parts: {**parts[1], **parts[0]})


def writable(value: Any) -> None:
    """What the pool writes for the runner: strict JSON, UTF-8 (raises if it cannot)."""
    json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")


@SETTINGS
@given(INPUTS)
def test_validation_accepts_or_names_the_field(raw: dict[str, Any]) -> None:
    try:
        _validate(SCHEMA, raw)
    except InvalidInput as e:
        assert e.detail, raw
        for item in e.detail:
            assert item["loc"][:2] == ["body", "input"] and len(item["loc"]) == 3
            assert isinstance(item["msg"], str) and item["msg"]
        return
    writable(raw)  # accepted: the runner can be sent it


@SETTINGS
@given(st.sampled_from(FIELDS), st.sampled_from(["\ud800", "a\udfffb", "\udbff\udc00x"[0]]))
def test_a_lone_surrogate_is_refused_naming_the_field(field: str, text: str) -> None:
    value: Any = [text] if field == "tags" else text
    with pytest.raises(InvalidInput) as err:
        _validate(SCHEMA, {"text": "ok", field: value})
    assert ["body", "input", field] in [item["loc"] for item in err.value.detail]


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e309 * 10])
def test_non_finite_numbers_are_refused(value: float) -> None:
    for field in ("scale", "anything"):
        with pytest.raises(InvalidInput) as err:
            _validate(SCHEMA, {"text": "ok", field: value})
        assert err.value.detail[0]["loc"] == ["body", "input", field]


@pytest.mark.parametrize("depth", [100, 10_000])
def test_deep_nesting_gets_an_answer(depth: int) -> None:
    nested: Any = "x"
    for _ in range(depth):
        nested = [nested]
    try:
        _validate(SCHEMA, {"text": "ok", "anything": nested, "tags": nested})
    except InvalidInput as e:
        assert {tuple(i["loc"]) for i in e.detail} <= {
            ("body", "input", "anything"),
            ("body", "input", "tags"),
        }


BODIES = (
    st.dictionaries(
        st.sampled_from(["id", "input", "webhook", "webhook_events_filter", "context"]) | TEXT,
        JSON_VALUES,
        max_size=5,
    )
    | JSON_VALUES
)


@SETTINGS
@given(BODIES)
def test_request_bodies_are_accepted_or_refused_clearly(body: Any) -> None:
    try:
        request = PredictionRequest.from_body(body)
    except InvalidRequest as e:
        assert e.detail and all(item["loc"][0] == "body" for item in e.detail)
        return
    assert isinstance(request.input, dict)


# --- the runner's responses, as the pool reads them ---------------------------------------------
DELTAS = st.dictionaries(
    st.sampled_from(
        ["status", "output", "output_append", "logs_append", "metrics", "error", "extra"]
    ),
    JSON_VALUES | st.sampled_from(sorted(protocol.STATUSES)),
    max_size=6,
)


@SETTINGS
@given(st.lists(DELTAS, min_size=1, max_size=5))
def test_response_deltas_apply_or_fail_the_prediction_never_crash(deltas: list[Any]) -> None:
    prediction = Prediction(PredictionRequest.from_body({"input": {}}))
    prediction.mark_started(0)
    for delta in deltas:
        problem = protocol.delta_problem(delta)
        if problem is not None:
            prediction.fail(f"runner sent a bad response: {problem}")
            break
        prediction.apply_delta(delta)
    body = prediction.to_dict()
    json.dumps(body)  # the API can always answer with it
    assert body["status"] in {*protocol.TERMINAL_STATUSES, "starting", "processing"}


# --- protocol files, as read from disk -----------------------------------------------------------
def _documents() -> st.SearchStrategy[bytes]:
    valid = JSON_VALUES.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass"))
    truncated = st.tuples(valid, st.integers(0, 200)).map(lambda t: t[0][: t[1]])
    nested = st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n)
    open_only = st.integers(1, 200_000).map(lambda n: b'{"a":' * n)
    constants = st.sampled_from([b"NaN", b"-Infinity", b"1e999", b"[1e400]", b"\xff\xfe{}"])
    return st.binary(max_size=200) | valid | truncated | nested | open_only | constants


@SETTINGS
@given(_documents())
def test_protocol_files_read_as_json_or_a_value_error(data: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = f"{directory}/response-x-0.json"
        protocol.write_atomic(path, data)
        try:
            value = protocol.read_json(path)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError included
            assert str(e)
            return
    problem = protocol.delta_problem(value)
    assert problem is None or isinstance(problem, str)


# --- data: URIs, decoded a slice at a time --------------------------------------------------------
def _reference_decode(payload: str) -> bytes | None:
    """The one-call decoding the sliced one must agree with (None: invalid)."""
    import base64
    import binascii
    import re
    import urllib.parse

    try:
        raw = re.sub(rb"\s+", b"", urllib.parse.unquote_to_bytes(payload))
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return None


B64_TEXT = st.text(
    st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/= \n\t%2B"),
    max_size=64,
)


@SETTINGS
@given(st.binary(max_size=200), st.integers(1, 40), st.data())
def test_sliced_base64_decoding_matches_one_call_decoding(
    data: bytes, chunk: int, draw: st.DataObject
) -> None:
    import base64

    import pool.files

    encoded = base64.b64encode(data).decode()
    # Whitespace anywhere is ignored; arbitrary base64-ish text must agree on being invalid.
    spaced = "".join(c + draw.draw(st.sampled_from(["", "", " ", "\n"])) for c in encoded)
    for payload in (encoded, spaced, draw.draw(B64_TEXT)):
        expected = _reference_decode(payload)
        original, pool.files.CODEC_CHUNK = pool.files.CODEC_CHUNK, chunk
        try:
            got: bytes | None = pool.files.decode_data_uri("f", "data:;base64," + payload)[1]
        except InvalidInput as e:
            assert e.detail[0]["loc"] == ["body", "input", "f"]
            got = None
        finally:
            pool.files.CODEC_CHUNK = original
        assert got == expected, payload


@pytest.mark.parametrize("payload", ["0000=", "0000==", "00==", "000=", "00=0", "AAAA=AAAA", "0"])
@pytest.mark.parametrize("chunk", [1, 3, 4, 5])
def test_padding_is_judged_as_one_call_decoding_judges_it(payload: str, chunk: int) -> None:
    """Excess or misplaced '=' found by hypothesis: sliced and one-call decoding agree."""
    import pool.files

    original, pool.files.CODEC_CHUNK = pool.files.CODEC_CHUNK, chunk
    try:
        got: bytes | None = pool.files.decode_data_uri("f", "data:;base64," + payload)[1]
    except InvalidInput:
        got = None
    finally:
        pool.files.CODEC_CHUNK = original
    assert got == _reference_decode(payload)


# --- request bodies with long strings (pool.jsonbody) ---------------------------------------------
# A small threshold stands for the 1 MiB one: the scan, the placeholders and the put-back are
# the same code at any size. Strings just under, at and over it, raw-able or not.
_MIN = 16
_PRINTABLE = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters='"\\'),
    min_size=_MIN - 2,
    max_size=_MIN + 3,
)
_LONG = _PRINTABLE | st.text(min_size=_MIN - 1, max_size=_MIN + 2)  # any unicode: escapes
_LEAVES = JSON_VALUES | _LONG | st.floats(allow_nan=True, allow_infinity=True)
_BODY_VALUES = st.recursive(
    _LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(TEXT | _LONG | st.sampled_from(["input", "context"]), inner, max_size=4)
    ),
    max_leaves=12,
)
_DUMPS = st.sampled_from(
    [
        lambda v: json.dumps(v),
        lambda v: json.dumps(v, ensure_ascii=False),
        lambda v: json.dumps(v, separators=(",", ":")),
        lambda v: json.dumps(v, indent=1),
    ]
)


def _plain(value: Any, raw_texts: list[Any]) -> Any:
    """``value`` with each RawText as its str (and collected)."""
    from pool.jsonstream import RawText

    if isinstance(value, RawText):
        raw_texts.append(value)
        return value.text()
    if isinstance(value, list):
        return [_plain(v, raw_texts) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v, raw_texts) for k, v in value.items()}
    return value


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values, NaN equal to NaN."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@SETTINGS
@given(_BODY_VALUES, _DUMPS, st.booleans(), st.data())
def test_the_large_string_parse_is_json_loads(
    value: Any, dumps: Any, keep_all: bool, data: st.DataObject
) -> None:
    from pool.jsonbody import at_input_value, loads_large

    try:
        text = dumps(value)
        raw = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate with ensure_ascii=False: escape it instead
        text = json.dumps(value)
        raw = text.encode("utf-8")
    if data.draw(st.booleans()):  # sometimes a damaged body: cut, or a byte changed
        at = data.draw(st.integers(0, max(0, len(raw) - 1)))
        raw = raw[:at] if data.draw(st.booleans()) else raw[:at] + b"\xff" + raw[at + 1 :]
    try:
        expected: Any = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        expected = ValueError
    split, got = loads_large(
        raw,
        json.loads,
        keep_at=(lambda path: True) if keep_all else at_input_value,
        min_bytes=_MIN,
    )
    if not split:
        return  # the caller parses it whole: the same answer by construction
    assert expected is not ValueError, raw
    raw_texts: list[Any] = []
    assert _same(_plain(got, raw_texts), expected)
    for kept in raw_texts:  # only long, plain ASCII literals are kept, as slices of the body
        assert len(kept) >= _MIN and kept.text().isprintable() and kept.text().isascii()
        assert kept.view.obj is raw


@SETTINGS
@given(st.integers(_MIN - 2, _MIN + 2), st.sampled_from(["a", "é", "\\", '"', "\n", "\x7f"]))
def test_a_string_near_the_threshold_is_kept_only_when_long_and_plain(
    length: int, odd: str
) -> None:
    from pool.jsonbody import loads_large
    from pool.jsonstream import RawText

    text = "x" * (length - 1) + odd
    raw = json.dumps({"input": {"s": text, "t": ["y" * length]}}).encode()
    split, got = loads_large(raw, json.loads, min_bytes=_MIN)
    expected = json.loads(raw)
    if not split:
        assert length < _MIN
        return
    assert _same(_plain(got, []), expected)
    content_bytes = len(json.dumps(text)) - 2
    kept_s = isinstance(got["input"]["s"], RawText)
    assert kept_s == (odd == "a" and content_bytes >= _MIN)
    assert isinstance(got["input"]["t"][0], RawText) == (length >= _MIN)
