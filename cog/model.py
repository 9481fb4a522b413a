"""``cog.BaseModel``: the base of structured outputs (a dataclass, no pydantic)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict

__all__ = ["BaseModel"]


def _is_optional(cls: type, field: dataclasses.Field) -> bool:
    try:
        hint = typing.get_type_hints(cls).get(field.name, field.type)
    except Exception:  # an unresolvable string annotation: judge by its text
        hint = field.type
    if isinstance(hint, str):
        text = hint.replace(" ", "")
        return text.startswith(("Optional[", "typing.Optional[")) or "|None" in text
    return type(None) in typing.get_args(hint)


class BaseModel:
    """Subclasses declare annotated fields and are built with keyword arguments.

    Each subclass becomes a dataclass (fields, ``repr``, ``==``) with a keyword-friendly
    ``__init__``: fields without a default are required, except ``Optional`` ones, which
    default to None.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(cls, init=False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        if len(args) > len(fields):
            raise TypeError(
                f"{type(self).__name__}() takes {len(fields)} positional arguments "
                f"but {len(args)} were given"
            )
        values: Dict[str, Any] = {}
        for field, arg in zip(fields, args):
            values[field.name] = arg
        for name, value in kwargs.items():
            if name in values:
                raise TypeError(f"{type(self).__name__}() got multiple values for {name!r}")
            values[name] = value
        known = {f.name for f in fields}
        unknown = [name for name in values if name not in known]
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected fields: {', '.join(unknown)}")
        for field in fields:
            setattr(self, field.name, self._field_value(field, values))

    def _field_value(self, field: dataclasses.Field, values: Dict[str, Any]) -> Any:
        if field.name in values:
            return values[field.name]
        if field.default is not dataclasses.MISSING:
            return field.default
        if field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
        if _is_optional(type(self), field):
            return None
        raise TypeError(f"{type(self).__name__}() missing required field: {field.name!r}")
