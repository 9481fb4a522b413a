"""Cog's type model: a Python annotation resolved into what the schema, the validator and the
coercion of inputs need to know about it.

Standard library only (the model's interpreter, CPython 3.9+).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import io
import os
import sys
import typing
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from cog.coder import Coder
from cog.markers import Opaque
from cog.model import BaseModel
from cog.types import AsyncConcatenateIterator, ConcatenateIterator, File, Path, Secret

__all__ = [
    "ITER_CONCATENATE",
    "ITER_PLAIN",
    "CogType",
    "InputSpec",
    "OutputType",
    "pydantic_fields",
    "resolve_output",
    "resolve_type",
    "type_name",
]

# kinds
STR, INT, FLOAT, BOOL = "str", "int", "float", "bool"
PATH, FILE, SECRET = "path", "file", "secret"
LIST, OPTIONAL, OBJECT, DICT, ANY = "list", "optional", "object", "dict", "any"
UNION, CUSTOM = "union", "custom"
PRIMITIVE_KINDS = frozenset({STR, INT, FLOAT, BOOL, PATH, FILE, SECRET})

ITER_PLAIN = "iterator"
ITER_CONCATENATE = "concatenate"

_EXACT = {str: STR, int: INT, float: FLOAT, bool: BOOL}

if sys.version_info >= (3, 10):
    import types as _pytypes

    _UNION_ORIGINS: Tuple[Any, ...] = (typing.Union, _pytypes.UnionType)
else:  # pragma: no cover - exercised under 3.9 by the subprocess test
    _UNION_ORIGINS = (typing.Union,)


@dataclass(frozen=True)
class CogType:
    """One resolved annotation.

    ``kind`` is a primitive kind, or ``list``/``optional``/``dict`` (with ``item``), or
    ``object`` (with ``fields``), or ``union`` (with ``variants``: ``str | float``; a None
    member makes it the item of an ``optional``), or ``custom`` (a type a registered
    ``cog.coder.Coder`` handles, with ``coder``), or ``any``. ``py`` is the annotation's own
    class where it matters for coercion (an Enum, a Path subclass, a dataclass, a TypedDict).
    ``enum_values`` holds the choices of an Enum or a ``Literal[...]``.
    """

    kind: str
    py: Any = None
    item: Optional[CogType] = None
    fields: Tuple[Tuple[str, CogType], ...] = ()
    required: Tuple[str, ...] = ()
    enum_values: Optional[Tuple[Any, ...]] = None
    variants: Tuple[CogType, ...] = ()
    coder: Any = None

    @property
    def element(self) -> CogType:
        """The type under Optional and List (what constraints apply to)."""
        t = self
        while t.kind in (OPTIONAL, LIST) and t.item is not None:
            t = t.item
        return t

    @property
    def is_optional(self) -> bool:
        return self.kind == OPTIONAL

    @property
    def is_list(self) -> bool:
        t = self.item if self.kind == OPTIONAL and self.item is not None else self
        return t.kind == LIST

    def field_map(self) -> Dict[str, CogType]:
        return dict(self.fields)

    def name(self) -> str:
        """Python-ish spelling for messages: ``str``, ``Optional[str]``, ``List[int]``."""
        if self.kind == OPTIONAL and self.item is not None:
            return f"Optional[{self.item.name()}]"
        if self.kind == LIST and self.item is not None:
            return f"List[{self.item.name()}]"
        if self.kind == DICT and self.item is not None:
            return f"Dict[str, {self.item.name()}]"
        if self.kind == UNION:
            return " | ".join(v.name() for v in self.variants)
        if self.enum_values is not None and self.py is None:
            return f"Literal[{', '.join(repr(v) for v in self.enum_values)}]"
        if self.py is not None:
            return type_name(self.py)
        return {PATH: "Path", FILE: "File", SECRET: "Secret", ANY: "Any"}.get(self.kind, self.kind)


@dataclass(frozen=True)
class OutputType:
    """The resolved return annotation of predict()."""

    type: CogType
    iterator: Optional[str] = None  # None, ITER_PLAIN or ITER_CONCATENATE
    is_async_iterator: bool = False


def type_name(tp: Any) -> str:
    """``datetime`` for a class, ``List[int]``-ish text for anything else."""
    name = getattr(tp, "__name__", None)
    if isinstance(name, str) and typing.get_origin(tp) is None:
        return name
    text = str(tp)
    return text[len("typing.") :] if text.startswith("typing.") else text


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in _UNION_ORIGINS


def _is_typeddict(tp: Any) -> bool:
    is_typeddict = getattr(typing, "is_typeddict", None)
    if is_typeddict is not None:
        return bool(is_typeddict(tp))
    # Python 3.9 has no typing.is_typeddict; TypedDict classes are dicts with these markers.
    return (
        isinstance(tp, type)
        and issubclass(tp, dict)
        and hasattr(tp, "__total__")
        and hasattr(tp, "__annotations__")
    )


def _is_list(tp: Any) -> bool:
    return tp is list or tp is typing.List or typing.get_origin(tp) is list


def _is_dict(tp: Any) -> bool:
    return tp is dict or tp is typing.Dict or typing.get_origin(tp) is dict


def resolve_type(tp: Any) -> CogType:
    """Resolve one annotation; ``ValueError`` with Cog's wording when it is not supported."""
    if tp is typing.Any:
        return CogType(ANY)
    if typing.get_origin(tp) is typing.Annotated:
        return _resolve_annotated(tp)
    if _is_union(tp):
        return _resolve_union(tp)
    if typing.get_origin(tp) is typing.Literal:
        return _resolve_literal(tp)
    if _is_list(tp):
        return _resolve_list(tp)
    if _is_dict(tp):
        return _resolve_dict(tp)
    if isinstance(tp, type):
        return _resolve_class(tp)
    return _resolve_custom(tp)


