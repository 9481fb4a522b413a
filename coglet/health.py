"""The user's ``healthcheck()``: run periodically off the prediction path, result in health.json.

A predictor may define ``healthcheck(self)`` (sync or ``async def``). The runner calls it
every ``healthcheck_interval_s`` on a helper thread, so a slow or hung check never delays a
prediction, and writes ``health.json`` atomically after each check:
``{"healthy": bool, "error": str|null, "checked_at": iso}``. The parent is signalled
(SIG_OUTPUT) only when ``(healthy, error)`` changes. The error text is Cog 0.23.1's:

- returned ``False`` (only ``False``: None and other values are healthy, as Cog):
  ``Healthcheck failed: user-defined healthcheck returned False``
- raised: ``Healthcheck failed: <Type>: <message>``
- took longer than HEALTHCHECK_TIMEOUT_S: ``Healthcheck failed: user-defined healthcheck
  timed out after 5.0 seconds`` (a check still running at the next tick counts as timed out
  again; no second one is started beside it).

Standard library only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import os
import threading
from datetime import datetime, timezone
from typing import Any, Callable, Optional, Tuple

from coglet import capture, protocol

__all__ = ["HealthChecker", "check_error_text"]

_log = logging.getLogger("coglet")

FAILED_PREFIX = "Healthcheck failed: "
RETURNED_FALSE = "user-defined healthcheck returned False"


def check_error_text(
    *, result: Any = None, exc: Optional[BaseException] = None, timeout_s: Optional[float] = None
) -> Optional[str]:
    """None when healthy, else Cog's words for why not."""
    if timeout_s is not None:
        return f"{FAILED_PREFIX}user-defined healthcheck timed out after {timeout_s} seconds"
    if exc is not None:
        return f"{FAILED_PREFIX}{type(exc).__name__}: {exc}"
    if result is False:
        return FAILED_PREFIX + RETURNED_FALSE
    return None


class _RunnerLogSink:
    """What a check prints goes to the runner's own log, never into a prediction's."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self._write = write

    def append_log(self, text: str) -> None:
        self._write(text)


class HealthChecker:
    """Runs ``check`` every ``interval_s`` on its own thread; keeps health.json current."""

    def __init__(
        self,
        check: Callable[[], Any],
        *,
        working_dir: str,
        interval_s: float,
        notify: Callable[[], None],
        log_write: Callable[[str], None],
        loop: Optional[asyncio.AbstractEventLoop] = None,
        timeout_s: float = protocol.HEALTHCHECK_TIMEOUT_S,
    ) -> None:
        self._check = check
        self._path = os.path.join(working_dir, protocol.HEALTH_FILE)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._notify = notify
        self._sink = _RunnerLogSink(log_write)
        # An async check runs on the predictions' loop when that loop is free to run it
        # (an async predictor): what setup() bound to that loop stays usable.
        self._loop = loop
        self._stop = threading.Event()
        self._pending: Optional[concurrent.futures.Future] = None
        self._last: Optional[Tuple[bool, Optional[str]]] = None
        self._thread = threading.Thread(target=self._run, name="coglet-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check_once()
            self._stop.wait(self.interval_s)

    def check_once(self) -> Tuple[bool, Optional[str]]:
        """Run (or keep waiting for) one check, record it; returns (healthy, error)."""
        if self._pending is None or self._pending.done():
            self._pending = self._start_call()
        try:
            error = self._pending.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            error = check_error_text(timeout_s=self.timeout_s)
        except BaseException as e:  # the check itself raised
            error = check_error_text(exc=e)
        self._record(error is None, error)
        return error is None, error

    def _start_call(self) -> concurrent.futures.Future:
        """Run one check on a fresh daemon thread: one that hangs must never hold the
        runner's exit (a ThreadPoolExecutor's workers are joined at interpreter exit)."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def work() -> None:
            try:
                future.set_result(self._call())
            except BaseException as e:  # the check raised: its error is the result
                future.set_exception(e)

        threading.Thread(target=work, name="coglet-healthcheck-call", daemon=True).start()
        return future

    def _call(self) -> Optional[str]:
        with capture.attributed(self._sink):
            result = self._check()
            if inspect.isawaitable(result):
                result = self._await(result)
        return check_error_text(result=result)

    def _await(self, awaitable: Any) -> Any:
        if self._loop is not None and self._loop.is_running():
            return asyncio.run_coroutine_threadsafe(_as_coroutine(awaitable), self._loop).result()
        # A sync predictor's loop is busy inside each prediction: the check gets its own.
        return asyncio.run(_as_coroutine(awaitable))

    def _record(self, healthy: bool, error: Optional[str]) -> None:
        checked_at = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        try:
            protocol.write_json_atomic(
                self._path, {"healthy": healthy, "error": error, "checked_at": checked_at}
            )
        except OSError as e:
            _log.error("health_write_failed error=%r", e)
            return
        if (healthy, error) != self._last:
            self._last = (healthy, error)
            _log.info("healthcheck_changed healthy=%s error=%r", healthy, error)
            self._notify()


async def _as_coroutine(awaitable: Any) -> Any:
    return await awaitable
