"""``@cog.streaming`` and ``@cog.concurrent``: marks on a model's predict()/run()."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, TypeVar

__all__ = ["CONCURRENT_ATTR", "STREAMING_ATTR", "concurrent", "streaming"]

_F = TypeVar("_F", bound=Callable[..., Any])

# The runner reads these attributes when it inspects predict()/run().
STREAMING_ATTR = "__cog_streaming__"
CONCURRENT_ATTR = "__cog_concurrent_max__"


def streaming(fn: Optional[_F] = None) -> Any:
    """Mark predict()/run() as supporting streaming (SSE) responses: ``@cog.streaming``
    or ``@cog.streaming()``. The function itself is returned unchanged but for the mark."""

    def decorate(inner: _F) -> _F:
        setattr(inner, STREAMING_ATTR, True)
        return inner

    if fn is None:
        return decorate
    return decorate(fn)


def concurrent(fn: Optional[_F] = None, *, max: int = 1) -> Any:
    """Set the most concurrent predictions of an async predict(): ``@cog.concurrent(max=4)``."""
    if isinstance(max, bool) or not isinstance(max, int):
        raise TypeError("concurrent max must be an integer")
    if max < 1:
        raise ValueError("concurrent max must be at least 1")

    def decorate(inner: _F) -> _F:
        is_async = inspect.iscoroutinefunction(inner) or inspect.isasyncgenfunction(inner)
        if max > 1 and not is_async:
            raise TypeError("concurrent max greater than 1 requires an async function")
        setattr(inner, CONCURRENT_ATTR, max)
        return inner

    if fn is None:
        return decorate
    if not callable(fn):
        raise TypeError("concurrent must be used as @concurrent or @concurrent(max=...)")
    return decorate(fn)
