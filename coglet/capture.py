"""Python-level log capture: print(), sys.stdout/stderr writes and logging records.

Each write is attributed to one *sink* (a prediction, or the setup phase) and travels in that
prediction's response files. The sink is looked up in this order:

1. the context variable set by the runner around a prediction (each asyncio task and each
   thread has its own, so concurrent async predictions keep their logs apart);
2. the router's fallback: the setup buffer during setup, else the one prediction in flight
   when there is exactly one (this catches threads the model starts, which begin with an
   empty context);
3. the runner's real stdout/stderr, where the pool reads them as the runner's own output.

Writes below Python (``os.write(1, ...)``, C libraries, subprocesses) never pass through here:
they reach the real file descriptors, which the pool reads from the runner's pipes.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import sys
from typing import Any, Iterator, List, Optional, Protocol, TextIO, Tuple

__all__ = ["CapturedStream", "LogRouter", "LogSink", "SetupLogs", "attributed", "install"]


class LogSink(Protocol):
    """Something that collects log text: a prediction or the setup phase."""

    def append_log(self, text: str) -> None: ...


class SetupLogs:
    """The sink for everything logged while the predictor loads and runs setup()."""

    def __init__(self) -> None:
        self._parts: List[str] = []

    def append_log(self, text: str) -> None:
        self._parts.append(text)

    def text(self) -> str:
        return "".join(self._parts)


_current_sink: contextvars.ContextVar[Optional[LogSink]] = contextvars.ContextVar(
    "coglet_log_sink", default=None
)


@contextlib.contextmanager
def attributed(sink: LogSink) -> Iterator[None]:
    """Attribute Python-level output in this thread or task to ``sink`` for the block."""
    token = _current_sink.set(sink)
    try:
        yield
    finally:
        _current_sink.reset(token)


class LogRouter:
    """Chooses the sink of each captured write (see the module docstring)."""

    def __init__(self) -> None:
        # Set by the runner: the setup logs, or the single prediction in flight, or None.
        self.fallback: Optional[LogSink] = None

    def sink(self) -> Optional[LogSink]:
        sink = _current_sink.get()
        return sink if sink is not None else self.fallback


class _BinaryAdapter(io.RawIOBase):
    """``sys.stdout.buffer`` for code that writes bytes: decoded and routed like text."""

    def __init__(self, text_stream: CapturedStream) -> None:
        super().__init__()
        self._text = text_stream

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self._text.write(data.decode(self._text.encoding, errors="replace"))
        return len(data)

    def fileno(self) -> int:
        return self._text.fileno()


class CapturedStream(io.TextIOBase):
    """A replacement for sys.stdout / sys.stderr that routes text to the current sink.

    It keeps nothing buffered: each write is appended to the sink at once, so text printed
    just before predict() returns is in the logs before the terminal response is written.
    """

    def __init__(self, router: LogRouter, real: TextIO) -> None:
        super().__init__()
        self._router = router
        self._real = real
        self._buffer = _BinaryAdapter(self)

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._real, "encoding", None) or "utf-8"

    @property
    def errors(self) -> Optional[str]:  # type: ignore[override]
        return getattr(self._real, "errors", None)

    @property
    def buffer(self) -> _BinaryAdapter:
        return self._buffer

    @property
    def real(self) -> TextIO:
        """The stream this one replaced (the runner's real stdout or stderr)."""
        return self._real

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        # Progress bars (tqdm) check this; the logs are not a terminal.
        return False

    def fileno(self) -> int:
        # Code that asks for the descriptor writes below Python: that goes to the real pipe.
        return self._real.fileno()

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if not s:
            return 0
        sink = self._router.sink()
        if sink is not None:
            sink.append_log(s)
        else:
            self._real.write(s)
            self._real.flush()
        return len(s)

    def flush(self) -> None:
        # Nothing is buffered here; the real stream is flushed on each pass-through write.
        return None


class _RoutedHandler(logging.Handler):
    """A root logging handler that writes through the captured sys.stderr at emit time."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def install(router: LogRouter) -> Tuple[TextIO, TextIO]:
    """Replace sys.stdout/sys.stderr with captured streams; route logging through them.

    Returns the real (stdout, stderr) text streams for the runner's own output.
    """
    real_out, real_err = sys.stdout, sys.stderr
    sys.stdout = CapturedStream(router, real_out)
    sys.stderr = CapturedStream(router, real_err)
    root = logging.getLogger()
    if not root.handlers:
        # Without this, logging.info() in a model goes nowhere (the root logger's default
        # level is WARNING and it has no handler); Cog shows INFO records in the logs.
        handler = _RoutedHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        root.addHandler(handler)
        if root.level == logging.WARNING:
            root.setLevel(logging.INFO)
    return real_out, real_err
