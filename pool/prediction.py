"""One prediction's request and its state as the pool sees it.

The pool owns the timestamps and the status. Runner updates arrive as deltas
(see ``coglet.protocol``) and are applied with :meth:`Prediction.apply_delta`; every change
is announced to listeners (webhooks, queue publishers, waiting HTTP clients) as an event.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from coglet import protocol
from pool.errors import InvalidRequest

__all__ = [
    "EVENTS",
    "EVENT_COMPLETED",
    "EVENT_LOGS",
    "EVENT_OUTPUT",
    "EVENT_START",
    "MAX_JSON_DEPTH",
    "Listener",
    "Prediction",
    "PredictionRequest",
    "nests_deeper_than",
    "new_prediction_id",
    "utc_now",
]

EVENT_START = "start"
EVENT_OUTPUT = "output"
EVENT_LOGS = "logs"
EVENT_COMPLETED = "completed"
EVENTS = (EVENT_START, EVENT_OUTPUT, EVENT_LOGS, EVENT_COMPLETED)

# Request bodies (HTTP and queue messages) nested deeper than this are refused: parsing and
# walking them must not exhaust the interpreter's recursion limit.
MAX_JSON_DEPTH = 64


def nests_deeper_than(value: Any, limit: int) -> bool:
    """True when ``value`` nests deeper than ``limit`` (iterative: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def new_prediction_id() -> str:
    """A fresh id in the protocol's id alphabet: 128 random bits as 26 base32 characters.

    (One ``os.urandom`` call: picking 26 characters one by one cost ~40 µs per prediction.)
    """
    return base64.b32encode(os.urandom(16)).decode("ascii").rstrip("=").lower()


def utc_now() -> datetime:
    return datetime.now(UTC)


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat().replace("+00:00", "Z") if ts else None


def _err(loc: list[Any], msg: str, type_: str) -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": type_}


@dataclass(frozen=True)
class PredictionRequest:
    """A parsed ``POST /predictions`` body (also the queue message body)."""

    id: str | None
    input: dict[str, Any]
    webhook: str | None = None
    webhook_events_filter: tuple[str, ...] = EVENTS
    context: dict[str, Any] = field(default_factory=dict)
    # Extra routing fields a queue message may carry (e.g. ``reply_to``); never sent to runners.
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_body(cls, body: Any, *, path_id: str | None = None) -> PredictionRequest:
        """Parse and check a request body; raise :class:`InvalidRequest` naming each problem."""
        if not isinstance(body, Mapping):
            raise InvalidRequest(
                [_err(["body"], "request body must be a JSON object", "type_error.dict")]
            )
        errors: list[dict[str, Any]] = []
        body_id = body.get("id")
        if body_id is not None and not protocol.is_valid_id(body_id):
            errors.append(
                _err(
                    ["body", "id"],
                    f"invalid prediction id: must match {protocol.ID_PATTERN}",
                    "value_error.id",
                )
            )
        if path_id is not None:
            if not protocol.is_valid_id(path_id):
                errors.append(
                    _err(
                        ["path", "prediction_id"],
                        f"invalid prediction id: must match {protocol.ID_PATTERN}",
                        "value_error.id",
                    )
                )
            elif body_id is not None and body_id != path_id:
                errors.append(
                    _err(
                        ["body", "id"],
                        f"prediction id in body ({body_id!r}) does not match the URL ({path_id!r})",
                        "value_error.id_mismatch",
                    )
                )
        raw_input = body.get("input", None)
        if raw_input is None:
            raw_input = {}
        if not isinstance(raw_input, Mapping):
            errors.append(_err(["body", "input"], "input must be a JSON object", "type_error.dict"))
        webhook = body.get("webhook")
        if webhook is not None and not (
            isinstance(webhook, str) and webhook.startswith(("http://", "https://"))
        ):
            errors.append(
                _err(["body", "webhook"], "webhook must be an http(s) URL", "value_error.url")
            )
        events_filter = body.get("webhook_events_filter")
        events: tuple[str, ...] = EVENTS
        if events_filter is not None:
            if not isinstance(events_filter, list) or not all(
                isinstance(e, str) for e in events_filter
            ):
                errors.append(
                    _err(
                        ["body", "webhook_events_filter"],
                        "webhook_events_filter must be a list of event names",
                        "type_error.list",
                    )
                )
            else:
                unknown = [e for e in events_filter if e not in EVENTS]
                if unknown:
                    errors.append(
                        _err(
                            ["body", "webhook_events_filter"],
                            f"unknown webhook events {unknown}; allowed: {list(EVENTS)}",
                            "value_error.enum",
                        )
                    )
                elif events_filter:  # an empty filter means all four events, as in Cog
                    events = tuple(e for e in EVENTS if e in events_filter)
        context = body.get("context")
        if context is None:
            context = {}
        if not isinstance(context, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in context.items()
        ):
            errors.append(
                _err(
                    ["body", "context"],
                    "context must be an object of string values",
                    "type_error.dict",
                )
            )
        if errors:
            raise InvalidRequest(errors)
        known = {"id", "input", "webhook", "webhook_events_filter", "context", "created_at"}
        extra = {k: v for k, v in body.items() if k not in known}
        return cls(
            id=path_id if path_id is not None else body_id,
            input=dict(raw_input),
            webhook=webhook,
            webhook_events_filter=events,
            context=dict(context),
            extra=extra,
        )


Listener = Callable[["Prediction", str], None]
"""Called synchronously with (prediction, event) after each change; must not block."""


class Prediction:
    """The pool's record of one prediction, from admission to its terminal state."""

    def __init__(self, request: PredictionRequest, *, source: str = "http") -> None:
        self.id: str = request.id or new_prediction_id()
        self.request = request
        self.source = source
        self.input: dict[str, Any] = request.input
        self.status: str = protocol.STATUS_STARTING
        self.output: Any = None
        # Log text arrives in many small pieces (one per runner delta or output line):
        # kept as a list and joined when read, so a long stream costs O(n), not O(n^2).
        self._log_parts: list[str] = []
        self._logs_joined = ""
        self.error: str | None = None
        self.metrics: dict[str, Any] = {}
        self.created_at: datetime = utc_now()
        self.started_at: datetime | None = None
        self.completed_at: datetime | None = None
        self.runner_index: int | None = None
        self.cancel_requested = False
        # Failed because its runner process died under it: says nothing about the request,
        # so a later submit of the same id runs it again instead of returning this failure.
        self.runner_died = False
        # Ended by the pool's drain (canceled past the grace, or failed when the runners
        # stopped), not by the model: a queue consumer hands its message back instead.
        self.ended_by_shutdown = False
        self._listeners: list[Listener] = []
        self._done = asyncio.Event()

    # --- state ---------------------------------------------------------------------------------
    @property
    def logs(self) -> str:
        """All log text so far, one string of lines (as Cog)."""
        if self._log_parts:
            self._logs_joined += "".join(self._log_parts)
            self._log_parts.clear()
        return self._logs_joined

    @property
    def done(self) -> bool:
        return self.status in protocol.TERMINAL_STATUSES

    async def wait(self, timeout_s: float | None = None) -> None:
        """Wait until the prediction reaches a terminal status (TimeoutError after timeout_s)."""
        await asyncio.wait_for(self._done.wait(), timeout_s)

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _emit(self, event: str) -> None:
        for listener in list(self._listeners):
            listener(self, event)

    # --- transitions ---------------------------------------------------------------------------
    def mark_started(self, runner_index: int) -> None:
        """The pool dispatched the prediction to a runner."""
        self.runner_index = runner_index
        if self.started_at is None:
            self.started_at = utc_now()
        if self.status == protocol.STATUS_STARTING:
            self.status = protocol.STATUS_PROCESSING
            self._emit(EVENT_START)

    def apply_delta(self, delta: Mapping[str, Any]) -> None:
        """Apply one runner update (a response file's content) in epoch order."""
        if self.done:
            return
        events: list[str] = []
        if "output_append" in delta:
            if not isinstance(self.output, list):
                self.output = []
            self.output.extend(delta["output_append"])
            events.append(EVENT_OUTPUT)
        if "output" in delta:
            self.output = delta["output"]
            events.append(EVENT_OUTPUT)
        if delta.get("logs_append"):
            self._log_parts.append(delta["logs_append"])
            events.append(EVENT_LOGS)
        if delta.get("metrics"):
            self.metrics.update(delta["metrics"])
        if delta.get("error"):
            self.error = str(delta["error"])
        status = delta.get("status")
        if status in protocol.TERMINAL_STATUSES:
            self.finish(status, error=self.error)
            return
        for event in dict.fromkeys(events):
            self._emit(event)

    def fail(self, error: str) -> None:
        self.finish(protocol.STATUS_FAILED, error=error)

    def finish(self, status: str, *, error: str | None = None) -> None:
        """Move to a terminal status once; later calls are ignored."""
        if self.done:
            return
        self.status = status
        if error is not None:
            self.error = error
        self.completed_at = utc_now()
        if self.started_at is not None:
            self.metrics.setdefault(
                "predict_time", (self.completed_at - self.started_at).total_seconds()
            )
        self._done.set()
        self._emit(EVENT_COMPLETED)

    # --- views ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The Cog prediction object."""
        body: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "input": self.input,
            "output": self.output,
            "logs": self.logs,
            "error": self.error,
            "metrics": self.metrics,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "completed_at": _iso(self.completed_at),
        }
        if self.request.webhook:
            body["webhook"] = self.request.webhook
            body["webhook_events_filter"] = list(self.request.webhook_events_filter)
        if self.request.context:
            body["context"] = self.request.context
        return body
