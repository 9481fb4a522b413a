"""The model's OpenAPI 3.0 schema, in Cog's shape (components only; the pool adds paths).

Standard library only.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from typing import Any, Dict, List, Sequence

from cog.input import MISSING

from coglet import types as t
from coglet.types import CogType, InputSpec, OutputType

__all__ = ["add_training", "input_property", "json_type", "openapi_schema", "title"]

OPENAPI_VERSION = "3.0.2"
_REF = "#/components/schemas/"
_FIXED_COMPONENTS = frozenset(
    {
        "Input",
        "Output",
        "PredictionRequest",
        "PredictionResponse",
        "Status",
        "WebhookEvent",
        "HTTPValidationError",
        "ValidationError",
        "TrainingInput",
        "TrainingOutput",
        "TrainingRequest",
        "TrainingResponse",
    }
)


def title(name: str) -> str:
    """Cog's titles: ``max_new_tokens`` -> ``Max New Tokens``."""
    return name.replace("_", " ").title()


def json_type(ct: CogType) -> Dict[str, Any]:
    """JSON Schema of one resolved type (no title)."""
    primitive = _PRIMITIVE_SCHEMAS.get(ct.kind)
    if primitive is not None:
        schema = dict(primitive)
        if ct.enum_values is not None:
            schema["enum"] = list(ct.enum_values)
        return schema
    if ct.kind == t.LIST and ct.item is not None:
        return {"type": "array", "items": json_type(ct.item)}
    if ct.kind == t.OPTIONAL and ct.item is not None:
        return {**json_type(ct.item), "nullable": True}
    if ct.kind == t.DICT and ct.item is not None:
        schema = {"type": "object"}
        if ct.item.kind != t.ANY:
            schema["additionalProperties"] = json_type(ct.item)
        return schema
    if ct.kind == t.OBJECT:
        return _object_schema(ct)
    if ct.kind == t.UNION:
        return {"anyOf": [json_type(v) for v in ct.variants]}
    if ct.kind == t.CUSTOM:
        return {"type": "object"}  # as Cog: a coder's value is a JSON object
    return {}  # Any: an opaque JSON value, unchecked


_PRIMITIVE_SCHEMAS: Dict[str, Dict[str, Any]] = {
    t.STR: {"type": "string"},
    t.INT: {"type": "integer"},
    t.FLOAT: {"type": "number"},
    t.BOOL: {"type": "boolean"},
    t.PATH: {"type": "string", "format": "uri"},
    t.FILE: {"type": "string", "format": "uri"},
    t.SECRET: {"type": "string", "format": "password", "writeOnly": True, "x-cog-secret": True},
}


def _object_schema(ct: CogType) -> Dict[str, Any]:
    properties = {name: {"title": title(name), **json_type(ft)} for name, ft in ct.fields}
    schema: Dict[str, Any] = {"type": "object", "properties": properties}
    if ct.required:
        schema["required"] = list(ct.required)
    return schema


