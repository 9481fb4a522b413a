"""The response files of one prediction: epoch-numbered deltas, written strictly in order.

Output items and log text accumulate here from whichever thread runs the model's code and are
written as one delta per flush, so items produced faster than files can be written share a
file (never reordered) and a long stream costs O(n). The terminal delta carries everything
still pending, so nothing printed just before predict() returns is lost.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Union

from coglet import protocol

__all__ = ["LOG_FLUSH_S", "OutputJSON", "RawText", "Responder", "encode_json"]

# Log text waits this long for company before it is written on its own: a progress bar that
# redraws a thousand times a second costs twenty files a second, not a thousand.
LOG_FLUSH_S = 0.05


# Built once: json.dumps() with any non-default option builds a new encoder on every call.
encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
"""Compact JSON text; raises TypeError/ValueError for values JSON cannot carry."""
# For the runner's own fields (metrics may hold anything a model recorded): never raises.
_encode_fields = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=repr).encode


class RawText:
    """A whole output that is one large string, kept raw rather than JSON-encoded: written
    after the spilled delta's JSON head (protocol.RAW_OUTPUT_KEY), so neither side runs one
    long JSON call over it. Without a spill dir it is JSON-encoded like any output."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


# The whole output of a prediction: its JSON text, or a large string raw.
OutputJSON = Union[str, RawText]


