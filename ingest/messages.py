"""Turning a queue message into a :class:`PredictionRequest`, or into a dead-letter reason.

Both consumers accept the same body as ``POST /predictions``. Anything that can never become
a prediction is *poison*: it goes to the dead letters with the reason, it is never retried.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from ingest import names
from pool.errors import InvalidRequest, NotReady, PoolBusy, PoolFull, ShuttingDown
from pool.jsonbody import loads_large
from pool.prediction import (
    MAX_JSON_DEPTH,
    PredictionRequest,
    check_wire_safe,
    nests_deeper_than,
)

__all__ = [
    "RETRY_LATER",
    "Poison",
    "after_runner_died",
    "check_values",
    "over_delivered",
    "parse_request",
]

# What the manager's submit() raises for "not now, try again": the consumers wait for a slot.
RETRY_LATER: tuple[type[Exception], ...] = (PoolFull, PoolBusy, NotReady, ShuttingDown)


class Poison(Exception):
    """The message can never run; ``reason`` says why (it travels with the dead letter)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_request(
    raw: bytes | str | None, *, max_bytes: int, fallback_id: str
) -> PredictionRequest:
    """Parse one message body; raise :class:`Poison` naming what is wrong.

    ``fallback_id`` (derived from the broker's stable message id) becomes the prediction id
    when the body has none, so a redelivery of the same message keeps its id.
    """
    if raw is None:
        raise Poison(f"{names.REASON_MISSING_VALUE}: the entry has no {names.FIELD_VALUE!r} field")
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > max_bytes:
        raise Poison(f"{names.REASON_TOO_LARGE}: {size} bytes > max_message_bytes={max_bytes}")
    too_deep = f"{names.REASON_INVALID_JSON}: JSON nested deeper than {MAX_JSON_DEPTH} levels"
    split, body = loads_large(raw, json.loads) if isinstance(raw, bytes) else (False, None)
    if split:  # a long string input (a data: URI) stays a slice of the message, as over HTTP
        return _request(body, fallback_id)
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")  # strictly: json.loads would guess UTF-16/32 from bytes
        except UnicodeDecodeError as e:
            raise Poison(f"{names.REASON_INVALID_JSON}: the message is not UTF-8 ({e})") from None
    try:
        # NaN and ±Infinity parse here so that check_wire_safe below names the field holding
        # them (the dead letter says "input.x: number nan is not finite").
        body = json.loads(raw)
    except RecursionError:
        # Hostile nesting exhausts the decoder's recursion: poison, not a crash that would
        # leave the message to be redelivered and crash the consumer again forever.
        raise Poison(too_deep) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Poison(f"{names.REASON_INVALID_JSON}: {e}") from None
    return _request(body, fallback_id)


def _request(body: Any, fallback_id: str) -> PredictionRequest:
    too_deep = f"{names.REASON_INVALID_JSON}: JSON nested deeper than {MAX_JSON_DEPTH} levels"
    if nests_deeper_than(body, MAX_JSON_DEPTH):
        # The HTTP API's limit: the result's encoder and the runner's decoder recurse too.
        raise Poison(too_deep)
    if isinstance(body, dict) and "input" not in body:
        raise Poison(f"{names.REASON_INVALID_REQUEST}: missing required field 'input'")
    try:
        request = PredictionRequest.from_body(body)
        # The wire check HTTP requests get in submit() (input, context, webhook): early here,
        # so a message that can never run is dead-lettered without waiting for a slot.
        check_wire_safe(request)
    except InvalidRequest as e:
        raise Poison(f"{names.REASON_INVALID_REQUEST}: {e}") from None
    # Whatever else the body carries (reply_to, extra fields) travels with the result.
    problem = check_values(body)
    if problem is not None:
        raise Poison(f"{names.REASON_INVALID_REQUEST}: {problem}")
    if request.id is None:
        request = dataclasses.replace(request, id=names.safe_id(fallback_id))
    return request


def over_delivered(deliveries: int, max_deliveries: int) -> str | None:
    """Before running: the dead-letter reason of a message delivered more than
    ``max_deliveries`` times (its runners kept dying under it), else None."""
    if deliveries > max_deliveries:
        return _too_many(deliveries, max_deliveries, "its runner kept dying")
    return None


def after_runner_died(prediction: Any, *, deliveries: int, max_deliveries: int) -> str | None:
    """After its runner died: the dead-letter reason when this was the
    message's last allowed delivery, else None (hand it back for another delivery)."""
    if deliveries >= max_deliveries:
        return _too_many(deliveries, max_deliveries, f"last error: {prediction.error}")
    return None


def _too_many(deliveries: int, max_deliveries: int, why: str) -> str:
    return (
        f"{names.REASON_MAX_DELIVERIES}: delivered {deliveries} times "
        f"(max_deliveries={max_deliveries}); {why}"
    )


def check_values(value: Any, where: str = "body") -> str | None:
    """What in a decoded message can never be a prediction, with where it is, else None.

    Non-finite numbers (``1e999`` decodes to inf) and lone UTF-16 surrogates (``"\\ud800"``
    decodes to a string no UTF-8 encoder accepts: the result could never be published, and
    the message would be redelivered to a prediction that cannot end). Iterative: the depth
    is bounded before this runs, but no recursion is needed.
    """
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return f"{path} is {item!r}: non-finite numbers are not allowed"
        if isinstance(item, str):
            if _has_surrogate(item):
                return f"{path} holds a lone surrogate (not encodable as UTF-8)"
        elif isinstance(item, dict):
            for key, child in item.items():
                if _has_surrogate(key):
                    return f"a key in {path} holds a lone surrogate (not encodable as UTF-8)"
                stack.append((child, f"{path}.{key}"))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
