"""What a sync predictor needs: a cancelable main thread and a helper thread for timers.

A sync predict() runs on the main thread, inline in the control loop, because Python runs
signal handlers only on the main thread: that is the one place a handler can raise
CancelationException inside the model's code. While it runs, the control loop cannot, so the
few things that must happen on time meanwhile (writing streamed output and logs, announcing a
long prediction, noticing a dead parent or a cancel whose signal was lost) run on a small
helper thread, :class:`TimerThread`. A null prediction touches neither: it costs no thread
switch.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

from cog.exceptions import CancelationException

from coglet import protocol

__all__ = ["SyncGuard", "TimerThread"]

_log = logging.getLogger("coglet")


class SyncGuard:
    """Makes the sync prediction running on the main thread cancelable by signals."""

    def __init__(self, working_dir: str, stop_requested: Callable[[], bool]) -> None:
        self._dir = working_dir
        self._stop_requested = stop_requested
        self._main_ident = threading.get_ident()  # built on the main thread
        self._cancelable: Optional[Any] = None  # the Prediction inside call_cancelable
        self.running: Optional[Any] = None  # the Prediction running now, cancelable or not

    def call_cancelable(self, prediction: Any, fn: Callable[[], Any]) -> Any:
        """Run fn() so that a cancel of ``prediction`` raises CancelationException in it.

        The handler may fire inside the ``finally`` too: the caller catches it there the same.
        """
        self._cancelable = prediction
        try:
            return fn()
        finally:
            self._cancelable = None

    def should_cancel(self, prediction: Any) -> bool:
        """Was ``prediction`` canceled, or the runner told to stop? (files count too)"""
        return (
            prediction.cancel_requested
            or self._stop_requested()
            or os.path.exists(os.path.join(self._dir, protocol.cancel_name(prediction.id)))
            or os.path.exists(os.path.join(self._dir, protocol.STOP_FILE))
        )

    def on_signal(self) -> None:
        """From a signal handler (main thread): raise once if the running one is canceled."""
        prediction = self._cancelable
        if prediction is not None and self.should_cancel(prediction):
            self._cancelable = None
            raise CancelationException(f"prediction {prediction.id} was canceled")

    def interrupt(self, prediction: Any) -> None:
        """From another thread: cancel ``prediction`` if it is the one running."""
        prediction.cancel_requested = True
        if self.running is prediction:
            # The handler runs on the main thread between bytecodes and raises there.
            signal.pthread_kill(self._main_ident, protocol.SIG_CANCEL)


class TimerThread(threading.Thread):
    """Runs small protocol callbacks on time, plus ``on_tick`` every ``tick_s``."""

    def __init__(self, tick_s: float, on_tick: Callable[[], None]) -> None:
        super().__init__(name="coglet-timer", daemon=True)
        self._tick_s = tick_s
        self._on_tick = on_tick
        self._cond = threading.Condition()
        self._heap: List[Tuple[float, int, Callable[..., Any], Tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._stopped = False

    def call_later(self, delay_s: float, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on this thread after ``delay_s`` (thread-safe)."""
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay_s, next(self._seq), fn, args))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def run(self) -> None:
        next_tick = time.monotonic() + self._tick_s
        while True:
            due = self._wait_for_due(next_tick)
            if due is None:
                return
            for fn, args in due:
                self._call(fn, args)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + self._tick_s
                self._call(self._on_tick, ())

    def _wait_for_due(
        self, next_tick: float
    ) -> Optional[List[Tuple[Callable[..., Any], Tuple[Any, ...]]]]:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                wake_at = min(self._heap[0][0], next_tick) if self._heap else next_tick
                if wake_at <= now:
                    due = []
                    while self._heap and self._heap[0][0] <= now:
                        _, _, fn, args = heapq.heappop(self._heap)
                        due.append((fn, args))
                    return due
                self._cond.wait(wake_at - now)
            return None

    @staticmethod
    def _call(fn: Callable[..., Any], args: Tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception:
            _log.exception("timer_callback_failed callback=%r", fn)
