"""Input validation from the schema alone, with Cog's messages (coglet/validation.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from coglet.predictor import load_predictor
from coglet.validation import InputValidationError, validate_input

REF = "#/components/schemas/"


def schema_with(properties: dict[str, Any], required: list[str], **enums: Any) -> dict:
    """A Cog-shaped openapi.json holding just an Input component (and enum components)."""
    schemas: dict[str, Any] = {
        "Input": {"title": "Input", "type": "object", "properties": properties}
    }
    if required:
        schemas["Input"]["required"] = required
    for name, (kind, values) in enums.items():
        schemas[name] = {"title": name, "type": kind, "enum": values}
    return {"openapi": "3.0.2", "components": {"schemas": schemas}}


SCHEMA = schema_with(
    {
        "message": {"type": "string", "x-order": 0},
        "repeat_count": {"type": "integer", "minimum": 1, "maximum": 10, "default": 1},
        "s": {"type": "string", "minLength": 3, "maxLength": 5, "default": "abc"},
        "mode": {"allOf": [{"$ref": REF + "mode"}], "default": "foo"},
        "steps": {"allOf": [{"$ref": REF + "steps"}], "default": 10},
        "pat": {"type": "string", "pattern": "foo.*", "default": "foo"},
        "scale": {"type": "number", "default": 1.5},
        "flag": {"type": "boolean", "default": False},
        "note": {"type": "string", "nullable": True},
        "nums": {"type": "array", "items": {"type": "integer"}, "minimum": 0, "default": [1]},
        "words": {
            "type": "array",
            "items": {"allOf": [{"$ref": REF + "words"}]},
            "default": [],
        },
        "cfg": {
            "type": "object",
            "properties": {"width": {"type": "integer"}, "label": {"type": "string"}},
            "required": ["width"],
            "default": {"width": 1},
        },
        "weights": {"type": "object", "additionalProperties": {"type": "number"}, "default": {}},
        "blob": {"type": "object", "default": {}},
    },
    ["message"],
    mode=("string", ["foo", "bar"]),
    steps=("integer", [10, 20]),
    words=("string", ["x", "y"]),
)


def errors_of(raw: Any, schema: dict = SCHEMA) -> list[dict[str, str]]:
    with pytest.raises(InputValidationError) as info:
        validate_input(schema, raw)
    return info.value.errors


def message_of(raw: dict, schema: dict = SCHEMA) -> str:
    errors = errors_of(raw, schema)
    assert len(errors) == 1, errors
    return errors[0]["msg"]


def test_valid_input_fills_defaults() -> None:
    values, warnings = validate_input(SCHEMA, {"message": "hi"})
    assert warnings == []
    assert values == {
        "message": "hi",
        "repeat_count": 1,
        "s": "abc",
        "mode": "foo",
        "steps": 10,
        "pat": "foo",
        "scale": 1.5,
        "flag": False,
        "nums": [1],
        "words": [],
        "cfg": {"width": 1},
        "weights": {},
        "blob": {},
    }


def test_defaults_are_fresh_copies() -> None:
    schema = copy.deepcopy(SCHEMA)
    first, _ = validate_input(schema, {"message": "a"})
    first["nums"].append(99)
    second, _ = validate_input(schema, {"message": "b"})
    assert second["nums"] == [1]
    assert schema["components"]["schemas"]["Input"]["properties"]["nums"]["default"] == [1]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"repeat_count": 0}, "invalid input value: repeat_count=0 fails constraint >= 1"),
        ({"repeat_count": 11}, "invalid input value: repeat_count=11 fails constraint <= 10"),
        ({"s": "f"}, "invalid input value: s='f' fails constraint len() >= 3"),
        ({"s": "foobar"}, "invalid input value: s='foobar' fails constraint len() <= 5"),
        ({"mode": "baz"}, "invalid input value: mode='baz' does not match choices ['foo', 'bar']"),
        ({"steps": 15}, "invalid input value: steps=15 does not match choices [10, 20]"),
        ({"pat": "bar123"}, "invalid input value: pat='bar123' does not match regex 'foo.*'"),
        ({"nums": [3, -1]}, "invalid input value: nums[1]=-1 fails constraint >= 0"),
        (
            {"words": ["x", "z"]},
            "invalid input value: words[1]='z' does not match choices ['x', 'y']",
        ),
        ({"repeat_count": "x"}, "invalid input value: repeat_count='x' is not an integer"),
        ({"repeat_count": "3"}, "invalid input value: repeat_count='3' is not an integer"),
        ({"repeat_count": True}, "invalid input value: repeat_count=True is not an integer"),
        ({"repeat_count": 2.5}, "invalid input value: repeat_count=2.5 is not an integer"),
        ({"scale": "1.0"}, "invalid input value: scale='1.0' is not a number"),
        ({"flag": 1}, "invalid input value: flag=1 is not a boolean"),
        ({"s": 12}, "invalid input value: s=12 is not a string"),
        ({"nums": 3}, "invalid input value: nums=3 is not a list"),
        ({"nums": [1, "a"]}, "invalid input value: nums[1]='a' is not an integer"),
        ({"cfg": []}, "invalid input value: cfg=[] is not an object"),
        ({"cfg": {}}, "invalid input value: cfg.width is missing"),
        ({"cfg": {"width": 1, "x": 2}}, "invalid input value: cfg.'x' is not a known field"),
        ({"cfg": {"width": "w"}}, "invalid input value: cfg.width='w' is not an integer"),
        ({"weights": {"a": "b"}}, "invalid input value: weights.a='b' is not a number"),
        ({"s": None}, "invalid input value: s=None is not a string"),
        ({"mode": 3}, "invalid input value: mode=3 is not a string"),
    ],
)
def test_messages(raw: dict, message: str) -> None:
    raw = {"message": "m", **raw}
    assert message_of(raw) == message


def test_missing_required() -> None:
    assert message_of({"s": "abc"}) == "missing required input field: message"


def test_error_shape_lists_every_field() -> None:
    errors = errors_of({"repeat_count": 0, "s": "f"})
    assert errors == [
        {
            "field": "message",
            "msg": "missing required input field: message",
            "type": "value_error.missing",
        },
        {
            "field": "repeat_count",
            "msg": "invalid input value: repeat_count=0 fails constraint >= 1",
            "type": "value_error.number.not_ge",
        },
        {
            "field": "s",
            "msg": "invalid input value: s='f' fails constraint len() >= 3",
            "type": "value_error.any_str.min_length",
        },
    ]
    with pytest.raises(InputValidationError) as info:
        validate_input(SCHEMA, {"repeat_count": 0})
    assert str(info.value) == (
        "missing required input field: message; "
        "invalid input value: repeat_count=0 fails constraint >= 1"
    )


def test_coercions() -> None:
    values, _ = validate_input(SCHEMA, {"message": "m", "scale": 2, "repeat_count": 3.0})
    assert values["scale"] == 2.0 and isinstance(values["scale"], float)
    assert values["repeat_count"] == 3 and isinstance(values["repeat_count"], int)


def test_optional_accepts_null_and_absence() -> None:
    values, _ = validate_input(SCHEMA, {"message": "m", "note": None})
    assert values["note"] is None
    values, _ = validate_input(SCHEMA, {"message": "m"})
    assert "note" not in values


def test_unknown_keys_dropped_with_warning() -> None:
    values, warnings = validate_input(SCHEMA, {"message": "m", "extra": 1, "other": "x"})
    assert "extra" not in values and "other" not in values
    assert warnings == [
        "unknown input field ignored: 'extra'",
        "unknown input field ignored: 'other'",
    ]


def test_untyped_property_accepts_anything() -> None:
    schema = schema_with({"a": {"title": "A"}, "xs": {"type": "array", "items": {}}}, ["a"])
    values, _ = validate_input(schema, {"a": [1, "x", None], "xs": ["s", 2, {"k": []}]})
    assert values == {"a": [1, "x", None], "xs": ["s", 2, {"k": []}]}


def test_untyped_object_accepts_anything() -> None:
    blob = {"a": [1, {"b": None}], "c": "d"}
    values, _ = validate_input(SCHEMA, {"message": "m", "blob": blob})
    assert values["blob"] == blob


# --- hostile input -----------------------------------------------------------------------------
def test_input_that_is_not_an_object() -> None:
    for raw in (None, [], "x", 3):
        assert errors_of(raw) == [
            {"field": "input", "msg": "input must be a JSON object", "type": "type_error.dict"}
        ]


def test_huge_string_makes_a_short_message() -> None:
    huge = "a" * 5_000_000
    msg = message_of({"message": "m", "s": huge})
    assert msg.startswith("invalid input value: s='aaaa")
    assert msg.endswith("fails constraint len() <= 5")
    assert len(msg) < 400


def test_huge_integer() -> None:
    big = 10**5000
    assert message_of({"message": "m", "repeat_count": big}) == (
        "invalid input value: repeat_count=<a very large integer> fails constraint <= 10"
    )
    assert message_of({"message": "m", "scale": big}) == (
        "invalid input value: scale=<a very large integer> is out of range"
    )


def deep_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def test_deep_nesting_never_recurses_past_the_schema() -> None:
    deep = deep_list(200_000)
    assert message_of({"message": deep}).startswith("invalid input value: message=[[[")
    assert message_of({"message": "m", "nums": deep}).startswith("invalid input value: nums[0]=[[[")
    values, _ = validate_input(SCHEMA, {"message": "m", "blob": {"deep": deep}})
    assert values["blob"]["deep"] is deep


def test_many_errors_in_a_long_list_stop_at_the_first() -> None:
    msg = message_of({"message": "m", "nums": [1] * 100_000 + [-5]})
    assert msg == "invalid input value: nums[100000]=-5 fails constraint >= 0"


@pytest.mark.parametrize(
    "schema",
    [
        {},
        {"components": None},
        {"components": {"schemas": {"Input": {"properties": {"x": "not a dict"}}}}},
        {"components": {"schemas": {"Input": {"properties": {"x": {"allOf": [{"$ref": 3}]}}}}}},
        {
            "components": {
                "schemas": {
                    "Input": {"properties": {"x": {"$ref": REF + "x"}}},
                    "x": {"$ref": REF + "x"},
                }
            }
        },
        {
            "components": {
                "schemas": {"Input": {"properties": {"x": {"type": "string", "pattern": "("}}}}
            }
        },
    ],
)
def test_odd_schemas_never_crash(schema: dict) -> None:
    try:
        validate_input(schema, {"x": "v", "y": [1]})
    except InputValidationError as e:
        assert e.errors and all(set(err) == {"field", "msg", "type"} for err in e.errors)


# --- the same messages from a real predictor's schema ------------------------------------------
FIXTURES = Path(__file__).resolve().parents[1] / "models" / "schema"


def test_messages_from_a_generated_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(FIXTURES)
    schema = load_predictor("sch_choices.py:Predictor").openapi_schema()
    assert message_of({"steps": 10, "size": 3}, schema) == (
        "invalid input value: size=3 does not match choices [1, 2]"
    )
    assert message_of({"steps": 10, "size": 1, "modes": ["a", "c"]}, schema) == (
        "invalid input value: modes[1]='c' does not match choices ['a', 'b']"
    )
    schema = load_predictor("sch_inputs.py:Predictor").openapi_schema()
    base = {"text": "ok", "image": "/tmp/x.png", "legacy": "/tmp/y", "words": []}
    assert validate_input(schema, base)[0]["count"] == 3
    assert message_of({**base, "numbers": [1, -1]}, schema) == (
        "invalid input value: numbers[1]=-1 fails constraint >= 0"
    )
    assert message_of({**base, "text": "NO"}, schema) == (
        "invalid input value: text='NO' does not match regex '^[a-z ]+$'"
    )


def test_training_inputs_validate_against_training_input() -> None:
    """The pool checks a training's input with component="TrainingInput" of openapi.json."""
    golden = Path(__file__).resolve().parent / "golden" / "training.json"
    schema = json.loads(golden.read_text())
    values, _ = validate_input(schema, {"data": "/tmp/d"}, component="TrainingInput")
    assert values == {"data": "/tmp/d", "epochs": 3, "schedule": "cosine"}
    with pytest.raises(InputValidationError) as e:
        validate_input(schema, {"data": "/d", "schedule": "step"}, component="TrainingInput")
    assert e.value.errors == [
        {
            "field": "schedule",
            "msg": "invalid input value: schedule='step' does not match choices "
            "['cosine', 'linear']",
            "type": "value_error.enum",
        }
    ]
    with pytest.raises(InputValidationError) as e:
        validate_input(schema, {}, component="TrainingInput")
    assert e.value.errors[0]["msg"] == "missing required input field: data"


