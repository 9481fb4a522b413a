"""One prediction's request and its record, from admission to its end.

The record (:class:`Prediction`) is the one place a prediction's state lives: its phase
(preparing -> queued -> running -> finished), its deadline, its cancellation and the reason it
ended (:class:`EndReason`), the files it created, the bytes its logs may take, and the public
view of it (``to_dict``: secrets masked). The pool owns the timestamps and the status. Runner
updates arrive as deltas (see ``coglet.protocol``) and are applied with
:meth:`Prediction.apply_delta`; every change is announced to listeners (webhooks, queue
publishers, waiting HTTP clients) as an event. A finished record is kept for reading as a
slim copy (:meth:`Prediction.slim`).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import enum
import json
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from coglet import protocol
from pool.errors import InvalidInput, InvalidRequest
from pool.files import OutputFiles, has_path
from pool.jsonstream import LargeValue, TextSlices, dumps_bytes

__all__ = [
    "DEFAULT_LOGS_MAX_BYTES",
    "EVENTS",
    "EVENT_COMPLETED",
    "EVENT_LOGS",
    "EVENT_OUTPUT",
    "EVENT_START",
    "MAX_JSON_DEPTH",
    "MAX_REPORTED",
    "SECRET_MASK",
    "EndReason",
    "Listener",
    "LogBuffer",
    "OutputEncoder",
    "Phase",
    "Prediction",
    "PredictionRequest",
    "approx_bytes",
    "check_wire_safe",
    "find_non_finite",
    "find_unencodable",
    "nests_deeper_than",
    "new_prediction_id",
    "secret_fields",
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

# What a ``Secret`` input shows outside the runner (Cog's mask).
SECRET_MASK = "**********"

DEFAULT_LOGS_MAX_BYTES = 1024 * 1024


log = logging.getLogger("pool.prediction")


class Phase(enum.StrEnum):
    """Where a prediction is: each phase has one owner, and the deadline covers them all."""

    PREPARING = "preparing"  # admitted; file inputs downloading or decoding (the manager)
    QUEUED = "queued"  # waiting for a runner slot (the router)
    RUNNING = "running"  # on a runner (its handle); Path outputs are encoded as they come
    ENCODING = "encoding"  # the runner is done; its last outputs are encoded or uploaded
    FINISHED = "finished"  # terminal status reached


class EndReason(enum.StrEnum):
    """Why a prediction ended: typed, so queue consumers never match error strings.

    ``RUNNER_DIED`` and ``NO_RUNNER`` say nothing about the request: a later submit of the same
    id runs it again and a queue hands the message to another delivery. ``SHUTDOWN`` is a
    casualty of this pool's drain (another pool may run it). ``TIMED_OUT`` stands: a later
    submit of the same id returns it.
    """

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the model raised, an input could not be fetched, an output not sent
    CANCELED = "canceled"  # a client asked
    TIMED_OUT = "timed_out"
    RUNNER_DIED = "runner_died"
    NO_RUNNER = "no_runner"  # every runner is out for good while it waited
    SHUTDOWN = "shutdown"


SHUTDOWN_ERROR = "the pool shut down before the prediction finished"


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


_SURROGATE = re.compile("[\ud800-\udfff]")


def _path_items(value: Any) -> Iterable[tuple[Any, Any]]:
    if isinstance(value, dict):
        return value.items()
    if isinstance(value, list):
        return enumerate(value)
    return ()


def _wire_problem(value: Any) -> tuple[str, str] | None:
    """(message, type) when ``value`` itself cannot travel as JSON text, else None."""
    if isinstance(value, str):
        # isascii() is one C pass: the usual case (and every data: URI) costs nothing more.
        if not value.isascii() and _SURROGATE.search(value):
            return (
                "string holds a lone UTF-16 surrogate (e.g. \\ud800): not encodable as UTF-8",
                "value_error.unicode",
            )
    elif isinstance(value, float) and not math.isfinite(value):
        return (
            f"number {value!r} is not finite: JSON cannot carry it (1e309 overflows to inf)",
            "value_error.number.not_finite",
        )
    return None


_BAD_KEY = "key holds a lone UTF-16 surrogate: not encodable as UTF-8"


def _escaped(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# A path into a value as a chain of (parent, key) links: built in O(1) per item, turned into
# a list only for the few items that are reported (a copied list per item is O(depth^2)).
_Path = tuple[Any, Any] | None
MAX_REPORTED = 16  # problems named in one answer; the rest are alike


def _path_list(path: _Path) -> list[Any]:
    keys: list[Any] = []
    while path is not None:
        path, key = path
        keys.append(key)
    keys.reverse()
    return keys


def _wire_errors(value: Any, loc: list[Any], errors: list[dict[str, Any]]) -> None:
    stack: list[tuple[Any, _Path]] = [(value, None)]
    while stack and len(errors) < MAX_REPORTED:  # iterative: no recursion limit to exhaust
        item, path = stack.pop()
        problem = _wire_problem(item)
        if problem is not None:
            errors.append(_err([*loc, *_path_list(path)], *problem))
            continue
        for key, child in _path_items(item):
            if isinstance(key, str) and _wire_problem(key) is not None:
                where = [*loc, *_path_list(path), _escaped(key)]
                errors.append(_err(where, _BAD_KEY, "value_error.unicode"))
                continue
            stack.append((child, (path, key)))


def check_wire_safe(request: PredictionRequest) -> None:
    """Raise :class:`InvalidInput` naming each input or context value that cannot be written
    to the runner's request file or shown in a JSON response: a lone surrogate, a non-finite
    number. HTTP and queue requests alike go through it (``PoolManager.submit``), before any
    slot or file is taken."""
    errors: list[dict[str, Any]] = []
    for name, value in request.input.items():
        if isinstance(name, str) and _wire_problem(name) is not None:
            errors.append(_err(["body", "input", _escaped(name)], _BAD_KEY, "value_error.unicode"))
            continue
        _wire_errors(value, ["body", "input", name], errors)
    problem = _wire_problem(request.webhook) if request.webhook is not None else None
    if problem is not None:
        errors.append(_err(["body", "webhook"], *problem))
    for name, value in request.context.items():
        if _wire_problem(name) is not None:
            errors.append(
                _err(["body", "context", _escaped(name)], _BAD_KEY, "value_error.unicode")
            )
            continue
        _wire_errors(value, ["body", "context", name], errors)
    if errors:
        raise InvalidInput(errors[:MAX_REPORTED])


def find_non_finite(value: Any) -> str | None:
    """The path (``output.score``, ``output[2]``) of the first non-finite number in
    ``value``, with what it is (``output.score (NaN)``), else None."""
    problem = find_unencodable(value)
    return problem if problem is not None and not problem.endswith("surrogate)") else None


def find_unencodable(value: Any, root: str = "output", first_index: int = 0) -> str | None:
    """Where ``value`` holds something no JSON response can carry, and what: a non-finite
    number (``output.score (NaN)``) or a lone surrogate (``output[3] (a lone surrogate)``);
    None when it is all encodable. List indexes of the top level start at ``first_index``."""
    stack: list[tuple[Any, _Path]] = [(value, None)]
    while stack:
        item, path = stack.pop()
        what = None
        if isinstance(item, float):
            if not math.isfinite(item):
                what = "NaN" if item != item else repr(item)
        elif isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                what = "a lone surrogate"
        elif isinstance(item, TextSlices):
            if item.surrogate:  # looked for where it was read, off the loop
                what = "a lone surrogate"
        elif isinstance(item, dict):
            for k, v in item.items():
                if isinstance(k, str) and not k.isascii() and _SURROGATE.search(k):
                    return f"{_path_text(root, path)} (a key with a lone surrogate)"
                stack.append((v, (path, str(k))))
        elif isinstance(item, list):
            start = first_index if path is None else 0
            stack.extend((v, (path, start + i)) for i, v in enumerate(item))
        if what is not None:
            return f"{_path_text(root, path)} ({what})"
    return None


def _path_text(root: str, path: _Path) -> str:
    return root + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in _path_list(path))


def approx_bytes(value: Any) -> int:
    """About how many bytes ``value`` takes as JSON text (strings by length: cheap, close),
    in memory: a file output kept on disk counts as its reference only."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, LargeValue):
            total += item.memory_bytes
        elif isinstance(item, dict):
            total += 2
            for k, v in item.items():
                total += len(str(k)) + 4
                stack.append(v)
        elif isinstance(item, list):
            total += 2 + len(item)
            stack.extend(item)
        else:
            total += 8
    return total


