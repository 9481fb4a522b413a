"""Server-sent events for ``@cog.streaming`` models, framed as Cog 0.23.1 frames them.

``Accept: text/event-stream`` on ``POST /predictions`` or ``PUT /predictions/{id}``::

    event: start        data: {"id", "status": "processing"}
    event: output       data: {"chunk": <item>, "index": <n>}     (one per yielded item)
    event: metric       data: {"mode", "name", "value"}
    event: completed    data: <the final prediction>

Events come from the prediction record itself (its listeners), so the stream needs no copy of
the outputs: each ``output`` delta the runner writes is framed and written as soon as it is
applied. The record is also the history a second subscriber (a ``PUT`` of the same id with the
SSE header) replays: at most ``http.stream_history_capacity`` events of it; when more have
happened, that subscriber gets Cog's ``event: error`` (``SSE stream replay truncated; events
were dropped``, ``"skipped": <n>``) and the stream ends, as Cog's does; with a capacity of 0 it
gets no history, only what happens from then on.

Metrics: the runner sends a prediction's recorded metrics whole with each progress update
after they changed (and with its terminal one), so a ``metric`` event goes out, as the update
arrives, for each metric (``predict_time`` excepted) whose value changed since this
subscriber's last one, with its current value and ``mode: "replace"``. Cog sends each
``record`` as it happens, with ``mode: "increment"`` and the added amount for ``incr``:
metrics here ride on the next output or log update, several records in between read as one
event, and an increment reads as the new total.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from coglet import protocol
from pool.jsonstream import large_text
from pool.prediction import Prediction

__all__ = [
    "NOT_STREAMING",
    "REPLAY_TRUNCATED",
    "frame",
    "stream_prediction",
    "wants_sse",
]

log = logging.getLogger("pool.sse")

# Cog 0.23.1's words.
NOT_STREAMING = (
    "This model does not support streaming responses. Add @cog.streaming to predict() to "
    "enable SSE."
)
REPLAY_TRUNCATED = "SSE stream replay truncated; events were dropped"
CONTENT_TYPE = "text/event-stream"
DISCONNECT_CHECK_S = 1.0  # how soon a silent stream notices that its client went away

# A large value (a kept output file, a long string) in the final prediction is written whole.
_dumps = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=large_text
).encode


def wants_sse(request: web.Request) -> bool:
    return CONTENT_TYPE in request.headers.get("Accept", "")


def frame(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {_dumps(data)}\n\n".encode()


def _outputs(prediction: Prediction) -> list[Any]:
    return prediction.output if isinstance(prediction.output, list) else []


def _metrics(prediction: Prediction) -> dict[str, Any]:
    return {k: v for k, v in prediction.metrics.items() if k != "predict_time"}


def history_length(prediction: Prediction) -> int:
    """Events a full replay of ``prediction`` would send now."""
    if prediction.status == protocol.STATUS_STARTING and not prediction.done:
        return 0
    count = 1 + len(_outputs(prediction)) + len(_metrics(prediction))
    if prediction.done:
        count += 1
    return count


class _Cursor:
    """What one subscriber has been sent of a prediction."""

    def __init__(self, prediction: Prediction, *, from_now: bool) -> None:
        self.prediction = prediction
        started = prediction.status != protocol.STATUS_STARTING
        self.started = from_now and started
        self.sent = len(_outputs(prediction)) if from_now else 0
        self.metrics_sent: dict[str, Any] = dict(_metrics(prediction)) if from_now else {}
        self.finished = False

    def take(self) -> bytes:
        """The frames due since the last call (the end included, once)."""
        p = self.prediction
        out: list[bytes] = []
        if not self.started and (p.status != protocol.STATUS_STARTING or p.done):
            out.append(frame("start", {"id": p.id, "status": protocol.STATUS_PROCESSING}))
            self.started = True
        outputs = _outputs(p)
        for index in range(self.sent, len(outputs)):
            out.append(frame("output", {"chunk": outputs[index], "index": index}))
        self.sent = len(outputs)
        if self.started:
            for name, value in _metrics(p).items():
                if name not in self.metrics_sent or self.metrics_sent[name] != value:
                    out.append(frame("metric", {"mode": "replace", "name": name, "value": value}))
                    self.metrics_sent[name] = copy.deepcopy(value)
        if p.done and not self.finished:
            out.append(frame("completed", p.to_dict()))
            self.finished = True
        return b"".join(out)


async def stream_prediction(
    request: web.Request,
    prediction: Prediction,
    *,
    replay_capacity: int | None,
    cancel: Callable[[str], Awaitable[Any]] | None,
) -> web.StreamResponse:
    """Answer ``request`` with the prediction's event stream until it ends.

    ``replay_capacity`` None: the stream of the request that created the prediction (all of
    it). An int: a second subscriber, bounded as the module says. ``cancel``: called with the
    id when the client goes away before the end (the creator's stream only).
    """
    response = web.StreamResponse(
        status=200, headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-cache"}
    )
    if replay_capacity is not None and replay_capacity > 0:
        past = history_length(prediction)
        if past > replay_capacity:
            await response.prepare(request)
            skipped = past - replay_capacity
            await response.write(frame("error", {"error": REPLAY_TRUNCATED, "skipped": skipped}))
            await response.write_eof()
            log.info("sse_replay_truncated prediction=%s skipped=%d", prediction.id, skipped)
            return response
    cursor = _Cursor(prediction, from_now=replay_capacity == 0)
    changed = asyncio.Event()

    def on_event(_: Prediction, __: str) -> None:
        changed.set()

    prediction.add_listener(on_event)
    try:
        await response.prepare(request)
        while True:
            changed.clear()
            data = cursor.take()
            if data:
                await response.write(data)
            if cursor.finished:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), DISCONNECT_CHECK_S)
            transport = request.transport
            if transport is None or transport.is_closing():
                await _gone(prediction, cancel)
                return response
        await response.write_eof()
    except ConnectionResetError:
        await _gone(prediction, cancel)
    except asyncio.CancelledError:
        await _gone(prediction, cancel)
        raise
    finally:
        prediction.remove_listener(on_event)
    return response


async def _gone(prediction: Prediction, cancel: Callable[[str], Awaitable[Any]] | None) -> None:
    """The client went away: the creator's prediction is canceled (as a sync client's)."""
    log.info("sse_client_disconnected prediction=%s", prediction.id)
    if cancel is not None and not prediction.done:
        await cancel(prediction.id)
