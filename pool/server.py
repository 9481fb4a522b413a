"""The HTTP server around the API: connection limits, read deadlines, protocol errors.

aiohttp serves the application; this module decides what a connection may cost. Without it a
client that connects and sends nothing, or sends headers a byte at a time, holds a socket
forever, and 20,000 of them exhaust the process's file descriptors (then every ``accept()``
fails and asyncio logs each failure).

- ``http.max_connections``: open client connections. Past it a new connection takes the place
  of the oldest connection that has not sent a request yet; when every connection has a
  request in progress, the newcomer gets a short 503 (JSON, ``Connection: close``) and is
  closed at once, so the pool keeps answering the clients it has. The cap is kept below the
  process's open-file limit.
- ``http.header_timeout_s``: a new connection must deliver its first request's headers within
  this time, or it is closed. Later requests on a kept-alive connection have
  ``http.keepalive_timeout_s`` (aiohttp's keep-alive timer) from the previous response.
- ``http.body_timeout_s``: the whole body, once the headers are in (``read_body`` below; the
  API reads every body through it): past it, 408.
- aiohttp's own protocol errors (a bad request line, bad headers) answer JSON
  ``{"detail": ...}`` like every other error, and are logged as one line, no traceback.
- Connection-level errors (refused connections, header timeouts, bad requests, ``accept()``
  failures) are logged at most once per ``http.error_log_interval_s`` per kind, with a count.

:func:`start_http` is how the CLI (and the end-to-end tests) serve an app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
import typing
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from pool.config import HttpConfig

__all__ = [
    "ConnectionGate",
    "GuardedRequestHandler",
    "GuardedSite",
    "RateLimitedLog",
    "effective_max_connections",
    "read_body",
    "start_http",
]

log = logging.getLogger(__name__)

# File descriptors kept free for everything else the pool opens (runner pipes, protocol
# files, input downloads, broker connections) when the cap is fitted under RLIMIT_NOFILE.
FD_RESERVE = 128
_DETAIL_MAX_CHARS = 200


class RateLimitedLog:
    """At most one log line per event kind per interval, carrying how many it stands for.

    The first occurrence is logged at once; the ones within the next ``interval_s`` are
    counted and logged as one line when the interval ends.
    """

    def __init__(self, logger: logging.Logger, interval_s: float) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last_at: dict[str, float] = {}
        self._pending: dict[str, tuple[int, dict[str, Any]]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def note(self, event: str, level: int = logging.WARNING, **fields: Any) -> None:
        now = time.monotonic()
        last = self._last_at.get(event)
        if last is None or now - last >= self.interval_s:
            self._last_at[event] = now
            self._emit(event, level, 1, fields)
            return
        count, _ = self._pending.get(event, (0, fields))
        self._pending[event] = (count + 1, {**fields, "level": level})
        if event not in self._timers:
            delay_s = max(0.0, last + self.interval_s - now)
            loop = asyncio.get_running_loop()
            self._timers[event] = loop.call_later(delay_s, self._flush, event)

    def _flush(self, event: str) -> None:
        self._timers.pop(event, None)
        pending = self._pending.pop(event, None)
        if pending is None:
            return
        count, fields = pending
        level = fields.pop("level", logging.WARNING)
        self._last_at[event] = time.monotonic()
        self._emit(event, level, count, fields)

    def _emit(self, event: str, level: int, count: int, fields: dict[str, Any]) -> None:
        extra = "".join(f" {k}={v}" for k, v in fields.items())
        self.logger.log(level, "%s count=%d%s", event, count, extra)

    def close(self) -> None:
        """Log what is still counted and cancel the timers."""
        for event in list(self._timers):
            self._timers.pop(event).cancel()
            self._flush(event)


class ConnectionGate:
    """Counts open client connections against the cap.

    Connections that have not sent a complete request yet are also kept in arrival order:
    when the pool is full, a newcomer takes the place of the oldest of them (a client that
    connects and waits is the cheapest way to fill the pool, and a health probe arriving
    during such a flood should still get its answer). Only when every connection has a
    request behind it is a newcomer refused.
    """

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.open = 0
        self.refused = 0
        self.evicted = 0
        self.waiting: dict[GuardedRequestHandler, None] = {}  # insertion order: oldest first

    def full(self) -> bool:
        return self.open >= self.max_connections

    def evict_oldest_waiting(self) -> bool:
        """Close the oldest connection still waiting for its first request; False if none."""
        while self.waiting:
            handler = next(iter(self.waiting))
            del self.waiting[handler]
            if handler.evict():
                self.evicted += 1
                return True
        return False


def effective_max_connections(configured: int) -> int:
    """``http.max_connections``, lowered to fit under the process's open-file limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or configured <= soft - FD_RESERVE:
        return configured
    fitted = max(1, soft - FD_RESERVE)
    log.warning(
        "http_max_connections_lowered configured=%d effective=%d nofile_limit=%d",
        configured,
        fitted,
        soft,
    )
    return fitted