class Responder:
    """Writes ``response-<id>-<epoch>.json`` for one prediction; a log sink; thread-safe."""

    def __init__(
        self,
        working_dir: str,
        prediction_id: str,
        *,
        notify: Callable[[], None],
        schedule_flush: Callable[[Responder, float], None],
        late_log: Callable[[str], None],
        spill_dir: Optional[str] = None,
        spill_bytes: int = protocol.SPILL_DELTA_BYTES,
    ) -> None:
        self.prediction_id = prediction_id
        self._prefix = os.path.join(working_dir, f"{protocol.RESPONSE_PREFIX}{prediction_id}-")
        # Large deltas go to disk, not to the working dir (see protocol.SPILL_DELTA_BYTES).
        self._spill_prefix = (
            os.path.join(spill_dir, f"{protocol.DELTA_FILE_PREFIX}{prediction_id}-")
            if spill_dir
            else None
        )
        self._spill_bytes = spill_bytes
        self._notify = notify
        self._schedule_flush = schedule_flush
        self._late_log = late_log
        # Re-entrant: a finalizer that prints may run while this thread holds the lock.
        self._lock = threading.RLock()
        self._epoch = 0
        self._items: List[str] = []  # JSON text of output items not yet written
        self._logs: List[str] = []
        self._log_flush_armed = False
        self._item_flush_armed = False
        self._done = False
        # The prediction's recorded metrics (watch_metrics): a processing delta carries them
        # whole when they changed since the last delta that did, so the pool sees them live.
        self._metrics: Optional[Dict[str, Any]] = None
        self._metrics_sent: Optional[Dict[str, Any]] = None

    @property
    def done(self) -> bool:
        return self._done

    # --- what the model's side adds --------------------------------------------------------------
    def append_log(self, text: str) -> None:
        """Add log text (the LogSink interface); it is written within LOG_FLUSH_S."""
        with self._lock:
            if self._done:
                late = True
            else:
                late = False
                self._logs.append(text)
                arm = not self._log_flush_armed
                self._log_flush_armed = True
        if late:
            # Written after the terminal delta (a stray thread): the runner's own stream.
            self._late_log(text)
        elif arm:
            self._schedule_flush(self, LOG_FLUSH_S)

    def append_output(self, item_json: str) -> None:
        """Add one output item (already JSON text); it is written at the next flush."""
        with self._lock:
            if self._done:
                return
            self._items.append(item_json)
            arm = not self._item_flush_armed
            self._item_flush_armed = True
        if arm:
            self._schedule_flush(self, 0.0)

    # --- writing --------------------------------------------------------------------------------
    def start(self, logs: str = "") -> None:
        """Note the start (with any logs so far, e.g. input warnings); writes nothing yet.

        Epoch 0 ("processing") is written by :meth:`announce` a moment later, only if the
        prediction is still running then; a fast prediction's first file is its terminal
        delta, so it costs one write, one read and one wake-up of the parent instead of two.
        """
        if logs:
            with self._lock:
                self._logs.append(logs)

    def watch_metrics(self, metrics: Dict[str, Any]) -> None:
        """Send ``metrics`` (the live recorder) with each processing delta after it changed."""
        with self._lock:
            self._metrics = metrics

    def announce(self) -> bool:
        """Write epoch 0 (status processing) unless a delta was written already; True if so."""
        with self._lock:
            if self._done or self._epoch > 0:
                return False
            self._write_locked(protocol.STATUS_PROCESSING, None)
            return True

    def flush(self) -> None:
        """Write what is pending as a processing delta; nothing when there is nothing new."""
        with self._lock:
            self._log_flush_armed = self._item_flush_armed = False
            if self._done or not (self._items or self._logs):
                return
            self._write_locked(protocol.STATUS_PROCESSING, None)
        self._notify()

    def finish(
        self,
        status: str,
        *,
        output_json: Optional[OutputJSON] = None,
        stream: bool = False,
        error: Optional[str] = None,
        error_type: Optional[str] = None,
        metrics: Optional[dict] = None,
    ) -> bool:
        """Write the terminal delta with everything still pending; False if already done.

        ``output_json`` is the whole output (non-iterators); ``stream`` marks an iterator,
        whose terminal delta always carries ``output_append`` so an empty stream reads as [].

        When that write fails (a full disk or tmpfs), a short "failed" delta that says why is
        written in its place; when even that fails, the OSError propagates and the runner
        must exit (EXIT_RESPONSE_WRITE_FAILED): the parent must never wait for an epoch that
        will not come.
        """
        extra: Dict[str, Any] = {}
        if error is not None:
            extra["error"] = error
        if error_type is not None:
            extra[protocol.ERROR_TYPE_KEY] = error_type
        if metrics:
            extra["metrics"] = metrics
        with self._lock:
            if self._done:
                return False
            self._done = True
            try:
                self._write_locked(status, output_json, extra, stream=stream)
            except OSError as e:
                self._items = []
                self._logs = []
                notice = {
                    "error": f"the runner could not write this prediction's response: {e}",
                    protocol.ERROR_TYPE_KEY: "OSError",
                }
                self._write_locked(protocol.STATUS_FAILED, None, notice)
        self._notify()
        return True

    def _write_locked(
        self,
        status: str,
        output_json: Optional[OutputJSON],
        extra: Optional[dict] = None,
        *,
        stream: bool = False,
    ) -> None:
        raw: Optional[str] = None
        if isinstance(output_json, RawText):
            if self._spill_prefix is not None:
                raw, output_json = output_json.text, None
            else:
                output_json = encode_json(output_json.text)
        fields: dict = {"status": status}
        if self._logs:
            fields["logs_append"] = "".join(self._logs)
        if extra:
            fields.update(extra)
        metrics_now = None
        if self._metrics is not None and status == protocol.STATUS_PROCESSING:
            try:
                metrics_now = copy.deepcopy(dict(self._metrics))
            except Exception:  # a value deepcopy cannot take: the terminal delta has it
                metrics_now = None
            if metrics_now and metrics_now != self._metrics_sent:
                fields["metrics"] = metrics_now
            else:
                metrics_now = None
        # Output is spliced in as JSON text encoded by the thread that produced it, so an
        # unencodable value fails the prediction there, with the model's traceback. The parts
        # are written one after another, never joined: a large output is not copied again.
        parts = [_encode_fields(fields)[:-1]]
        if self._items or stream:
            parts.append(f',"output_append":[{",".join(self._items)}]')
        if output_json is not None:
            parts.append(',"output":')
            parts.append(output_json)
        if raw is not None:
            parts.append(f',"{protocol.RAW_OUTPUT_KEY}":true')
        parts.append("}")
        # backslashreplace turns a lone surrogate (undecodable bytes a model printed) into a
        # JSON escape instead of an exception; everything else is plain UTF-8.
        data = [part.encode("utf-8", "backslashreplace") for part in parts]
        del parts
        if raw is not None:  # after the head's newline, as UTF-8 (surrogates kept as such)
            data.append(b"\n")
            data.append(raw.encode("utf-8", "surrogatepass"))
        size = sum(len(chunk) for chunk in data)
        path = f"{self._prefix}{self._epoch}.json"
        if self._spill_prefix is not None and (size > self._spill_bytes or raw is not None):
            spilled = f"{self._spill_prefix}{self._epoch}.json"
            pointer = {"status": status, protocol.DELTA_FILE_KEY: spilled}
            protocol.write_spilled(path, spilled, data, _encode_fields(pointer).encode())
        else:
            protocol.write_atomic(path, data)
        # Only a written delta uses up its epoch and its pending text: after a failed write
        # the same epoch is tried again with everything still pending, so none goes missing.
        self._epoch += 1
        self._logs = []
        self._items = []
        if metrics_now is not None:
            self._metrics_sent = metrics_now
