"""Validate a prediction's input against the model's OpenAPI schema, with Cog's messages.

Works only from the JSON schema (``components.schemas.Input`` and the enum components it
references), so the pool can answer 422 before any runner is used and the runner gives the
same answer from the same code. Standard library only.

The input is hostile: any JSON value of any size or depth. Only :class:`InputValidationError`
ever leaves :func:`validate_input`; work is bounded by the schema's depth, never the input's.
"""

from __future__ import annotations

import copy
import math
import re
import reprlib
from typing import Any, Dict, List, Optional, Tuple, Union

__all__ = ["InputValidationError", "validate_input"]

_MAX_SCHEMA_DEPTH = 32
_NUMERIC_KEYS = ("minimum", "maximum")
_STRING_KEYS = ("minLength", "maxLength", "pattern")
_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "array": "a list",
    "object": "an object",
}


class InputValidationError(Exception):
    """The input does not match the schema. ``errors``: ``[{"field", "msg", "type"}]``."""

    def __init__(self, errors: List[Dict[str, str]]) -> None:
        super().__init__("; ".join(e["msg"] for e in errors))
        self.errors = errors


class _Invalid(Exception):
    """One field's problem, before the ``invalid input value:`` prefix is added."""

    def __init__(self, msg: str, type_: str) -> None:
        super().__init__(msg)
        self.msg = msg
        self.type = type_


_repr = reprlib.Repr()
_repr.maxstring = 200
_repr.maxother = 200
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 10
_repr.maxlevel = 3


def _short(value: Any) -> str:
    """A bounded repr: a hostile value must not make a huge (or failing) message."""
    try:
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
            return "<a very large integer>"
        return _repr.repr(value)
    except Exception:
        return f"<{type(value).__name__}>"


# --- schema helpers ----------------------------------------------------------------------------
def _components(schema: Any) -> Dict[str, Any]:
    if not isinstance(schema, dict):
        return {}
    comps = schema.get("components")
    schemas = comps.get("schemas") if isinstance(comps, dict) else None
    return schemas if isinstance(schemas, dict) else {}


def _deref(prop: Any, components: Dict[str, Any], depth: int = 0) -> Dict[str, Any]:
    """Merge ``$ref`` and ``allOf`` targets into one flat property schema."""
    if not isinstance(prop, dict) or depth > _MAX_SCHEMA_DEPTH:
        return {}
    merged: Dict[str, Any] = {}
    ref = prop.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
        merged.update(_deref(components.get(ref.rsplit("/", 1)[-1]), components, depth + 1))
    all_of = prop.get("allOf")
    if isinstance(all_of, list):
        for part in all_of:
            merged.update(_deref(part, components, depth + 1))
    merged.update({k: v for k, v in prop.items() if k not in ("$ref", "allOf")})
    return merged


# --- the validator -----------------------------------------------------------------------------
def validate_input(
    schema: Dict[str, Any], raw: Any, component: str = "Input"
) -> Tuple[Dict[str, Any], List[str]]:
    """Check ``raw`` against ``schema`` (a whole openapi.json).

    ``component`` names the inputs' component: ``Input``, or ``TrainingInput`` for a training.

    Returns ``(values, warnings)``: values coerced to their JSON types (an int given for a
    number becomes a float), schema defaults filled in (as fresh copies), unknown keys dropped
    with a warning each. Raises :class:`InputValidationError` listing every bad field.
    """
    if not isinstance(raw, dict):
        raise InputValidationError(
            [{"field": "input", "msg": "input must be a JSON object", "type": "type_error.dict"}]
        )
    components = _components(schema)
    input_schema = components.get(component)
    input_schema = input_schema if isinstance(input_schema, dict) else {}
    props = input_schema.get("properties")
    props = props if isinstance(props, dict) else {}
    required = input_schema.get("required")
    required = required if isinstance(required, list) else []

    warnings = [f"unknown input field ignored: {_short(key)}" for key in raw if key not in props]
    values: Dict[str, Any] = {}
    errors: List[Dict[str, str]] = []
    for name, prop in props.items():
        if name not in raw:
            _fill_default(name, prop, name in required, values, errors)
            continue
        try:
            values[name] = _check(name, raw[name], _deref(prop, components), components, 0)
        except _Invalid as e:
            errors.append({"field": name, "msg": f"invalid input value: {e.msg}", "type": e.type})
        except Exception as e:  # a bug or an odd schema must still answer as a 422
            errors.append(
                {
                    "field": name,
                    "msg": f"invalid input value: {name} could not be validated "
                    f"({type(e).__name__})",
                    "type": "value_error",
                }
            )
    failed = {e["field"] for e in errors}
    for key, value in raw.items():
        problem = None if key in failed else _unwritable(key) or _unwritable(value)
        if problem is not None:
            msg, type_ = problem
            label = key if _unwritable(key) is None else _short(key)
            errors.append(
                {"field": key, "msg": f"invalid input value: {label} {msg}", "type": type_}
            )
    if errors:
        raise InputValidationError(errors)
    return values, warnings