def secret_fields(schema: Mapping[str, Any] | None) -> frozenset[str]:
    """Names of the model's ``Secret`` inputs (and lists of them), from its OpenAPI schema."""
    try:
        props = schema["components"]["schemas"]["Input"]["properties"]  # type: ignore[index]
    except (KeyError, TypeError):
        return frozenset()
    found = set()
    for name, prop in props.items():
        if not isinstance(prop, Mapping):
            continue
        items = prop.get("items")
        if prop.get("x-cog-secret") or (isinstance(items, Mapping) and items.get("x-cog-secret")):
            found.add(name)
    return frozenset(found)


def _mask(value: Any) -> Any:
    if isinstance(value, list):
        return [_mask(v) for v in value]
    return SECRET_MASK if value is not None else None


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _utf8_cut(text: str, max_bytes: int, *, from_end: bool = False) -> str:
    """The longest head (or tail) of ``text`` that takes at most ``max_bytes`` as UTF-8."""
    if text.isascii():
        return text[len(text) - max_bytes :] if from_end else text[:max_bytes]
    data = text.encode("utf-8", "surrogatepass")
    part = data[len(data) - max_bytes :] if from_end else data[:max_bytes]
    return part.decode("utf-8", "ignore")


def _unencodable_output(where: str) -> str:
    if where.endswith("surrogate)"):
        return (
            f"the model's output holds a lone UTF-16 surrogate at {where}: it cannot be "
            "encoded as UTF-8 JSON"
        )
    return (
        f"the model's output holds a non-finite number at {where}: JSON cannot carry NaN or "
        "Infinity (return None or a string instead)"
    )


