"""A lean Redis connection for the Redis driver's hot path: one command per call, pipelined.

Every queued prediction costs the pool three Redis commands (the read, the idempotency
``GET`` and the publish script). Through redis-py's asyncio client each costs about 100 µs
of the pool's CPU (connection pool, retry wrapper, observability hooks, stream reader,
``wait_for`` per read), a fifth of what the pool spends on a prediction. This module sends
those commands over one asyncio ``Protocol`` connection: the request is packed in one
``bytes`` join, replies are parsed straight from the received buffer, and concurrent callers
share the connection in order (Redis answers in the order it was asked). Everything else the
driver does (claims, dead letters, cancels, backlog) stays on redis-py.

Errors are redis-py's exception classes, so the driver's taxonomy is unchanged:

- the connection fails or closes: :class:`redis.exceptions.ConnectionError` for every command
  in flight on it; the next call opens a new connection;
- no reply within ``reply_timeout_s`` (a server that stopped answering): the connection is
  dropped and its commands fail with :class:`redis.exceptions.TimeoutError`;
- an error reply: :class:`~redis.exceptions.ResponseError` (``NOSCRIPT`` → ``NoScriptError``,
  ``READONLY`` → ``ReadOnlyError``, ``LOADING`` → ``BusyLoadingError``, a connection error).

Only plain ``redis://`` and ``unix://`` URLs (user, password and database number included)
are taken; :func:`supports` says so, and the driver keeps redis-py for any other (TLS).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import time
import typing
import urllib.parse
from typing import Any

from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    NoScriptError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["LeanRedis", "ProtocolError", "parse_replies", "supports"]

MAX_BULK_BYTES = 512 * 1024 * 1024  # Redis's own proto-max-bulk-len default
MAX_ARRAY_LEN = 1 << 24
CONNECT_TIMEOUT_S = 10.0
WATCHDOG_S = 1.0


class ProtocolError(RedisConnectionError):
    """The server sent something that is not RESP2: the connection cannot be trusted."""


class _Incomplete(Exception):
    """The buffer ends inside a reply."""


_ERROR_PREFIXES: tuple[tuple[str, type[ResponseError] | type[RedisConnectionError]], ...] = (
    ("NOSCRIPT ", NoScriptError),
    ("READONLY ", ReadOnlyError),
    ("LOADING ", BusyLoadingError),
    ("NOAUTH ", AuthenticationError),
    ("WRONGPASS ", AuthenticationError),
)


def _error(text: str) -> Exception:
    """The redis-py exception for one error reply (the prefix stays in the message, as
    redis-py keeps it for a plain ResponseError: callers match ``"NOGROUP" in str(e)``)."""
    for prefix, cls in _ERROR_PREFIXES:
        if text.startswith(prefix):
            return cls(text[len(prefix) :])
    return ResponseError(text)


def _parse(buf: bytearray | bytes, pos: int) -> tuple[Any, int]:
    """One RESP2 reply from ``buf[pos:]``: (value, position after it). Bulk strings are
    bytes, an error reply is returned as an exception instance (not raised)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        if len(buf) - pos > 64 * 1024:  # no header line is this long
            raise ProtocolError("a RESP header line without its end")
        raise _Incomplete
    kind = buf[pos]
    if kind == 36:  # $ bulk string
        length = _int(buf, pos + 1, end)
        if length < 0:
            return None, end + 2
        if length > MAX_BULK_BYTES:
            raise ProtocolError(f"a bulk string of {length} bytes")
        stop = end + 2 + length
        if len(buf) < stop + 2:
            raise _Incomplete
        return bytes(buf[end + 2 : stop]), stop + 2
    if kind == 42:  # * array
        count = _int(buf, pos + 1, end)
        if count < 0:
            return None, end + 2
        if count > MAX_ARRAY_LEN:
            raise ProtocolError(f"an array of {count} elements")
        items = []
        pos = end + 2
        for _ in range(count):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 58:  # : integer
        return _int(buf, pos + 1, end), end + 2
    if kind == 43:  # + simple string
        return bytes(buf[pos + 1 : end]).decode("utf-8", "replace"), end + 2
    if kind == 45:  # - error
        return _error(bytes(buf[pos + 1 : end]).decode("utf-8", "replace")), end + 2
    raise ProtocolError(f"unknown RESP type byte {bytes([kind])!r}")