# Strings hold code points, and a lone surrogate (U+D800..U+DFFF) is one no UTF-8 encoder
# accepts: such a value could never be written to the runner's request file.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _unwritable(value: Any) -> Optional[Tuple[str, str]]:
    """Why ``value`` (any key or value, any depth) cannot travel as strict UTF-8 JSON."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = None if item.isascii() else _SURROGATE.search(item)
            if found is not None:
                return (
                    f"contains a lone surrogate (U+{ord(found.group()):04X}), which is not "
                    "valid Unicode",
                    "value_error.str.surrogate",
                )
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"is not a finite number ({item!r})", "value_error.number.not_finite"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return None


def _fill_default(
    name: str, prop: Any, is_required: bool, values: Dict[str, Any], errors: List[Dict[str, str]]
) -> None:
    if is_required:
        errors.append(
            {
                "field": name,
                "msg": f"missing required input field: {name}",
                "type": "value_error.missing",
            }
        )
    elif isinstance(prop, dict) and "default" in prop:
        values[name] = copy.deepcopy(prop["default"])


def _check(label: str, value: Any, prop: Dict[str, Any], comps: Dict[str, Any], depth: int) -> Any:
    """Validate and coerce one value; ``label`` names it in messages (``xs[2]``, ``cfg.k``)."""
    if depth > _MAX_SCHEMA_DEPTH:
        raise _Invalid(f"{label} is nested too deeply", "value_error")
    if value is None and prop.get("nullable"):
        return None
    variants = prop.get("anyOf")
    if isinstance(variants, list):
        return _check_union(label, value, variants, comps, depth)
    if value is None:
        raise _type_error(label, value, prop.get("type"))
    kind = prop.get("type")
    if kind == "array":
        return _check_array(label, value, prop, comps, depth)
    if kind == "object":
        return _check_object(label, value, prop, comps, depth)
    value = _check_scalar_type(label, value, kind)
    _check_choices(label, value, prop)
    _check_numeric(label, value, prop)
    _check_string(label, value, prop)
    return value


# --- unions (``str | float | None``, ``list[int] | list[float]``), as Cog 0.23 --------------------
# A member whose JSON type is the value's own is tried first, then the others in this order;
# the value keeps its wire type (1 stays an int even where only a number member takes it, as
# Cog 0.23 passes it). A bool is never a number and a string never a number: union members
# match by wire type, without the coercion a plain number input allows.
_UNION_ORDER = {"boolean": 0, "integer": 1, "number": 2, "string": 3, "object": 4}


def _member_kind(variant: Dict[str, Any]) -> Tuple[bool, Any]:
    """(is a list, the scalar JSON type) of one union member."""
    if variant.get("type") == "array":
        items = variant.get("items")
        return True, items.get("type") if isinstance(items, dict) else None
    return False, variant.get("type")


def _scalar_accepts(value: Any, kind: Any, exact: bool) -> bool:
    if kind == "boolean":
        return type(value) is bool
    if kind == "integer":
        return type(value) is int
    if kind == "number":
        return type(value) is float or (not exact and type(value) is int)
    if kind == "string":
        return type(value) is str
    if kind == "object":
        return isinstance(value, dict)
    return kind is None  # a member with no type takes anything


def _member_accepts(value: Any, variant: Dict[str, Any], exact: bool) -> bool:
    is_list, kind = _member_kind(variant)
    if is_list:
        if not isinstance(value, list):
            return False
        return exact or all(_scalar_accepts(v, kind, False) for v in value)
    return _scalar_accepts(value, kind, exact)


def _check_union(
    label: str, value: Any, variants: List[Any], comps: Dict[str, Any], depth: int
) -> Any:
    members = [_deref(v, comps) for v in variants]

    def rank(item: Tuple[int, Dict[str, Any]]) -> Tuple[bool, int, int]:
        index, member = item
        is_list, kind = _member_kind(member)
        order = _UNION_ORDER.get(kind, 9) if isinstance(kind, str) else 9
        return (not _member_accepts(value, member, True), 10 * is_list + order, index)

    for _, member in sorted(enumerate(members), key=rank):
        if not _member_accepts(value, member, False):
            continue
        try:
            _check(label, value, member, comps, depth + 1)
        except _Invalid:
            continue
        return value  # the wire type kept: the member's check would widen an int
    names = ", ".join(_member_name(m) for m in members)
    raise _Invalid(f"{label}={_short(value)} is not one of the types: {names}", "type_error.union")


def _member_name(member: Dict[str, Any]) -> str:
    is_list, kind = _member_kind(member)
    word = kind if isinstance(kind, str) else "any"
    return f"list of {word}" if is_list else word


def _type_error(label: str, value: Any, kind: Any) -> _Invalid:
    word = _TYPE_WORDS.get(kind, "valid") if isinstance(kind, str) else "valid"
    type_ = f"type_error.{kind}" if isinstance(kind, str) else "type_error"
    return _Invalid(f"{label}={_short(value)} is not {word}", type_)


def _check_scalar_type(label: str, value: Any, kind: Any) -> Any:
    if kind == "string":
        if isinstance(value, str):
            return value
    elif kind == "boolean":
        if isinstance(value, bool):
            return value
    elif kind == "integer":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        # JSON has one number type; 3.0 is the integer 3 for many clients.
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
    elif kind == "number":
        if isinstance(value, float):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise _Invalid(f"{label}={_short(value)} is out of range", "value_error") from None
    else:  # no type (or one we do not know): anything goes
        return value
    raise _type_error(label, value, kind)


def _check_choices(label: str, value: Any, prop: Dict[str, Any]) -> None:
    choices = prop.get("enum")
    if isinstance(choices, list) and not any(
        type(value) is type(c) and value == c for c in choices
    ):
        raise _Invalid(
            f"{label}={_short(value)} does not match choices {_short_choices(choices)}",
            "value_error.enum",
        )


def _short_choices(choices: List[Any]) -> str:
    if len(choices) <= 50:
        return repr(choices) if all(isinstance(c, (str, int)) for c in choices) else _short(choices)
    return _short(choices)


def _check_numeric(label: str, value: Any, prop: Dict[str, Any]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    minimum, maximum = _number(prop.get("minimum")), _number(prop.get("maximum"))
    if minimum is not None and value < minimum:
        raise _Invalid(
            f"{label}={_short(value)} fails constraint >= {minimum}", "value_error.number.not_ge"
        )
    if maximum is not None and value > maximum:
        raise _Invalid(
            f"{label}={_short(value)} fails constraint <= {maximum}", "value_error.number.not_le"
        )


def _number(x: Any) -> Optional[Union[int, float]]:
    """``x`` when the schema gives a real number there, else None."""
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _check_string(label: str, value: Any, prop: Dict[str, Any]) -> None:
    if not isinstance(value, str):
        return
    min_length, max_length = _number(prop.get("minLength")), _number(prop.get("maxLength"))
    if min_length is not None and len(value) < min_length:
        raise _Invalid(
            f"{label}={_short(value)} fails constraint len() >= {min_length}",
            "value_error.any_str.min_length",
        )
    if max_length is not None and len(value) > max_length:
        raise _Invalid(
            f"{label}={_short(value)} fails constraint len() <= {max_length}",
            "value_error.any_str.max_length",
        )
    pattern = prop.get("pattern")
    if isinstance(pattern, str) and _compiled(pattern).match(value) is None:
        raise _Invalid(
            f"{label}={_short(value)} does not match regex {pattern!r}", "value_error.str.regex"
        )


_PATTERNS: Dict[str, re.Pattern[str]] = {}


def _compiled(pattern: str) -> re.Pattern[str]:
    compiled = _PATTERNS.get(pattern)
    if compiled is None:
        compiled = re.compile(pattern)
        if len(_PATTERNS) < 1024:
            _PATTERNS[pattern] = compiled
    return compiled


def _check_array(
    label: str, value: Any, prop: Dict[str, Any], comps: Dict[str, Any], depth: int
) -> List[Any]:
    if not isinstance(value, list):
        raise _type_error(label, value, "array")
    items = _deref(prop.get("items"), comps)
    # Cog puts an element's constraints (minimum, minLength, ...) on the array property itself.
    for key in _NUMERIC_KEYS + _STRING_KEYS:
        if key in prop and key not in items:
            items[key] = prop[key]
    return [_check(f"{label}[{i}]", v, items, comps, depth + 1) for i, v in enumerate(value)]


def _check_object(
    label: str, value: Any, prop: Dict[str, Any], comps: Dict[str, Any], depth: int
) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise _type_error(label, value, "object")
    props = prop.get("properties")
    extra = prop.get("additionalProperties")
    out: Dict[str, Any] = {}
    if isinstance(props, dict):
        for key in value:
            if key not in props and not isinstance(extra, dict):
                raise _Invalid(f"{label}.{_short(key)} is not a known field", "value_error.extra")
        required = prop.get("required")
        for key in required if isinstance(required, list) else []:
            if key not in value:
                raise _Invalid(f"{label}.{key} is missing", "value_error.missing")
    for key, item in value.items():
        sub = props.get(key) if isinstance(props, dict) and key in props else extra
        if isinstance(sub, dict):
            out[key] = _check(f"{label}.{key}", item, _deref(sub, comps), comps, depth + 1)
        else:
            out[key] = item
    return out