def _resolve_annotated(tp: Any) -> CogType:
    """``Annotated[T, ...]`` is ``T``; with ``cog.Opaque`` it is an opaque JSON object (a list
    of them for a list, nullable for Optional), as Cog 0.23."""
    inner, *metadata = typing.get_args(tp)
    if not any(m is Opaque for m in metadata):
        return resolve_type(inner)
    if _is_union(inner):
        non_none = [a for a in typing.get_args(inner) if a is not type(None)]
        if len(non_none) == 1:
            return CogType(OPTIONAL, item=_opaque(non_none[0]))
    return _opaque(inner)


def _opaque(tp: Any) -> CogType:
    opaque_object = CogType(DICT, item=CogType(ANY))
    if _is_list(tp):
        return CogType(LIST, item=opaque_object)
    return opaque_object


def _resolve_custom(tp: Any) -> CogType:
    """A type only a registered coder knows (``cog.coder``), else Cog's refusal."""
    coder = Coder.lookup(tp)
    if coder is None:
        raise ValueError(f"unsupported Cog type {type_name(tp)}")
    return CogType(CUSTOM, py=tp, coder=coder)


def _resolve_union(tp: Any) -> CogType:
    """``Optional[X]``, or a union of JSON-typed members (``str | float | None``) as Cog 0.23."""
    args = typing.get_args(tp)
    non_none = [a for a in args if a is not type(None)]
    if len(non_none) == 1:
        return CogType(OPTIONAL, item=resolve_type(non_none[0]))
    variants = []
    for arg in non_none:
        try:
            variant = resolve_type(arg)
        except ValueError:
            variant = None
        if variant is None or not _is_union_member(variant):
            raise ValueError(f"unsupported union member {type_name(arg)} in union {type_name(tp)}")
        variants.append(variant)
    union = CogType(UNION, variants=tuple(variants))
    return CogType(OPTIONAL, item=union) if len(non_none) < len(args) else union


_UNION_SCALARS = frozenset({STR, INT, FLOAT, BOOL})


def _is_union_member(ct: CogType) -> bool:
    """What a union may hold (as Cog): str, int, float, bool, a dict, or a list of those."""
    if ct.kind == LIST and ct.item is not None:
        ct = ct.item
        if ct.kind == ANY:
            return True
    if ct.kind == DICT:
        return True
    return ct.kind in _UNION_SCALARS and ct.py is None and ct.enum_values is None


def _resolve_literal(tp: Any) -> CogType:
    """``Literal["a", "b"]``: a str (or int) input with those choices."""
    values = typing.get_args(tp)
    if values and all(isinstance(v, str) for v in values):
        return CogType(STR, enum_values=tuple(values))
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return CogType(INT, enum_values=tuple(values))
    raise ValueError(
        f"unsupported Cog type {type_name(tp)}: Literal values must be all str or all int"
    )


def _resolve_list(tp: Any) -> CogType:
    args = typing.get_args(tp)
    if not args:
        return CogType(LIST, item=CogType(ANY))
    # Nested lists (``List[List[float]]``, every embedding model) and lists of unions are
    # served as Cog 0.23 serves them.
    return CogType(LIST, item=resolve_type(args[0]))


def _resolve_dict(tp: Any) -> CogType:
    args = typing.get_args(tp)
    if not args:
        return CogType(DICT, item=CogType(ANY))
    if args[0] is not str:
        raise ValueError(f"unsupported Cog type {type_name(tp)}: dict keys must be str")
    return CogType(DICT, item=resolve_type(args[1]))


def _resolve_class(tp: type) -> CogType:
    if tp in _EXACT:
        return CogType(_EXACT[tp])
    if issubclass(tp, enum.Enum):
        return _resolve_enum(tp)
    if issubclass(tp, Secret):
        return CogType(SECRET, py=tp)
    if issubclass(tp, File) or tp is io.IOBase:
        return CogType(FILE, py=tp)
    if tp is os.PathLike or issubclass(tp, os.PathLike):
        return CogType(PATH, py=tp)
    if _is_typeddict(tp):
        hints = typing.get_type_hints(tp)
        required = getattr(tp, "__required_keys__", frozenset(hints))
        return _object(tp, hints, [n for n in hints if n in required])
    if dataclasses.is_dataclass(tp) or issubclass(tp, BaseModel):
        return _resolve_dataclass(tp)
    if pydantic_fields(tp) is not None:
        return _resolve_pydantic(tp)
    return _resolve_custom(tp)


