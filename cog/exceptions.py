"""Exceptions a model's code may see."""

from __future__ import annotations

__all__ = ["CancelationException"]


class CancelationException(BaseException):
    """Raised inside a running prediction when it is canceled.

    It derives from ``BaseException`` (like ``KeyboardInterrupt``) so that a model's broad
    ``except Exception`` does not swallow a cancel.
    """
