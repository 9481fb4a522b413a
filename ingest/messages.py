"""Turning a queue message into a :class:`PredictionRequest`, or into a dead-letter reason.

Both consumers accept the same body as ``POST /predictions``. Anything that can never become
a prediction is *poison*: it goes to the dead letters with the reason, it is never retried.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ingest import names
from pool.errors import InvalidRequest, NotReady, PoolBusy, PoolFull, ShuttingDown
from pool.prediction import MAX_JSON_DEPTH, Prediction, PredictionRequest, nests_deeper_than

__all__ = [
    "RETRY_LATER",
    "ConsumerStats",
    "Poison",
    "after_runner_died",
    "over_delivered",
    "parse_request",
    "runner_died",
    "shutdown_casualty",
]


@dataclasses.dataclass
class ConsumerStats:
    """Counters every queue consumer keeps; each adds its broker's own (health and metrics)."""

    received: int = 0
    completed: int = 0
    republished: int = 0
    dead_lettered: int = 0
    redeliveries: int = 0
    returned: int = 0
    reconnects: int = 0
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
    try:
        body: Any = json.loads(raw)
    except RecursionError:
        # Hostile nesting exhausts the decoder's recursion: poison, not a crash that would
        # leave the message to be redelivered and crash the consumer again forever.
        raise Poison(too_deep) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Poison(f"{names.REASON_INVALID_JSON}: {e}") from None
    if nests_deeper_than(body, MAX_JSON_DEPTH):
        # The HTTP API's limit: the result's encoder and the runner's decoder recurse too.
        raise Poison(too_deep)
    if isinstance(body, dict) and "input" not in body:
        raise Poison(f"{names.REASON_INVALID_REQUEST}: missing required field 'input'")
    try:
        request = PredictionRequest.from_body(body)
    except InvalidRequest as e:
        raise Poison(f"{names.REASON_INVALID_REQUEST}: {e}") from None
    if request.id is None:
        request = dataclasses.replace(request, id=names.safe_id(fallback_id))
    return request


def runner_died(prediction: Prediction) -> bool:
    """True when the prediction failed because its runner process died under it.

    Such a failure says nothing about the message (the GPU may have had a hiccup), so the
    consumers hand the message back for another delivery instead of publishing the failure,
    and dead-letter it only after ``max_deliveries``. The runner handle sets the flag when it
    fails the predictions of a process that exited (DESIGN §3).
    """
    return prediction.status == "failed" and prediction.runner_died


def over_delivered(deliveries: int, max_deliveries: int) -> str | None:
    """Before running: the dead-letter reason of a message delivered more than
    ``max_deliveries`` times (its runners kept dying under it), else None."""
    if deliveries > max_deliveries:
        return _too_many(deliveries, max_deliveries, "its runner kept dying")
    return None


def after_runner_died(
    prediction: Prediction, *, deliveries: int, max_deliveries: int
) -> str | None:
    """After its runner died (:func:`runner_died`): the dead-letter reason when this was the
    message's last allowed delivery, else None (hand it back for another delivery)."""
    if deliveries >= max_deliveries:
        return _too_many(deliveries, max_deliveries, f"last error: {prediction.error}")
    return None


def _too_many(deliveries: int, max_deliveries: int, why: str) -> str:
    return (
        f"{names.REASON_MAX_DELIVERIES}: delivered {deliveries} times "
        f"(max_deliveries={max_deliveries}); {why}"
    )


def shutdown_casualty(prediction: Prediction) -> bool:
    """True when a draining pool, not the model, ended the prediction: canceled (the manager
    cancels what outlives the grace), failed by the shutdown, or its runner was stopped.

    A consumer that is stopping hands such a message back instead of publishing it. (A user's
    cancel that lands during the drain is indistinguishable; it is redelivered and rerun.)
    """
    if prediction.status == "canceled" or runner_died(prediction):
        return True
    shut_down = (prediction.error or "").startswith("the pool shut down")
    return prediction.status == "failed" and shut_down