UNION_SCHEMA = {
    "components": {
        "schemas": {
            "Input": {
                "type": "object",
                "properties": {
                    "u": {
                        "anyOf": [{"type": "string"}, {"type": "number"}],
                        "nullable": True,
                    },
                    "n": {"anyOf": [{"type": "integer"}, {"type": "number"}]},
                    "xs": {
                        "anyOf": [
                            {"type": "array", "items": {"type": "integer"}},
                            {"type": "array", "items": {"type": "number"}},
                        ]
                    },
                    "o": {"anyOf": [{"type": "boolean"}, {"type": "object"}]},
                },
            }
        }
    }
}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"u": 1}, {"u": 1}),  # the wire type kept: not widened to 1.0
        ({"u": 1.5}, {"u": 1.5}),
        ({"u": "1"}, {"u": "1"}),
        ({"u": None}, {"u": None}),
        ({"n": 2}, {"n": 2}),
        ({"n": 2.0}, {"n": 2.0}),  # a float stays a float where number is a member
        ({"xs": []}, {"xs": []}),
        ({"xs": [1, 2.5]}, {"xs": [1, 2.5]}),
        ({"o": False}, {"o": False}),
        ({"o": {"k": [1]}}, {"o": {"k": [1]}}),
    ],
)
def test_union_accepts_member_types(raw: dict, expected: dict) -> None:
    assert validate_input(UNION_SCHEMA, raw)[0] == expected


@pytest.mark.parametrize(
    "raw",
    [
        {"u": True},
        {"u": {}},
        {"u": [1]},
        {"n": True},
        {"n": "3"},
        {"n": None},
        {"xs": ["3"]},
        {"xs": [1, None]},
        {"xs": 1},
        {"o": 0},
    ],
)
def test_union_rejects_values_of_no_member_type(raw: dict) -> None:
    with pytest.raises(InputValidationError) as e:
        validate_input(UNION_SCHEMA, raw)
    (error,) = e.value.errors
    assert error["type"] == "type_error.union"
    assert "is not one of the types" in error["msg"]