def _busy_response(gate: ConnectionGate, retry_after_s: int) -> bytes:
    body = json.dumps(
        {
            "detail": f"too many open connections (http.max_connections="
            f"{gate.max_connections}); retry later"
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {retry_after_s}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class _Refusal(asyncio.Protocol):
    """A connection past the cap: a 503, then closed (it never reaches aiohttp)."""

    def __init__(self, response: bytes) -> None:
        self.response = response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's TCPTransport is no asyncio.Transport
        # subclass, though it is one in every method used here.
        stream = typing.cast(asyncio.Transport, transport)
        stream.write(self.response)
        stream.close()  # flushes the 503 first; the descriptor is freed at once after


class GuardedRequestHandler(RequestHandler):
    """aiohttp's request handler plus a first-request header deadline, a connection count
    and JSON protocol errors."""

    def __init__(
        self,
        manager: web.Server,
        *,
        gate: ConnectionGate,
        errors: RateLimitedLog,
        header_timeout_s: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._gate = gate
        self._errors = errors
        self._header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._counted = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        loop = asyncio.get_running_loop()
        self._header_timer = loop.call_later(self._header_timeout_s, self._header_deadline)
        self._gate.waiting[self] = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # _request_count counts requests whose headers were parsed on this connection.
        if self._request_count and self in self._gate.waiting:
            del self._gate.waiting[self]

    def evict(self) -> bool:
        """Close this connection to make room, if it still has no request; True if closed."""
        if self._request_count or self.transport is None or not self._counted:
            return False
        self._counted = False
        self._gate.open -= 1
        self.force_close()
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self._gate.waiting.pop(self, None)
        if self._counted:
            self._counted = False
            self._gate.open -= 1
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self._request_count == 0 and self.transport is not None:
            self._errors.note(
                "http_header_timeout", timeout_s=self._header_timeout_s, level=logging.INFO
            )
            self.force_close()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's own error answers (bad request line, bad headers...): JSON, one line."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error answer")
        if status >= 500:
            # Not a client's fault: keep the traceback for whoever fixes it.
            log.error("http_internal_error status=%d", status, exc_info=exc)
            detail = "internal server error"
        else:
            text = message or (str(exc) if exc is not None else "") or "bad request"
            detail = " ".join(text.split())[:_DETAIL_MAX_CHARS]
            self._errors.note("http_bad_request", status=status, error=json.dumps(detail))
        response = web.json_response({"detail": detail}, status=status)
        response.force_close()
        return response


class GuardedSite(web.BaseSite):
    """A TCP site whose connections pass the gate and get :class:`GuardedRequestHandler`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        config: HttpConfig,
        *,
        host: str,
        port: int,
        access_log: logging.Logger | None = None,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self.config = config
        self.gate = ConnectionGate(effective_max_connections(config.max_connections))
        self.errors = RateLimitedLog(log, config.error_log_interval_s)
        self._refusal = _busy_response(self.gate, config.retry_after_s)
        self._access_log = access_log
        self._previous_handler: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        self._loop = asyncio.get_running_loop()
        self._previous_handler = self._loop.get_exception_handler()
        self._loop.set_exception_handler(self._loop_error)
        self._server = await self._loop.create_server(
            self._protocol, self._host, self._port, backlog=self._backlog, reuse_address=True
        )

    async def stop(self) -> None:
        await super().stop()
        if self._loop is not None:
            self._loop.set_exception_handler(self._previous_handler)
        self.errors.close()

    def _protocol(self) -> asyncio.Protocol:
        """One per accepted connection: a request handler, or a 503 past the cap."""
        gate = self.gate
        if gate.full() and gate.evict_oldest_waiting():
            self.errors.note("http_connection_evicted", max_connections=gate.max_connections)
        if gate.full():
            gate.refused += 1
            self.errors.note("http_connection_refused", max_connections=gate.max_connections)
            return _Refusal(self._refusal)
        server = self._runner.server
        assert server is not None  # start() runs after runner.setup()
        gate.open += 1
        try:
            return GuardedRequestHandler(
                server,
                gate=gate,
                errors=self.errors,
                header_timeout_s=self.config.header_timeout_s,
                loop=self._loop,
                keepalive_timeout=self.config.keepalive_timeout_s,
                access_log=self._access_log,
            )
        except BaseException:
            gate.open -= 1
            raise

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio logs every failed ``accept()`` (EMFILE...): count them instead."""
        message = str(context.get("message", ""))
        if message.startswith("socket.accept() out of system resource"):
            error = context.get("exception")
            self.errors.note("http_accept_failed", error=repr(error), level=logging.ERROR)
        elif self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)


async def start_http(
    runner: web.BaseRunner,
    config: HttpConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    access_log: logging.Logger | None = None,
) -> GuardedSite:
    """Serve ``runner`` (already set up) on ``host:port`` (default: ``config``'s)."""
    if runner.server is None:
        raise RuntimeError("call runner.setup() before start_http()")
    site = GuardedSite(
        runner,
        config,
        host=config.host if host is None else host,
        port=config.port if port is None else port,
        access_log=access_log,
    )
    await site.start()
    return site


async def read_body(request: web.Request, timeout_s: float) -> bytes | bytearray:
    """The request body, whole, within ``timeout_s``; 408 (JSON) past it.

    A client that sends fewer bytes than its Content-Length would otherwise hold the
    connection and this handler forever. 413 past ``client_max_size`` comes from aiohttp.
    """
    try:
        async with asyncio.timeout(timeout_s):
            length = request.content_length
            if length is None or not READ_INTO_MIN_BYTES <= length <= request.client_max_size:
                return await request.read()
            return await _read_into(request, length)
    except TimeoutError:
        log.info("http_body_timeout timeout_s=%s path=%s", timeout_s, request.path)
        raise web.HTTPRequestTimeout(
            text=json.dumps(
                {
                    "detail": f"the request body did not arrive within http.body_timeout_s="
                    f"{timeout_s}s"
                }
            ),
            content_type="application/json",
            headers={"Connection": "close"},
        ) from None


READ_INTO_MIN_BYTES = 1 << 20
"""A body with a Content-Length of at least this is read into a ``bytearray`` that is kept."""


async def _read_into(request: web.Request, length: int) -> bytearray:
    """The body, as one ``bytearray`` grown by each chunk: aiohttp's ``read()`` grows one
    too and then copies it into ``bytes`` (two whole copies at its end, ~200 MiB for a 96 MiB
    ``data:`` input, and a ~50 ms memcpy on the loop); the parser past it keeps this buffer
    (read-only slices of it). Not ``bytearray(length)`` up front: zeroing 96 MiB is one
    ~50 ms C call on the loop; growing a large buffer is a ``mremap``, not a copy."""
    body = bytearray()
    while True:
        chunk = await request.content.readany()
        if not chunk:
            break
        body.extend(chunk)
        if len(body) > length:  # aiohttp's parser stops at Content-Length
            raise web.HTTPRequestEntityTooLarge(request.client_max_size, len(body))
    return body