def _int(buf: bytearray | bytes, start: int, end: int) -> int:
    try:
        return int(buf[start:end])
    except ValueError:
        raise ProtocolError(f"not an integer: {bytes(buf[start:end])[:40]!r}") from None


def parse_replies(buf: bytearray) -> tuple[list[Any], int]:
    """Every whole reply at the start of ``buf``: (replies, bytes they took)."""
    replies: list[Any] = []
    pos = 0
    while pos < len(buf):
        try:
            value, pos_after = _parse(buf, pos)
        except _Incomplete:
            break
        replies.append(value)
        pos = pos_after
    return replies, pos


def pack(args: tuple[Any, ...]) -> bytes:
    """One command as a RESP2 array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode("utf-8")
        elif isinstance(arg, bool):  # never sent by the driver; bool is an int
            raise TypeError("a bool is not a Redis argument")
        elif isinstance(arg, (int, float)):
            data = repr(arg).encode()
        else:
            raise TypeError(f"not a Redis argument: {type(arg).__name__}")
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


@dataclasses.dataclass(frozen=True)
class _Target:
    host: str
    port: int
    path: str | None  # unix socket
    username: str | None
    password: str | None
    db: int


def _target(url: str) -> _Target | None:
    """The connection a URL names, or None when this module does not take it."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    if set(query) - {"db"} or parts.fragment:
        return None  # options (timeouts, TLS, ...) this connection does not implement
    db_text = query.get("db", [""])[0]
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password else None
    try:
        if parts.scheme == "redis":
            path_db = parts.path.strip("/")
            db = int(db_text or path_db or 0)
            return _Target(parts.hostname or "localhost", parts.port or 6379, None,
                           username, password, db)  # fmt: skip
        if parts.scheme == "unix" and parts.path:
            return _Target("", 0, parts.path, username, password, int(db_text or 0))
    except ValueError:
        return None
    return None


def supports(url: str) -> bool:
    """True when :class:`LeanRedis` can serve this URL (plain TCP or a unix socket)."""
    return _target(url) is not None


