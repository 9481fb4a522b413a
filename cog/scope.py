"""The per-prediction scope: metrics and context visible to the model's code.

The current scope lives in a ``contextvars.ContextVar``: each asyncio task copies the context
when it is created, so concurrent async predictions each see their own scope, and a thread
sees the scope set inside it.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Dict, Iterator, Optional

__all__ = ["Scope", "current_scope", "emit_metric", "use_scope"]

_MODES = ("replace", "incr", "append")


class Scope:
    """What one prediction may record (metrics) and read (context)."""

    def __init__(self, context: Optional[Dict[str, Any]] = None) -> None:
        self.context: Dict[str, Any] = dict(context or {})
        self.metrics: Dict[str, Any] = {}

    def record_metric(self, name: str, value: Any, mode: str = "replace") -> None:
        """Record a metric merged into the prediction's ``metrics``.

        ``mode`` is ``replace`` (default), ``incr`` (add to the current number) or
        ``append`` (append to a list).
        """
        if not isinstance(name, str) or not name:
            raise ValueError("metric name must be a non-empty string")
        if mode not in _MODES:
            raise ValueError(f"metric mode must be one of {list(_MODES)}, not {mode!r}")
        if mode == "replace":
            self.metrics[name] = value
        elif mode == "incr":
            self.metrics[name] = self.metrics.get(name, 0) + value
        else:
            current = self.metrics.get(name)
            if not isinstance(current, list):
                current = [] if current is None else [current]
            current.append(value)
            self.metrics[name] = current

    def __repr__(self) -> str:
        return f"Scope(context={self.context!r}, metrics={self.metrics!r})"


# Outside any prediction (e.g. during setup) metrics land in a scope nobody reads, rather than
# raising in model code that records metrics unconditionally.
_DETACHED = Scope()
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
