"""The runner's signal handlers: they record, and the control loop acts.

``signal.set_wakeup_fd`` makes the C-level handler write each signal's number to a pipe the
control loop watches, at once, even while the main thread is deep inside the model; the
Python-level handlers below run later, between the main thread's bytecodes, and only record
(or, for a sync prediction running on the main thread, raise CancelationException through the
``interrupt`` hook: that is how a cancel reaches sync model code).
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable

from coglet import protocol

__all__ = ["STOP_SIGNALS", "SignalWakeup"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalWakeup:
    """Record-only handlers plus the wakeup pipe the control loop reads."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)
        self.stop_requested = False
        # Set by the runner of a sync predictor; may raise CancelationException.
        self.interrupt: Callable[[], None] = lambda: None
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)

    def install_rescan(self) -> None:
        """SIG_RESCAN and SIG_CANCEL. An unhandled SIGHUP terminates the process, so these go in
        before setup_result.json tells the pool that it may signal."""
        signal.signal(protocol.SIG_RESCAN, self._handle_rescan)
        signal.signal(protocol.SIG_CANCEL, self._handle_cancel)

    def install_stop(self) -> None:
        """SIGTERM/SIGINT mean stop once serving; during setup their default (exit) is right."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle_stop)

    def _handle_rescan(self, signum: int, frame: Any) -> None:
        """SIG_RESCAN: new request/cancel/stop files (a stop file may end a sync prediction)."""
        self.interrupt()

    def _handle_cancel(self, signum: int, frame: Any) -> None:
        """SIG_CANCEL: a cancel-<id> file was written (it may name the sync prediction)."""
        self.interrupt()

    def _handle_stop(self, signum: int, frame: Any) -> None:
        """SIGTERM/SIGINT: stop like the ``stop`` file (or the parent died: see PDEATHSIG)."""
        self.stop_requested = True
        self.interrupt()

    def drain(self) -> bool:
        """Empty the wakeup pipe; True when any signal had arrived since the last drain."""
        got = False
        try:
            # A short read means the pipe is empty now (a signal after it makes the fd readable
            # again, so the loop comes back): one syscall, not two.
            while len(os.read(self.read_fd, 4096)) == 4096:
                got = True
            got = True
        except BlockingIOError:
            pass
        return got