def _output_too_large(limit: int, streamed: int) -> str:
    return (
        f"the output exceeded {limit} bytes (predictions.streamed_output_max_bytes): the model "
        f"streamed {streamed} bytes, so the prediction was stopped"
    )


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop (a record used outside one, e.g. in a unit test)
        return None


class LogBuffer:
    """A prediction's log text, at most ``max_bytes``: past it, the head and the tail are kept
    (half each) and a marker line in between says how many bytes were dropped.

    Pieces are kept as a list and joined when read, so a long stream costs O(n), not O(n^2).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._head_room = max_bytes // 2
        self._tail_max = max_bytes - self._head_room
        self._head: list[str] = []
        self._tail: collections.deque[str] = collections.deque()
        self._tail_bytes = 0
        self.dropped_bytes = 0
        self._joined: str | None = ""

    def append(self, text: str) -> None:
        if not text:
            return
        self._joined = None
        size = _utf8_len(text)
        if self._head_room > 0 and not self._tail:
            if size <= self._head_room:
                self._head.append(text)
                self._head_room -= size
                return
            part = _utf8_cut(text, self._head_room)
            self._head.append(part)
            self._head_room = 0
            text = text[len(part) :]
            size = _utf8_len(text)
        self._tail.append(text)
        self._tail_bytes += size
        while self._tail_bytes > self._tail_max:
            first = self._tail[0]
            first_size = _utf8_len(first)
            excess = self._tail_bytes - self._tail_max
            if first_size <= excess:
                self._tail.popleft()
                self._tail_bytes -= first_size
                self.dropped_bytes += first_size
            else:
                kept = _utf8_cut(first, first_size - excess, from_end=True)
                kept_size = _utf8_len(kept)
                self._tail[0] = kept
                self._tail_bytes -= first_size - kept_size
                self.dropped_bytes += first_size - kept_size

    @property
    def text(self) -> str:
        if self._joined is None:
            head = "".join(self._head)
            tail = "".join(self._tail)
            self._head = [head] if head else []
            self._tail = collections.deque([tail] if tail else [])
            marker = ""
            if self.dropped_bytes:
                marker = (
                    f"\n[... {self.dropped_bytes} bytes of logs dropped "
                    f"(predictions.logs_max_bytes={self.max_bytes}) ...]\n"
                )
            self._joined = head + marker + tail
        return self._joined


class _KeptLogs:
    """A finished copy's logs: the final text, already capped (LogBuffer's read side only)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def append(self, text: str) -> None:  # a finished copy takes no more logs
        raise RuntimeError("the logs of a finished prediction's copy are final")


