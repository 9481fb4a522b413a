"""``Input(...)``: per-parameter options of ``predict()``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Union

__all__ = ["MISSING", "FieldInfo", "Input"]


class _Missing:
    """Marks an option that was not given (``None`` is a meaningful default)."""

    _instance: Optional[_Missing] = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()


@dataclass(frozen=True)
class FieldInfo:
    """What ``Input(...)`` returns; the runner reads it when it inspects ``predict()``."""

    default: Any = MISSING
    default_factory: Optional[Callable[[], Any]] = None
    description: Optional[str] = None
    ge: Optional[Union[int, float]] = None
    le: Optional[Union[int, float]] = None
    min_length: Optional[int] = None
    max_length: Optional[int] = None
    regex: Optional[str] = None
    choices: Optional[List[Any]] = None
    deprecated: Optional[bool] = None


def Input(
    default: Any = MISSING,
    *,
    default_factory: Optional[Callable[[], Any]] = None,
    description: Optional[str] = None,
    ge: Optional[Union[int, float]] = None,
    le: Optional[Union[int, float]] = None,
    min_length: Optional[int] = None,
    max_length: Optional[int] = None,
    regex: Optional[str] = None,
    choices: Optional[List[Any]] = None,
    deprecated: Optional[bool] = None,
) -> Any:
    """Describe one ``predict()`` input: default, description and constraints."""
    return FieldInfo(
        default=default,
        default_factory=default_factory,
        description=description,
        ge=ge,
        le=le,
        min_length=min_length,
        max_length=max_length,
        regex=regex,
        choices=list(choices) if choices is not None else None,
        deprecated=deprecated,
    )
