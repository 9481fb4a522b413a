"""Small named errors raised by domain code; only the HTTP and queue edges translate them."""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigError",
    "InvalidInput",
    "InvalidRequest",
    "NoTrainer",
    "NotReady",
    "PoolBusy",
    "PoolError",
    "PoolFull",
    "RunnerDied",
    "ShuttingDown",
]


class PoolError(Exception):
    """Base class of the pool's own errors."""


class ConfigError(PoolError):
    """The configuration is invalid; the message names the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class InvalidRequest(PoolError):
    """The request body is not a valid prediction request (HTTP 422, queue: dead letter).

    ``detail`` follows FastAPI/Cog: ``[{"loc": [...], "msg": str, "type": str}]``.
    """

    def __init__(self, detail: list[dict[str, Any]]) -> None:
        # str() names each field (``input.tag: ...``): queue dead letters carry it as the reason.
        super().__init__("; ".join(f"{_where(d.get('loc'))}: {d.get('msg')}" for d in detail))
        self.detail = detail


def _where(loc: Any) -> str:
    parts = [str(p) for p in loc] if isinstance(loc, list) else []
    if len(parts) > 1 and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or "body"


class InvalidInput(InvalidRequest):
    """The prediction input does not match the model's schema (HTTP 422, before any runner)."""


class NoTrainer(InvalidRequest):
    """A training for a model without ``train:`` in cog.yaml (HTTP 404 as Cog; queue: dead
    letter)."""

    def __init__(self, why: str) -> None:
        super().__init__([{"loc": ["body"], "msg": why, "type": "value_error.no_trainer"}])
        self.why = why


class NotReady(PoolError):
    """No runner has finished setup yet, or setup failed everywhere (HTTP 503)."""


class PoolFull(PoolError):
    """The wait queue is at ``http.queue_limit`` (HTTP 503 with Retry-After)."""


class PoolBusy(PoolError):
    """Every slot is taken and ``http.reject_when_busy`` is set (HTTP 409, like Cog)."""


class ShuttingDown(PoolError):
    """The pool is draining and takes no new work (HTTP 503 with Retry-After)."""


class RunnerDied(PoolError):
    """A runner process exited while it held predictions."""