# Shared by every kept copy (router's recent store): a copy is finished, so its done event is
# set for good and its delta backlog stays empty. An Event binds no loop until a wait finds it
# unset, so one set Event serves any loop.
_ENDED = asyncio.Event()
_ENDED.set()
_NO_BACKLOG: collections.deque[Mapping[str, Any]] = collections.deque(maxlen=0)

SLIM_RECORD_BYTES = 4096
"""About what a kept copy's own objects take in memory (measured with tracemalloc for a
prediction with no input, output or logs), besides its values."""


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
    # protocol.KIND_PREDICTION, or KIND_TRAINING (cog.yaml train:; /trainings, or a queue
    # message with "kind": "training").
    kind: str = protocol.KIND_PREDICTION

    @property
    def is_training(self) -> bool:
        return self.kind == protocol.KIND_TRAINING

    @classmethod
    def from_body(
        cls, body: Any, *, path_id: str | None = None, kind: str | None = None
    ) -> PredictionRequest:
        """Parse and check a request body; raise :class:`InvalidRequest` naming each problem.

        ``kind`` is set by the HTTP route (``/predictions`` or ``/trainings``); None (a queue
        message) reads the body's ``"kind"``: ``"prediction"`` (the default) or ``"training"``.
        """
        if not isinstance(body, Mapping):
            raise InvalidRequest(
                [_err(["body"], "request body must be a JSON object", "type_error.dict")]
            )
        errors: list[dict[str, Any]] = []
        if kind is None:
            kind = body.get("kind", protocol.KIND_PREDICTION)
            kinds = (protocol.KIND_PREDICTION, protocol.KIND_TRAINING)
            if kind not in kinds:
                errors.append(
                    _err(
                        ["body", "kind"],
                        f"kind must be one of {list(kinds)}, not {_short_repr(kind)}",
                        "value_error.enum",
                    )
                )
                kind = protocol.KIND_PREDICTION
        noun = "training" if kind == protocol.KIND_TRAINING else "prediction"
        body_id = body.get("id")
        if body_id is not None and not protocol.is_valid_id(body_id):
            errors.append(
                _err(
                    ["body", "id"],
                    f"invalid {noun} id: must match {protocol.ID_PATTERN}",
                    "value_error.id",
                )
            )
        if path_id is not None:
            if not protocol.is_valid_id(path_id):
                errors.append(
                    _err(
                        ["path", f"{noun}_id"],
                        f"invalid {noun} id: must match {protocol.ID_PATTERN}",
                        "value_error.id",
                    )
                )
            elif body_id is not None and body_id != path_id:
                errors.append(
                    _err(
                        ["body", "id"],
                        f"{noun} id in body ({body_id!r}) does not match the URL ({path_id!r})",
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
        known = {
            "id",
            "input",
            "webhook",
            "webhook_events_filter",
            "context",
            "created_at",
            "kind",
        }
        extra = {k: v for k, v in body.items() if k not in known}
        return cls(
            id=path_id if path_id is not None else body_id,
            input=dict(raw_input),
            webhook=webhook,
            webhook_events_filter=events,
            context=dict(context),
            extra=extra,
            kind=kind,
        )


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


Listener = Callable[["Prediction", str], None]
"""Called synchronously with (prediction, event) after each change; must not block."""

DeadlineHandler = Callable[["Prediction"], None]
OutputEncoder = Callable[[Any, "Prediction"], Awaitable[Any]]
"""Turns ``{PATH_MARKER: path}`` values of a record's output into data: URIs, uploaded URLs
or files the record keeps (:meth:`Prediction.output_files`)."""


def _holds_large(value: Any) -> bool:
    if isinstance(value, list):
        return any(isinstance(item, LargeValue) for item in value)
    return isinstance(value, LargeValue)


_ENCODE_REQUEST = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode


class Prediction:
    """The pool's record of one prediction, from admission to its terminal state.

    It is created once the request passed validation and admission (``PoolManager.submit``)
    and owns everything about the prediction: phase, deadline, cancellation, end reason,
    the input files it created (``input_dir``), the request file's bytes, capped logs and the
    public view. The router, the runner handle and the manager move it between phases; only
    :meth:`finish` ends it, once.
    """

    def __init__(
        self,
        request: PredictionRequest,
        *,
        source: str = "http",
        secret_fields: frozenset[str] = frozenset(),
        logs_max_bytes: int = DEFAULT_LOGS_MAX_BYTES,
        streamed_output_max_bytes: int | None = None,
        encoder: OutputEncoder | None = None,
    ) -> None:
        self.id: str = request.id or new_prediction_id()
        self.request = request
        self.source = source
        self.input: dict[str, Any] = request.input
        secrets = secret_fields.intersection(request.input)
        self._public_input: dict[str, Any] = (
            {k: _mask(v) if k in secrets else v for k, v in request.input.items()}
            if secrets
            else request.input
        )
        self.input_bytes = approx_bytes(request.input)  # what it holds while it waits
        self.status: str = protocol.STATUS_STARTING
        self.phase = Phase.PREPARING
        self.ended_in: Phase | None = None  # the phase it was in when it ended
        self.end_reason: EndReason | None = None
        self.output: Any = None
        # The bytes (as JSON) of what an iterator streamed into output, and their cap.
        self.streamed_output_bytes = 0
        self._streamed_output_max_bytes = streamed_output_max_bytes
        self._logs: LogBuffer | _KeptLogs = LogBuffer(logs_max_bytes)
        self.error: str | None = None
        self.metrics: dict[str, Any] = {}
        self.created_at: datetime = utc_now()
        self.started_at: datetime | None = None
        self.completed_at: datetime | None = None
        self.runner_index: int | None = None
        self.cancel_requested = False
        self.cancel_reason: EndReason | None = None
        # Set when its runner process died under it, before the failure lands (the runner's
        # output encoder may still be busy); a record that already ended keeps its reason.
        self._runner_lost = False
        self.deadline_at: float | None = None  # event loop time
        self._deadline: asyncio.TimerHandle | None = None
        self.preparation: asyncio.Task[Any] | None = None  # input downloads, while preparing
        self.input_dir: str | None = None  # files the pool fetched for it, removed at the end
        self.runner_request: bytes | None = None  # the request file, encoded before any slot
        self.queued_at: float | None = None  # monotonic
        self.dispatched_at: float | None = None  # monotonic
        self.omitted: dict[str, int] = {}  # slim copies: what was not kept, and its size
        # Output files kept on disk (pool.files.OutputFiles), shared with its slim copy; the
        # live record holds them until the router recorded its end (release_live).
        self.files: OutputFiles | None = None
        self._readers = 0  # hold_output() calls not yet released
        self._live_hold = True
        self._encoder = encoder
        self._backlog: collections.deque[Mapping[str, Any]] = collections.deque()
        self._encoding: asyncio.Task[None] | None = None  # owned: finish() cancels it
        self._listeners: list[Listener] = []
        self._done = asyncio.Event()

    # --- state ---------------------------------------------------------------------------------
    @property
    def logs(self) -> str:
        """All log text so far (capped: head, a marker, tail), one string of lines (as Cog)."""
        return self._logs.text

    @property
    def done(self) -> bool:
        return self.status in protocol.TERMINAL_STATUSES

    @property
    def runner_died(self) -> bool:
        """Lost to the runtime (its runner died, or no runner could ever take it): the request
        is not at fault, so a later submit of the same id runs it again."""
        if self.end_reason is not None:
            return self.end_reason in (EndReason.RUNNER_DIED, EndReason.NO_RUNNER)
        return self._runner_lost

    @runner_died.setter
    def runner_died(self, value: bool) -> None:
        if not self.done:  # a timed-out or canceled record keeps its reason
            self._runner_lost = value

    @property
    def ended_by_shutdown(self) -> bool:
        """Ended (or being ended) by the pool's drain, not by the model or a client
        (``EndReason.SHUTDOWN``): a queue consumer hands its message back."""
        if self.end_reason is not None:
            return self.end_reason is EndReason.SHUTDOWN
        return self.cancel_reason is EndReason.SHUTDOWN

    @ended_by_shutdown.setter
    def ended_by_shutdown(self, value: bool) -> None:
        if value and not self.done:  # it will end with EndReason.SHUTDOWN
            self.cancel_reason = EndReason.SHUTDOWN

    @property
    def queue_wait_s(self) -> float | None:
        if self.queued_at is None or self.dispatched_at is None:
            return None
        return self.dispatched_at - self.queued_at

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

    # --- output files ----------------------------------------------------------------------------
    def output_files(self, make: Callable[[str], OutputFiles]) -> OutputFiles | None:
        """The record's kept output files (made by ``make(id)`` on first use); None once it
        ended (nothing more is kept for it)."""
        if self.done or not self._live_hold:
            return None
        if self.files is None:
            files = make(self.id)
            files.holds = 1 + self._readers  # the live record, and each reader so far
            self.files = files
        return self.files

    def hold_output(self) -> None:
        """A reader will write this record's output out: its kept files stay until
        :meth:`release_output` (files kept later count this hold too)."""
        self._readers += 1
        if self.files is not None:
            self.files.hold()

    def release_output(self) -> None:
        self._readers -= 1
        if self.files is not None:
            self.files.release()

    def release_live(self) -> None:
        """The router recorded its end (its slim copy holds what it keeps): the live record's
        own hold on its files ends. Once only."""
        if self._live_hold:
            self._live_hold = False
            if self.files is not None:
                self.files.release()

    def encode_request(self, runner_input: Mapping[str, Any]) -> bytes:
        """The runner's request file, encoded now, before any slot is taken (ValueError or
        UnicodeEncodeError when it cannot be; :func:`check_wire_safe` refuses those first)."""
        request: dict[str, Any] = {"id": self.id, "input": runner_input, "stream": True}
        if self.request.context:
            request["context"] = self.request.context
        if self.request.is_training:
            request["kind"] = protocol.KIND_TRAINING
        if any(_holds_large(value) for value in runner_input.values()):
            # A long string input kept as a slice of the request body (pool.jsonbody) is
            # written a slice at a time: no whole str of it, no one C call over it.
            self.runner_request = dumps_bytes(request, separators=(",", ":"))
        else:
            self.runner_request = _ENCODE_REQUEST(request).encode("utf-8")
        return self.runner_request

    # --- deadline and cancel -------------------------------------------------------------------
    def arm_deadline(self, timeout_s: float, on_deadline: DeadlineHandler) -> None:
        """One deadline for every phase: download, queue, run, encode, upload."""
        loop = asyncio.get_running_loop()
        self.deadline_at = loop.time() + timeout_s
        self._deadline = loop.call_at(self.deadline_at, on_deadline, self)

    def disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def request_cancel(self, reason: EndReason = EndReason.CANCELED) -> None:
        """Remember that (and why) it is to be canceled; a download in progress stops now."""
        self.cancel_requested = True
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if self.phase == Phase.PREPARING and self.preparation is not None:
            self.preparation.cancel()

    # --- transitions ---------------------------------------------------------------------------
    def mark_queued(self, now: float) -> None:
        """Its inputs are local: it waits in the router's queue."""
        self.phase = Phase.QUEUED
        self.queued_at = now

    def mark_started(self, runner_index: int) -> None:
        """The pool dispatched the prediction to a runner."""
        self.phase = Phase.RUNNING
        self.runner_index = runner_index
        if self.started_at is None:
            self.started_at = utc_now()
        if self.status == protocol.STATUS_STARTING:
            self.status = protocol.STATUS_PROCESSING
            self._emit(EVENT_START)

    def deliver(self, delta: Mapping[str, Any]) -> None:
        """One runner update, in epoch order: applied now, or, when it carries a Path output
        or an earlier one is still being encoded, after encoding (order holds)."""
        needs = self._encoder is not None and (
            has_path(delta.get("output")) or has_path(delta.get("output_append"))
        )
        if self._encoding is None and not needs:
            self.apply_delta(delta)
            return
        self._backlog.append(delta)
        if delta.get("status") in protocol.TERMINAL_STATUSES and self.phase == Phase.RUNNING:
            self.phase = Phase.ENCODING
        if self._encoding is None:
            self._encoding = asyncio.get_running_loop().create_task(
                self._encode_backlog(), name=f"encode-{self.id}"
            )

    async def _encode_backlog(self) -> None:
        assert self._encoder is not None
        try:
            while self._backlog and not self.done:
                delta = dict(self._backlog.popleft())
                try:
                    for key in ("output", "output_append"):
                        if key in delta:
                            delta[key] = await self._encoder(delta[key], self)
                except Exception as e:  # an upload failed: the prediction fails, with why
                    log.warning("output_encode_failed prediction=%s error=%s", self.id, e)
                    delta = {
                        "status": protocol.STATUS_FAILED,
                        "error": f"output upload failed: {e}",
                    }
                self.apply_delta(delta)
        finally:
            self._encoding = None
            self._backlog.clear()

    def lose_runner(self, error: str) -> None:
        """Its runner process died under it: it fails (after any update being encoded) as
        lost to the runtime (``EndReason.RUNNER_DIED``), unless it has ended already or a
        client had canceled it (then it ends ``canceled``)."""
        if self.done:
            return
        if self.cancel_reason is EndReason.CANCELED:
            # A client canceled it and its runner is gone (killed past its cancel grace, or
            # died meanwhile): it ends as the client asked, not as a loss to run again.
            self.deliver({"status": protocol.STATUS_CANCELED})
            return
        self._runner_lost = True
        self.deliver({"status": protocol.STATUS_FAILED, "error": error})

    def apply_delta(self, delta: Mapping[str, Any]) -> None:
        """Apply one runner update (a response file's content) in epoch order."""
        if self.done:
            return
        events: list[str] = []
        for key in ("output_append", "output"):
            if key in delta:
                first = len(self.output) if isinstance(self.output, list) else 0
                bad = find_unencodable(delta[key], first_index=first if key != "output" else 0)
                if bad is not None:
                    # No response, webhook or queue result could carry this output honestly.
                    self.fail(_unencodable_output(bad))
                    return
        if "output_append" in delta:
            limit = self._streamed_output_max_bytes
            if limit is not None:
                self.streamed_output_bytes += approx_bytes(delta["output_append"])
                if self.streamed_output_bytes > limit:
                    # Items are dropped from here on: an endless stream must not grow the pool.
                    # Its runner is told to cancel it (the manager: a record that ended while
                    # its runner still holds it).
                    self.fail(_output_too_large(limit, self.streamed_output_bytes))
                    return
            if not isinstance(self.output, list):
                self.output = []
            self.output.extend(delta["output_append"])
            events.append(EVENT_OUTPUT)
        if "output" in delta:
            self.output = delta["output"]
            events.append(EVENT_OUTPUT)
        if delta.get("logs_append"):
            self._logs.append(delta["logs_append"])
            events.append(EVENT_LOGS)
        if delta.get("metrics"):
            self.metrics.update(
                (k, v if find_non_finite(v) is None else None) for k, v in delta["metrics"].items()
            )
        if delta.get("error"):
            self.error = str(delta["error"])
        status = delta.get("status")
        if status in protocol.TERMINAL_STATUSES:
            self.finish(status, error=self.error)
            return
        for event in dict.fromkeys(events):
            self._emit(event)

    def fail(self, error: str, *, reason: EndReason | None = None) -> None:
        self.finish(protocol.STATUS_FAILED, error=error, reason=reason)

    def finish(
        self, status: str, *, error: str | None = None, reason: EndReason | None = None
    ) -> None:
        """Move to a terminal status once; later calls are ignored."""
        if self.done:
            return
        reason = reason or self._reason_for(status)
        if reason is EndReason.SHUTDOWN:
            if status == protocol.STATUS_CANCELED and not error:
                error = f"canceled: {SHUTDOWN_ERROR}"
            elif status == protocol.STATUS_FAILED and not (error or "").startswith(SHUTDOWN_ERROR):
                error = f"{SHUTDOWN_ERROR}: {error}" if error else SHUTDOWN_ERROR
        self.status = status
        self.ended_in = self.phase
        self.phase = Phase.FINISHED
        self.end_reason = reason
        if error is not None:
            self.error = error
        self.completed_at = utc_now()
        if self.started_at is not None:
            self.metrics.setdefault(
                "predict_time", (self.completed_at - self.started_at).total_seconds()
            )
        self.disarm()
        if self.files is not None:
            self.files.sealed = True  # a file an encoder still makes is in no output: removed
        # What still works for it stops: a download, an encode or upload (not the caller).
        current = _current_task()
        for task in (self.preparation, self._encoding):
            if task is not None and not task.done() and task is not current:
                task.cancel()
        self._done.set()
        self._emit(EVENT_COMPLETED)

    def _reason_for(self, status: str) -> EndReason:
        if status == protocol.STATUS_SUCCEEDED:
            return EndReason.SUCCEEDED
        if self.cancel_reason is EndReason.SHUTDOWN:
            return EndReason.SHUTDOWN
        if status == protocol.STATUS_CANCELED:
            return self.cancel_reason or EndReason.CANCELED
        return EndReason.RUNNER_DIED if self._runner_lost else EndReason.FAILED

    # --- views ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The Cog prediction object (``Secret`` inputs masked: this is what leaves the pool)."""
        body: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "input": self._public_input,
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
        if self.omitted:
            body["omitted"] = dict(self.omitted)
        return body

    def slim(
        self, value_max_bytes: int, files_max_bytes: int | None = None
    ) -> tuple[Prediction, int]:
        """A finished copy to keep for ``GET``/idempotent ``PUT``, and about how many bytes it
        holds in memory: an input value, the output or the logs larger than ``value_max_bytes``
        are not kept (``None``; the logs keep their tail) and ``omitted`` names each with its
        size. Output files kept on disk count as their references here; the copy shares them
        (``files``) unless they take more than ``files_max_bytes`` (then the output is
        omitted with their size). Secrets stay masked; nothing else of the copy refers to the
        live record."""
        omitted: dict[str, int] = {}
        slim_input: dict[str, Any] = {}
        for name, value in self._public_input.items():
            size = approx_bytes(value)
            if size > value_max_bytes:
                omitted[f"input.{name}"] = size
                value = None
            slim_input[name] = value
        output = self.output
        output_size = approx_bytes(output)
        files = self.files
        if files is not None and files_max_bytes is not None and files.bytes > files_max_bytes:
            omitted["output"] = files.bytes
            output, output_size, files = None, 0, None
        elif output_size > value_max_bytes:
            omitted["output"] = output_size
            output, files = None, None
        logs = self.logs
        logs_size = _utf8_len(logs)
        if logs_size > value_max_bytes:
            omitted["logs"] = logs_size
            logs = _utf8_cut(logs, value_max_bytes, from_end=True)
        request = PredictionRequest(
            id=self.id,
            input=slim_input,
            webhook=self.request.webhook,
            webhook_events_filter=self.request.webhook_events_filter,
            context=self.request.context,
            extra=self.request.extra,
            kind=self.request.kind,
        )
        copy = Prediction(request, source=self.source, logs_max_bytes=1)
        copy._logs = _KeptLogs(logs)  # final: a plain string, not a LogBuffer
        copy.output = output
        copy.error = self.error
        copy.metrics = dict(self.metrics)
        copy.created_at, copy.started_at = self.created_at, self.started_at
        copy.completed_at, copy.runner_index = self.completed_at, self.runner_index
        copy.status, copy.phase, copy.end_reason = self.status, self.phase, self.end_reason
        copy.ended_in = self.ended_in
        copy.cancel_requested, copy.cancel_reason = self.cancel_requested, self.cancel_reason
        copy.queued_at, copy.dispatched_at = self.queued_at, self.dispatched_at
        copy.omitted = omitted
        copy.files = files
        copy._live_hold = False  # a copy holds its files only while kept, and for readers
        copy._done = _ENDED  # one set Event for every kept copy (each of its own cost ~0.8 KB)
        copy._backlog = _NO_BACKLOG
        size = (
            SLIM_RECORD_BYTES
            + approx_bytes(slim_input)
            + (0 if output is None else output_size)
            + _utf8_len(logs)
            + len(self.error or "")
        )
        return copy, size