# --- defaults ----------------------------------------------------------------------------------
def encode_default(value: Any, ct: CogType) -> Any:
    """A Python default as the JSON the schema shows (and the validator fills in)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        item = ct.element if ct.kind in (t.LIST, t.OPTIONAL) else ct
        return [encode_default(v, item) for v in value]
    if isinstance(value, dict):
        return {str(k): encode_default(v, ct) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: encode_default(getattr(value, f.name), ct) for f in dataclasses.fields(value)
        }
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if ct.element.kind == t.FLOAT and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def has_default(spec: InputSpec) -> bool:
    return spec.default_factory is not None or spec.default is not MISSING


def schema_default(spec: InputSpec) -> Any:
    """The default to publish; MISSING when none is shown."""
    if spec.type.element.kind == t.SECRET:
        # Departure from Cog, which publishes a Secret's default in clear: the schema is public.
        return MISSING
    if spec.default_factory is not None:
        return encode_default(spec.default_factory(), spec.type)
    if spec.default is MISSING or spec.default is None:
        return MISSING
    return encode_default(spec.default, spec.type)


# --- Input -------------------------------------------------------------------------------------
def enum_component_name(spec: InputSpec, prefix: str = "") -> str:
    """Cog names a choices component after the field; avoid clobbering a fixed component.

    ``prefix`` (``Training``) keeps a train() input's choices apart from predict()'s.
    """
    name = prefix + spec.name
    return f"{name}Choices" if name in _FIXED_COMPONENTS else name


def _choices(spec: InputSpec) -> Any:
    if spec.choices is not None:
        return list(spec.choices)
    enum_values = spec.type.element.enum_values
    return list(enum_values) if enum_values is not None else None


def input_property(spec: InputSpec, prefix: str = "") -> Dict[str, Any]:
    """The ``Input.properties[name]`` entry of one parameter."""
    prop: Dict[str, Any] = {"x-order": spec.order}
    if _choices(spec) is not None:
        ref = {"allOf": [{"$ref": _REF + enum_component_name(spec, prefix)}]}
        if spec.type.is_list:
            prop.update({"title": title(spec.name), "type": "array", "items": ref})
        else:
            prop.update(ref)
    else:
        prop["title"] = title(spec.name)
        inner = spec.type.item if spec.type.is_optional and spec.type.item else spec.type
        prop.update(json_type(inner))
    default = schema_default(spec)
    if default is not MISSING:
        prop["default"] = default
    if spec.type.is_optional:
        prop["nullable"] = True
    for key, value in (
        ("description", spec.description),
        ("minimum", spec.ge),
        ("maximum", spec.le),
        ("minLength", spec.min_length),
        ("maxLength", spec.max_length),
        ("pattern", spec.regex),
        ("deprecated", spec.deprecated),
    ):
        if value is not None:
            prop[key] = value
    return prop


def is_required(spec: InputSpec) -> bool:
    return not has_default(spec) and not spec.type.is_optional


def input_schema(
    inputs: Sequence[InputSpec], title: str = "Input", prefix: str = ""
) -> Dict[str, Any]:
    schema: Dict[str, Any] = {
        "title": title,
        "type": "object",
        "properties": {spec.name: input_property(spec, prefix) for spec in inputs},
    }
    required = [spec.name for spec in inputs if is_required(spec)]
    if required:
        schema["required"] = required
    return schema


def enum_components(inputs: Sequence[InputSpec], prefix: str = "") -> Dict[str, Any]:
    components: Dict[str, Any] = {}
    for spec in inputs:
        choices = _choices(spec)
        if choices is None:
            continue
        components[enum_component_name(spec, prefix)] = {
            "title": spec.name,
            "description": "An enumeration.",
            "enum": choices,
            "type": "integer" if spec.type.element.kind == t.INT else "string",
        }
    return components


# --- Output ------------------------------------------------------------------------------------
def output_schema(output: OutputType, title: str = "Output") -> Dict[str, Any]:
    schema: Dict[str, Any] = {"title": title}
    if output.iterator is None:
        schema.update(json_type(output.type))
        return schema
    schema.update(
        {"type": "array", "items": json_type(output.type), "x-cog-array-type": "iterator"}
    )
    if output.iterator == t.ITER_CONCATENATE:
        schema["x-cog-array-display"] = "concatenate"
    return schema


# --- the fixed envelope ------------------------------------------------------------------------
_STATUSES: List[str] = ["starting", "processing", "succeeded", "canceled", "failed"]
_WEBHOOK_EVENTS: List[str] = ["start", "output", "logs", "completed"]


def _date_time(name: str) -> Dict[str, Any]:
    return {"title": title(name), "type": "string", "format": "date-time"}


def _fixed_components() -> Dict[str, Any]:
    return {
        "PredictionRequest": {
            "title": "PredictionRequest",
            "type": "object",
            "properties": {
                "input": {"$ref": _REF + "Input"},
                "id": {"title": "Id", "type": "string"},
                "created_at": _date_time("created_at"),
                "context": {
                    "title": "Context",
                    "type": "object",
                    "additionalProperties": {"type": "string"},
                },
                "webhook": {
                    "title": "Webhook",
                    "maxLength": 65536,
                    "minLength": 1,
                    "type": "string",
                    "format": "uri",
                },
                "webhook_events_filter": {
                    "type": "array",
                    "items": {"$ref": _REF + "WebhookEvent"},
                    "default": list(_WEBHOOK_EVENTS),
                },
            },
        },
        "PredictionResponse": {
            "title": "PredictionResponse",
            "type": "object",
            "properties": {
                "input": {"$ref": _REF + "Input"},
                "output": {"$ref": _REF + "Output"},
                "id": {"title": "Id", "type": "string"},
                "version": {"title": "Version", "type": "string"},
                "created_at": _date_time("created_at"),
                "started_at": _date_time("started_at"),
                "completed_at": _date_time("completed_at"),
                "logs": {"title": "Logs", "type": "string", "default": ""},
                "error": {"title": "Error", "type": "string"},
                "status": {"$ref": _REF + "Status"},
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
        "Status": {
            "title": "Status",
            "description": "An enumeration.",
            "enum": list(_STATUSES),
            "type": "string",
        },
        "WebhookEvent": {
            "title": "WebhookEvent",
            "description": "An enumeration.",
            "enum": list(_WEBHOOK_EVENTS),
            "type": "string",
        },
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {
                "detail": {
                    "title": "Detail",
                    "type": "array",
                    "items": {"$ref": _REF + "ValidationError"},
                }
            },
        },
        "ValidationError": {
            "title": "ValidationError",
            "required": ["loc", "msg", "type"],
            "type": "object",
            "properties": {
                "loc": {
                    "title": "Location",
                    "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                },
                "msg": {"title": "Message", "type": "string"},
                "type": {"title": "Error Type", "type": "string"},
            },
        },
    }


def openapi_schema(inputs: Sequence[InputSpec], output: OutputType) -> Dict[str, Any]:
    """The whole document: ``openapi``, ``info``, empty ``paths``, ``components.schemas``."""
    components = _fixed_components()
    components["Input"] = input_schema(inputs)
    components["Output"] = output_schema(output)
    components.update(enum_components(inputs))
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {},
        "components": {"schemas": components},
    }


# --- trainings (cog.yaml train:) ---------------------------------------------------------------
TRAINING_PREFIX = "Training"


def add_training(
    schema: Dict[str, Any], inputs: Sequence[InputSpec], output: OutputType
) -> Dict[str, Any]:
    """``schema`` with Cog's training components: ``TrainingInput``, ``TrainingOutput``,
    ``TrainingRequest``, ``TrainingResponse`` (and the training inputs' choices, prefixed)."""
    components = schema["components"]["schemas"]
    components["TrainingInput"] = input_schema(inputs, "TrainingInput", TRAINING_PREFIX)
    components["TrainingOutput"] = output_schema(output, "TrainingOutput")
    components.update(enum_components(inputs, TRAINING_PREFIX))
    fixed = _fixed_components()
    for name, kind in (("Request", "PredictionRequest"), ("Response", "PredictionResponse")):
        component = fixed[kind]
        component["title"] = f"Training{name}"
        properties = component["properties"]
        properties["input"] = {"$ref": _REF + "TrainingInput"}
        if "output" in properties:
            properties["output"] = {"$ref": _REF + "TrainingOutput"}
        components[f"Training{name}"] = component
    return schema
