"""The typed port between the queue consumers and the pool: what ``ingest`` uses of
:class:`pool.manager.PoolManager` and of its :class:`pool.prediction.Prediction` records.

``ingest`` depends on these protocols only (``pool`` never imports ``ingest``). A prediction's
end is read through :func:`end_of`, from its typed ``end_reason``, never from error strings.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

from pool.prediction import EndReason, PredictionRequest

__all__ = ["End", "Manager", "PredictionView", "end_of"]


class PredictionView(Protocol):
    """The fields of a prediction record the consumers read."""

    id: str
    status: str
    error: str | None
    started_at: datetime | None
    end_reason: EndReason | None

    @property
    def done(self) -> bool: ...
    async def wait(self, timeout_s: float | None = None) -> None: ...
    def to_dict(self) -> dict[str, Any]: ...
    def hold_output(self) -> None: ...
    def release_output(self) -> None: ...
    def add_listener(self, listener: Callable[[Any, str], None]) -> None: ...


class Manager(Protocol):
    """What the consumers need from the pool manager."""

    @property
    def shutting_down(self) -> bool: ...
    @property
    def metrics(self) -> Any: ...

    def capacity(self) -> int: ...
    def free_slots(self) -> int: ...
    async def wait_for_free_slot(self) -> None: ...
    def add_slot_listener(self, listener: Callable[[], object]) -> None: ...
    def remove_slot_listener(self, listener: Callable[[], object]) -> None: ...
    def health(self) -> dict[str, Any]: ...
    async def submit(self, request: PredictionRequest, *, source: str = ...) -> Any: ...
    def get(self, prediction_id: str) -> Any: ...
    async def cancel(self, prediction_id: str) -> bool: ...
    def add_health_source(self, name: str, fn: Callable[[], dict[str, Any]]) -> None: ...
    def add_cancel_forwarder(self, fn: Callable[[str], Awaitable[None]]) -> None: ...


class End(enum.Enum):
    """How a finished prediction ended, as far as its queue message is concerned."""

    RESULT = "result"  # succeeded, failed or canceled by the model or a user: publish it
    RUNTIME_LOST = "runtime_lost"  # its runner died under it: run it again elsewhere
    SHUTDOWN = "shutdown"  # the pool's drain ended it: hand the message back


def end_of(prediction: PredictionView) -> End:
    """From the record's typed end reason (``pool.prediction.EndReason``)."""
    reason = prediction.end_reason
    if reason is EndReason.SHUTDOWN:
        return End.SHUTDOWN
    if reason in (EndReason.RUNNER_DIED, EndReason.NO_RUNNER):
        return End.RUNTIME_LOST
    return End.RESULT
