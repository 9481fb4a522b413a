"""The per-prediction scope: metrics and context visible to the model's code.

The current scope lives in a ``contextvars.ContextVar``: each asyncio task copies the context
when it is created, so concurrent async predictions each see their own scope, and a thread
sees the scope set inside it.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Dict, Iterator, List, Optional

__all__ = ["MetricRecorder", "Scope", "current_scope", "emit_metric", "use_scope"]

_MODES = ("replace", "incr", "append")
_VALUE_TYPES = (bool, int, float, str, list, dict)
MAX_NAME_CHARS = 128
MAX_NAME_SEGMENTS = 4


def _check_name(name: Any) -> List[str]:
    """A metric name's dot-separated segments; ValueError with Cog 0.23.1's words."""
    if not isinstance(name, str) or not name:
        raise ValueError("metric name must be a non-empty string")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(
            f"metric name must be {MAX_NAME_CHARS} characters or fewer (got {len(name)} characters)"
        )
    if name == "predict_time":
        raise ValueError("'predict_time' is reserved by the runtime")
    if name.startswith("cog."):
        raise ValueError("the 'cog.' prefix is reserved for system metrics")
    segments = name.split(".")
    if len(segments) > MAX_NAME_SEGMENTS:
        raise ValueError(
            f"metric name must have at most {MAX_NAME_SEGMENTS} dot-separated segments "
            f"(got {len(segments)})"
        )
    for segment in segments:
        if not segment:
            raise ValueError("metric name must not contain empty segments (consecutive dots)")
        if not (segment[0].isascii() and segment[0].isalpha()):
            raise ValueError(f"metric name segment {segment!r} must start with a letter")
        if not all(c.isascii() and (c.isalnum() or c == "_") for c in segment):
            raise ValueError(
                f"metric name segment {segment!r} must contain only letters, digits and underscores"
            )
        if segment.endswith("_"):
            raise ValueError(f"metric name segment {segment!r} must end with a letter or digit")
        if "__" in segment:
            raise ValueError(
                f"metric name segment {segment!r} must not contain consecutive underscores"
            )
    return segments


class MetricRecorder(Dict[str, Any]):
    """``scope.metrics``: a dict of the metrics recorded so far, with Cog 0.23's rules.

    ``record(key, value, mode)`` (``replace``, ``incr`` or ``append``), ``delete(key)``,
    ``metrics[key] = value`` and ``del metrics[key]``. A dotted key (``timing.inference``)
    makes nested objects; a key keeps its value's type until it is deleted.
    """

    def record(self, key: str, value: Any, mode: Optional[str] = None) -> None:
        """Record ``value`` under ``key``; TypeError/ValueError as Cog for what it refuses."""
        segments = _check_name(key)
        mode = "replace" if mode is None else mode
        if mode not in _MODES:
            raise TypeError(
                f"Invalid metric mode: {mode!r}. Expected 'replace', 'incr', or 'append'."
            )
        if not isinstance(value, _VALUE_TYPES):
            raise TypeError(
                f"Unsupported metric value type: {type(value).__name__}. "
                "Expected bool, int, float, str, list, or dict."
            )
        parent: Dict[str, Any] = self
        for segment in segments[:-1]:
            child = parent.get(segment)
            if not isinstance(child, dict):  # as Cog: a nested key replaces a scalar
                child = {}
                dict.__setitem__(parent, segment, child)
            parent = child
        _record_in(parent, key, segments[-1], value, mode)

    def delete(self, key: str) -> None:
        """Forget ``key`` (needed before giving it a value of another type)."""
        segments = _check_name(key)
        parent: Any = self
        for segment in segments[:-1]:
            parent = parent.get(segment)
            if not isinstance(parent, dict):
                return
        if segments[-1] in parent:
            dict.__delitem__(parent, segments[-1])

    def __setitem__(self, key: str, value: Any) -> None:
        self.record(key, value)

    def __delitem__(self, key: str) -> None:
        self.delete(key)


def _record_in(parent: Dict[str, Any], key: str, name: str, value: Any, mode: str) -> None:
    current = parent.get(name, _ABSENT)
    if mode == "append":
        if current is _ABSENT:
            current = []
        elif not isinstance(current, list):
            current = [current]
        dict.__setitem__(parent, name, [*current, value])
        return
    if mode == "incr" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"Increment mode requires int or float, got {type(value).__name__}")
    if current is not _ABSENT and type(current) is not type(value):
        raise TypeError(
            f"Metric {key!r} has type {type(current).__name__}, cannot set to "
            f"{type(value).__name__} without deleting first"
        )
    if mode == "incr" and current is not _ABSENT:
        value = current + value
    dict.__setitem__(parent, name, value)


_ABSENT = object()


class Scope:
    """What one prediction may record (metrics) and read (context)."""

    def __init__(self, context: Optional[Dict[str, Any]] = None) -> None:
        self.context: Dict[str, Any] = dict(context or {})
        self.metrics = MetricRecorder()

    def record_metric(self, name: str, value: Any, mode: Optional[str] = "replace") -> None:
        """Record a metric merged into the prediction's ``metrics``: ``scope.metrics.record``.

        ``mode`` is ``replace`` (default), ``incr`` (add to the current number) or
        ``append`` (append to a list); see :class:`MetricRecorder` for Cog's rules.
        """
        self.metrics.record(name, value, mode)

    def __repr__(self) -> str:
        return f"Scope(context={self.context!r}, metrics={self.metrics!r})"


class _IgnoredMetrics(MetricRecorder):
    """Outside any prediction (setup, a model's own background thread) metrics are ignored,
    as Cog's no-op scope does: nothing raises, and nothing accumulates without bound."""

    def record(self, key: str, value: Any, mode: Optional[str] = None) -> None:
        return None

    def delete(self, key: str) -> None:
        return None


_DETACHED = Scope()
_DETACHED.metrics = _IgnoredMetrics()
_current: contextvars.ContextVar[Scope] = contextvars.ContextVar("cog_scope", default=_DETACHED)


def current_scope() -> Scope:
    """The scope of the prediction running in this thread or asyncio task."""
    return _current.get()


@contextlib.contextmanager
def use_scope(scope: Scope) -> Iterator[Scope]:
    """Make ``scope`` current for the duration of the ``with`` block (this context only)."""
    token = _current.set(scope)
    try:
        yield scope
    finally:
        _current.reset(token)


def emit_metric(name: str, value: Any, mode: str = "replace") -> None:
    """Shortcut for ``current_scope().record_metric(name, value, mode)``."""
    current_scope().record_metric(name, value, mode)
