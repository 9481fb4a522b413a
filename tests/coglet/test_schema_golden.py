"""Golden OpenAPI schemas for every input and output kind.

Each case loads a fixture predictor from tests/models/schema/ and compares its whole schema
with tests/coglet/golden/<name>.json. After an intended change, regenerate and review:

    COG_UPDATE_GOLDEN=1 .venv/bin/pytest tests/coglet/test_schema_golden.py -q
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from coglet.predictor import MODE_TRAIN, load_predictor
from coglet.schema import add_training

FIXTURES = Path(__file__).resolve().parents[1] / "models" / "schema"
GOLDEN = Path(__file__).resolve().parent / "golden"

CASES = {
    "inputs": "sch_inputs.py:Predictor",
    "choices": "sch_choices.py:Predictor",
    "objects": "sch_objects.py:Predictor",
    "out_str": "sch_out_simple.py:OutStr",
    "out_int": "sch_out_simple.py:OutInt",
    "out_float": "sch_out_simple.py:OutFloat",
    "out_bool": "sch_out_simple.py:OutBool",
    "out_path": "sch_out_simple.py:OutPath",
    "out_secret": "sch_out_simple.py:OutSecret",
    "out_list_path": "sch_out_simple.py:OutListPath",
    "out_dict": "sch_out_simple.py:OutDict",
    "out_any": "sch_out_simple.py:OutAny",
    "out_iterator": "sch_out_iter.py:Iter",
    "out_async_iterator": "sch_out_iter.py:AsyncIter",
    "out_concatenate": "sch_out_iter.py:Concat",
    "out_async_concatenate": "sch_out_iter.py:AsyncConcat",
    "out_iterator_of_model": "sch_out_iter.py:Frames",
    "runner": "sch_runner.py:Runner",
    "function": "sch_runner.py:predict",
    "compat_inputs": "sch_compat.py:Inputs",
    "out_nested_list": "sch_compat.py:NestedOut",
    "out_union": "sch_compat.py:UnionOut",
    "out_coder": "sch_compat.py:CoderOut",
    # predict: + train: (the second ref is loaded in train mode; Cog's Training* components)
    "training": "sch_compat.py:NestedOut+sch_train.py:train",
    "training_class": "sch_compat.py:NestedOut+sch_train.py:Trainer",
}


def schema_of(ref: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.chdir(FIXTURES)
    predict_ref, _, train_ref = ref.partition("+")
    schema = load_predictor(predict_ref).openapi_schema()
    if train_ref:
        trainer = load_predictor(train_ref, mode=MODE_TRAIN)
        add_training(schema, trainer.inputs, trainer.output)
    return schema


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_schema(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    schema = schema_of(CASES[name], monkeypatch)
    golden = GOLDEN / f"{name}.json"
    if os.environ.get("COG_UPDATE_GOLDEN") == "1":
        golden.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    assert golden.exists(), f"no golden file {golden}; run with COG_UPDATE_GOLDEN=1"
    assert schema == json.loads(golden.read_text())
    # The schema must survive JSON as-is: the runner writes it to openapi.json.
    assert json.loads(json.dumps(schema)) == schema


# --- what the goldens must say, checked independently of them ----------------------------------
def test_envelope_components(monkeypatch: pytest.MonkeyPatch) -> None:
    schema = schema_of(CASES["out_str"], monkeypatch)
    assert schema["openapi"].startswith("3.0")
    components = schema["components"]["schemas"]
    for name in (
        "Input",
        "Output",
        "PredictionRequest",
        "PredictionResponse",
        "Status",
        "WebhookEvent",
        "HTTPValidationError",
        "ValidationError",
    ):
        assert name in components, name
    assert components["Status"]["enum"] == [
        "starting",
        "processing",
        "succeeded",
        "canceled",
        "failed",
    ]
    assert components["WebhookEvent"]["enum"] == ["start", "output", "logs", "completed"]
    request = components["PredictionRequest"]["properties"]
    assert request["input"] == {"$ref": "#/components/schemas/Input"}


def test_input_properties(monkeypatch: pytest.MonkeyPatch) -> None:
    schema = schema_of(CASES["inputs"], monkeypatch)
    inp = schema["components"]["schemas"]["Input"]
    props = inp["properties"]
    assert [props[n]["x-order"] for n in props] == list(range(len(props)))
    assert inp["required"] == ["text", "image", "legacy", "words"]
    assert props["text"] == {
        "x-order": 0,
        "title": "Text",
        "type": "string",
        "description": "Text",
        "minLength": 1,
        "maxLength": 100,
        "pattern": "^[a-z ]+$",
    }
    assert props["count"]["minimum"] == 1 and props["count"]["maximum"] == 10
    assert props["count"]["default"] == 3
    assert props["ratio"] == {
        "x-order": 2,
        "title": "Ratio",
        "type": "number",
        "default": 2.0,
        "minimum": 0.5,
    }
    assert props["image"]["format"] == "uri" and props["legacy"]["format"] == "uri"
    assert props["token"]["format"] == "password"
    assert props["token"]["writeOnly"] is True and props["token"]["x-cog-secret"] is True
    assert "default" not in props["token"]  # a secret's default is never published
    assert props["note"]["nullable"] is True and "default" not in props["note"]
    assert props["maybe_paths"]["type"] == "array" and props["maybe_paths"]["nullable"] is True
    assert props["numbers"]["default"] == [1, 2]
    assert props["words"]["items"] == {"type": "string"}
    assert props["old"]["deprecated"] is True


def test_choices_are_enum_components(monkeypatch: pytest.MonkeyPatch) -> None:
    components = schema_of(CASES["choices"], monkeypatch)["components"]["schemas"]
    props = components["Input"]["properties"]
    assert props["mode"]["allOf"] == [{"$ref": "#/components/schemas/mode"}]
    assert props["mode"]["default"] == "fast"
    assert components["mode"] == {
        "title": "mode",
        "description": "An enumeration.",
        "enum": ["fast", "slow"],
        "type": "string",
    }
    assert components["steps"]["type"] == "integer"
    assert components["steps"]["enum"] == [10, 20, 50]
    assert components["color"]["enum"] == ["red", "green"]
    assert props["color"]["default"] == "green"
    assert components["size"]["enum"] == [1, 2]
    assert components["shade"]["enum"] == ["red", "green"]
    assert props["shade"]["default"] == "red"
    assert props["modes"]["items"] == {"allOf": [{"$ref": "#/components/schemas/modes"}]}
    assert components["Input"]["required"] == ["steps", "size"]


def test_object_output_and_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    components = schema_of(CASES["objects"], monkeypatch)["components"]["schemas"]
    out = components["Output"]
    assert out["title"] == "Output" and out["type"] == "object"
    assert out["required"] == ["text", "score", "image", "tags", "extra"]
    assert out["properties"]["image"] == {"title": "Image", "type": "string", "format": "uri"}
    assert out["properties"]["extra"]["nullable"] is True
    box = components["Input"]["properties"]["box"]
    assert box["type"] == "object" and box["required"] == ["width"]
    meta = components["Input"]["properties"]["meta"]
    assert meta["required"] == ["author", "year"]
    assert components["Input"]["properties"]["weights"]["additionalProperties"] == {
        "type": "number"
    }


@pytest.mark.parametrize(
    ("name", "items", "display"),
    [
        ("out_iterator", {"type": "string", "format": "uri"}, None),
        ("out_async_iterator", {"type": "integer"}, None),
        ("out_concatenate", {"type": "string"}, "concatenate"),
        ("out_async_concatenate", {"type": "string"}, "concatenate"),
    ],
)
def test_iterator_outputs(
    name: str, items: dict, display: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = schema_of(CASES[name], monkeypatch)["components"]["schemas"]["Output"]
    assert out["type"] == "array"
    assert out["items"] == items
    assert out["x-cog-array-type"] == "iterator"
    assert out.get("x-cog-array-display") == display