def pydantic_fields(tp: Any) -> Optional[Tuple[str, ...]]:
    """The field names of a pydantic model class (v2 ``model_fields``, v1 ``__fields__``),
    else None. Duck-typed: coglet never imports pydantic, the model's environment has it."""
    if not isinstance(tp, type):
        return None
    for attr in ("model_fields", "__fields__"):
        fields = getattr(tp, attr, None)
        if isinstance(fields, dict) and callable(
            getattr(tp, "__get_validators__", None) or getattr(tp, "model_validate", None)
        ):
            return tuple(fields)
    return None


def _resolve_pydantic(tp: type) -> CogType:
    """A pydantic model (Cog 0.23 takes them as outputs): its fields, as an object; the
    Optional ones may be null and are not required."""
    hints = typing.get_type_hints(tp)
    names = pydantic_fields(tp) or ()
    required = [
        n
        for n in names
        if not _is_union(hints.get(n)) or type(None) not in typing.get_args(hints.get(n))
    ]
    return _object(tp, {n: hints[n] for n in names if n in hints}, required)


def _resolve_enum(tp: type) -> CogType:
    values = tuple(member.value for member in typing.cast(Any, tp))
    if issubclass(tp, str):
        return CogType(STR, py=tp, enum_values=values)
    if issubclass(tp, int) and not issubclass(tp, bool):
        return CogType(INT, py=tp, enum_values=values)
    used_as = type(values[0]).__name__ if values else "str"
    raise ValueError(f"enum {tp.__name__} is used as {used_as} but does not extend it")


def _resolve_dataclass(tp: type) -> CogType:
    hints = typing.get_type_hints(tp)
    required = []
    for field in dataclasses.fields(tp):
        no_default = (
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        )
        if no_default and not _is_union(hints.get(field.name)):
            required.append(field.name)
    names = [f.name for f in dataclasses.fields(tp)]
    if issubclass(tp, BaseModel):
        required = list(names)  # Cog lists every output field; Optional ones may be None
    return _object(tp, {n: hints[n] for n in names if n in hints}, required)


def _object(tp: type, hints: Dict[str, Any], required: Any) -> CogType:
    fields = []
    for name, hint in hints.items():
        try:
            fields.append((name, resolve_type(hint)))
        except ValueError as e:
            raise ValueError(f"{type_name(tp)}.{name}: {e}") from None
    return CogType(OBJECT, py=tp, fields=tuple(fields), required=tuple(required))


# --- outputs -----------------------------------------------------------------------------------
_SYNC_ITER_ORIGINS = (collections.abc.Iterator, collections.abc.Generator)
_ASYNC_ITER_ORIGINS = (collections.abc.AsyncIterator, collections.abc.AsyncGenerator)
_CONCAT = (ConcatenateIterator, AsyncConcatenateIterator)


def resolve_output(tp: Any) -> OutputType:
    """Resolve predict()'s return annotation; ``ValueError`` with Cog's wording."""
    origin = typing.get_origin(tp)
    bare = tp if origin is None else origin
    if bare in _CONCAT:
        elem = _iterator_element(tp)
        if elem.kind != STR or elem.py is not None:
            raise ValueError(f"{type_name(bare)} must have str element")
        return OutputType(elem, ITER_CONCATENATE, bare is AsyncConcatenateIterator)
    if bare in _SYNC_ITER_ORIGINS or bare in _ASYNC_ITER_ORIGINS:
        elem = _iterator_element(tp)
        return OutputType(elem, ITER_PLAIN, bare in _ASYNC_ITER_ORIGINS)
    t = resolve_type(tp)
    if t.kind == OPTIONAL:
        raise ValueError("output must not be Optional")
    return OutputType(t)


def _iterator_element(tp: Any) -> CogType:
    args = typing.get_args(tp)
    if not args:
        raise ValueError("iterator type must have a type argument")
    elem = resolve_type(args[0])
    if elem.kind in (OPTIONAL, LIST):
        raise ValueError("iterator element type must not be Optional or List")
    return elem


# Re-exported for coercion helpers: the concrete class a Path input becomes by default.
DEFAULT_PATH_CLASS = Path


@dataclass(frozen=True)
class InputSpec:
    """One predict() parameter after inspection (what ``Input(...)`` said, checked)."""

    name: str
    order: int
    type: CogType
    default: Any  # cog.input.MISSING when there is none
    default_factory: Optional[Any] = None
    description: Optional[str] = None
    ge: Optional[Any] = None
    le: Optional[Any] = None
    min_length: Optional[int] = None
    max_length: Optional[int] = None
    regex: Optional[str] = None
    choices: Optional[Tuple[Any, ...]] = None  # plain str/int values (Enum members unwrapped)
    deprecated: Optional[bool] = None