class _Connection(asyncio.Protocol):
    """One socket; replies resolve the futures of the commands in the order they were sent."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.buf = bytearray()
        self.closed: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's TCPTransport is no asyncio.Transport
        # subclass, though it is one in every method used here.
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        try:
            replies, used = parse_replies(buf)
        except ProtocolError as e:
            self.abort(e)
            return
        if used:
            del buf[:used]
        pending = self.pending
        for reply in replies:
            if not pending:
                self.abort(ProtocolError("a reply to no command"))
                return
            future, _ = pending.popleft()
            if not future.done():  # its caller may have been cancelled meanwhile
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed by server'}"))

    def abort(self, exc: Exception) -> None:
        """Drop the connection; every command in flight fails with ``exc``."""
        self._fail(exc)
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: Exception) -> None:
        if self.closed is None:
            self.closed = exc
        while self.pending:
            future, _ = self.pending.popleft()
            if not future.done():
                future.set_exception(exc)

    @property
    def usable(self) -> bool:
        """Open and not closing (a closing transport has not called connection_lost yet)."""
        return (
            self.closed is None and self.transport is not None and not (self.transport.is_closing())
        )

    def send(
        self, data: bytes, deadline: float, future: asyncio.Future[Any] | None = None
    ) -> asyncio.Future[Any]:
        if self.closed is not None or self.transport is None or self.transport.is_closing():
            raise RedisConnectionError("connection to Redis closed")
        if future is None:
            future = asyncio.get_running_loop().create_future()
        self.pending.append((future, deadline))
        self.transport.write(data)
        return future


class LeanRedis:
    """Commands over one pipelined connection, opened on first use and after a failure."""

    def __init__(self, url: str, *, reply_timeout_s: float = 30.0) -> None:
        target = _target(url)
        if target is None:
            raise ValueError(f"not a plain redis:// or unix:// URL: {url!r}")
        self._target = target
        self.reply_timeout_s = reply_timeout_s
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[None] | None = None
        # Commands called while the connection opens, sent in call order once it is open.
        self._queued: list[tuple[bytes, float, asyncio.Future[Any]]] = []
        self._watchdog: asyncio.Task[None] | None = None
        self._scripts: dict[str, str] = {}  # sha1 -> source
        self._closed = False

    async def execute(self, *args: Any, timeout_s: float | None = None) -> Any:
        """Send one command and return its reply (``timeout_s``: the reply's own limit, for a
        blocking command; otherwise ``reply_timeout_s``)."""
        limit = self.reply_timeout_s if timeout_s is None else timeout_s
        data, deadline = pack(args), time.monotonic() + limit
        conn = self._conn
        if conn is not None and conn.usable:
            return await conn.send(data, deadline)
        # Not connected: queue it; the opener sends the queue in order (the replies of
        # concurrent callers keep the order of their calls, across a reconnect too).
        if self._closed:
            raise RedisConnectionError("client closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((data, deadline, future))
        if self._connecting is None:
            self._connecting = asyncio.create_task(self._open(), name="redis-lean-connect")
        return await future

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self.execute("GET", key)
        return value

    def register_script(self, source: str) -> str:
        sha = hashlib.sha1(source.encode("utf-8")).hexdigest()
        self._scripts[sha] = source
        return sha

    async def evalsha(self, sha: str, keys: list[Any], args: list[Any]) -> Any:
        """Run a registered script; loaded into the server first when it does not have it
        (a restart, a ``SCRIPT FLUSH``)."""
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.execute("SCRIPT", "LOAD", self._scripts[sha])
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)

    async def aclose(self) -> None:
        self._closed = True
        for task in (self._connecting, self._watchdog):
            if task is not None:
                task.cancel()
        if self._conn is not None:
            self._conn.abort(RedisConnectionError("client closed"))
            self._conn = None

    # --- connecting ----------------------------------------------------------------------------
    async def _open(self) -> None:
        """Open a connection, then send what was queued meanwhile (or fail it all)."""
        try:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    conn = await self._open_now()
            except TimeoutError:
                raise RedisTimeoutError(
                    f"connecting to Redis timed out after {CONNECT_TIMEOUT_S}s"
                ) from None
        except BaseException as e:
            self._connecting = None
            queued, self._queued = self._queued, []
            error = e if isinstance(e, Exception) else RedisConnectionError("connect cancelled")
            for _, _, future in queued:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(e, Exception):
                raise  # cancelled (aclose)
            return  # the callers have the error; nobody awaits this task
        # No await from here on: nothing can be sent between the queue and the new calls.
        self._connecting = None
        queued, self._queued = self._queued, []
        for data, deadline, future in queued:
            if future.done():  # its caller was cancelled meanwhile: never sent
                continue
            try:
                conn.send(data, deadline, future)
            except RedisConnectionError as e:  # closed by the server at once
                future.set_exception(e)
        self._conn = conn
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(self._watch(), name="redis-lean-watchdog")

    async def _open_now(self) -> _Connection:
        loop = asyncio.get_running_loop()
        t = self._target
        try:
            if t.path is not None:
                _, conn = await loop.create_unix_connection(_Connection, t.path)
            else:
                _, conn = await loop.create_connection(_Connection, t.host, t.port)
        except OSError as e:
            raise RedisConnectionError(f"cannot connect to Redis: {e}") from e
        try:
            if t.password is not None:
                auth = (t.username, t.password) if t.username else (t.password,)
                await conn.send(pack(("AUTH", *auth)), float("inf"))
            if t.db:
                await conn.send(pack(("SELECT", t.db)), float("inf"))
        except BaseException:
            conn.abort(RedisConnectionError("connection setup failed"))
            raise
        return conn

    async def _watch(self) -> None:
        """Drop a connection whose oldest command is past its deadline: the server stopped
        answering (a half-open socket, a stopped process); the callers retry on a new one."""
        while not self._closed:
            await asyncio.sleep(WATCHDOG_S)
            conn = self._conn
            if conn is not None and conn.pending and conn.pending[0][1] < time.monotonic():
                conn.abort(RedisTimeoutError("Redis did not answer in time"))
