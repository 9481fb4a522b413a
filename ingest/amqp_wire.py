"""A lean AMQP 0-9-1 connection for the AMQP driver's hot path: one channel, confirm mode.

Every queued prediction costs the pool one delivery, one confirmed publish and one ack.
Through aiormq each crosses its reader and writer tasks, an ``asyncio.Queue``, the channel
lock and one ``send`` system call per frame group: about a quarter of what the pool spent
on an AMQP prediction (py-spy at saturation). This module keeps the AMQP methods the driver
needs on the hot path on one asyncio ``Protocol`` connection:

- frames are cut from the received buffer in ``data_received`` and dispatched there (no
  reader task); pamqp's command classes encode and decode the methods and properties;
- everything written in one turn of the event loop leaves in one ``transport.write``
  (acks and publishes of results that finished together share a system call);
- ``basic_publish`` returns the broker's confirm (``Basic.Ack`` / ``Basic.Nack``) or, for a
  mandatory message the broker could not route, the :class:`Returned` message (matched by
  ``message_id``, as aiormq does); ``basic_ack`` / ``basic_nack`` are queued, not awaited.

The method names and results match the subset of ``aiormq.Channel`` the driver calls, so
the driver treats either the same. Declarations, the cancel broadcast and the queue-depth
monitor stay on aio-pika (a second connection). A connection or channel the broker closes,
a lost socket, a consumer the broker cancels (its queue deleted) or silence past twice the
heartbeat end this connection: every waiter fails with :class:`AmqpClosed` (a
``ConnectionError``) and :attr:`closed` completes, so the driver reconnects.

Only ``amqp://`` URLs without query parameters are taken (:func:`supports`); the driver
keeps aiormq for any other (TLS, connection options in the query).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
import urllib.parse
from collections.abc import Callable
from typing import Any, cast

from pamqp import commands
from pamqp.header import ContentHeader

__all__ = ["AmqpClosed", "AmqpWire", "Delivered", "Returned", "supports"]

log = logging.getLogger(__name__)

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE
FRAME_MAX = 131072  # what we ask for (RabbitMQ's default); the broker may lower it
PRE_TUNE_FRAME_MAX = 1024 * 1024  # Connection.Start's server properties, before tuning
HEARTBEAT_S = 60  # proposed; the broker's lower non-zero value wins
CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
CHANNEL = 1
_HEAD = struct.Struct(">BHI")
_METHOD_ID = struct.Struct(">I")
_HEADER_FIXED = struct.Struct(">HHQ")  # a content header's class id, weight and body size
_HEARTBEAT_FRAME = bytes([FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END])
# Methods the broker sends on its own; every other method answers our last request.
_ASYNC = (
    commands.Basic.Deliver,
    commands.Basic.Return,
    commands.Basic.Ack,
    commands.Basic.Nack,
    commands.Basic.Cancel,
    commands.Channel.Close,
    commands.Channel.Flow,
    commands.Connection.Close,
    commands.Connection.Blocked,
    commands.Connection.Unblocked,
)


class AmqpClosed(ConnectionError):
    """The connection or its channel is gone (closed by the broker, by us, or lost)."""

    def __init__(self, message: str, reply_code: int | None = None) -> None:
        super().__init__(message)
        self.reply_code = reply_code


class Delivered:
    """A delivered message, shaped like aiormq's ``DeliveredMessage`` where the driver reads it.

    ``problem`` says why its properties could not be decoded (a short string that is not
    UTF-8, say): it arrives with empty properties, for the driver to dead-letter, instead
    of ending the connection and coming back forever."""

    __slots__ = ("body", "delivery", "header", "problem")

    def __init__(
        self,
        delivery: commands.Basic.Deliver,
        header: ContentHeader,
        body: bytes,
        problem: str | None = None,
    ) -> None:
        self.delivery = delivery
        self.header = header
        self.body = body
        self.problem = problem


class Returned(Delivered):
    """A mandatory message the broker could not route (``Basic.Return``), with its reply."""

    __slots__ = ()


class _Content:
    """A message being read: its method, then its header, then body frames until complete."""

    __slots__ = ("chunks", "header", "kind", "method", "problem", "remaining")

    def __init__(self, kind: type[Delivered], method: Any) -> None:
        self.kind = kind
        self.method = method
        self.header: ContentHeader | None = None
        self.chunks: list[bytes] = []
        self.remaining = 0
        self.problem: str | None = None


def _target(url: str) -> tuple[str, int, str, str, str] | None:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or 5672
    except ValueError:
        return None
    if parts.scheme != "amqp" or not parts.hostname or parts.query or parts.fragment:
        return None
    vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    user = urllib.parse.unquote(parts.username) if parts.username is not None else "guest"
    password = urllib.parse.unquote(parts.password) if parts.password is not None else "guest"
    return parts.hostname, port, user, password, vhost


def supports(url: str) -> bool:
    """True when :class:`AmqpWire` can serve this URL (plain ``amqp://``, no options)."""
    return _target(url) is not None


def _method_frame(channel: int, method: Any) -> bytes:
    payload = _METHOD_ID.pack(method.index) + method.marshal()
    return _HEAD.pack(FRAME_METHOD, channel, len(payload)) + payload + b"\xce"


class AmqpWire(asyncio.Protocol):
    """One AMQP connection with one channel (number 1) in publisher-confirm mode."""

    def __init__(self, connection_name: str, heartbeat_s: int = HEARTBEAT_S) -> None:
        self.connection_name = connection_name
        self._heartbeat_wanted = heartbeat_s
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._frame_max = PRE_TUNE_FRAME_MAX
        self._out: list[bytes] = []
        self._flush_scheduled = False
        # Requests waiting for their answers, per channel: the broker answers them in order.
        self._rpc: dict[int, collections.deque[tuple[type, asyncio.Future[Any]]]] = {
            0: collections.deque(),
            CHANNEL: collections.deque(),
        }
        self._content: _Content | None = None
        self._consumers: dict[str, Callable[[Delivered], Any]] = {}
        # Callbacks of Basic.Consume requests in flight: registered as their Consume-Ok is
        # read, since deliveries can follow it in the same read.
        self._consuming: collections.deque[Callable[[Delivered], Any]] = collections.deque()
        self._next_tag = 0  # the last publish's sequence number (confirm mode counts from 1)
        self._confirms: dict[int, asyncio.Future[Any]] = {}
        self._by_message_id: dict[str, int] = {}
        self._returned: dict[int, Returned] = {}
        self._heartbeat_s = 0
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._received = True  # since the last heartbeat check
        self._silent_checks = 0  # heartbeat checks in a row that found nothing received
        self._wrote = True
        self.blocked = False  # the broker blocks publishers (memory or disk alarm)
        self.closed: asyncio.Future[AmqpClosed] = self._loop.create_future()
        self.server_properties: dict[str, Any] = {}

    # --- opening -------------------------------------------------------------------------------
    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        connection_name: str,
        timeout_s: float = CONNECT_TIMEOUT_S,
        heartbeat_s: int = HEARTBEAT_S,
    ) -> AmqpWire:
        target = _target(url)
        if target is None:
            raise ValueError(f"not a plain amqp:// URL: {url!r}")
        host, port, user, password, vhost = target
        loop = asyncio.get_running_loop()
        wire = cls(connection_name, heartbeat_s)
        try:
            async with asyncio.timeout(timeout_s):
                await loop.create_connection(lambda: wire, host, port)
                await wire._handshake(user, password, vhost)
        except BaseException as e:
            wire._fail(AmqpClosed(f"AMQP connect failed: {e!r}"))
            if isinstance(e, TimeoutError):
                raise AmqpClosed(f"AMQP connect to {host}:{port} timed out") from e
            raise
        return wire

    async def _handshake(self, user: str, password: str, vhost: str) -> None:
        start = self._expect(commands.Connection.Start, channel=0)
        self._send(PROTOCOL_HEADER)
        reply = await start
        if b"PLAIN" not in reply.mechanisms.encode().split():
            raise AmqpClosed(f"the broker offers no PLAIN login ({reply.mechanisms})")
        self.server_properties = dict(reply.server_properties or {})
        tune = self._expect(commands.Connection.Tune, channel=0)
        self._send(
            _method_frame(
                0,
                commands.Connection.StartOk(
                    client_properties={
                        "product": "cog-pool",
                        "connection_name": self.connection_name,
                        "capabilities": {
                            "publisher_confirms": True,
                            "consumer_cancel_notify": True,
                            "basic.nack": True,
                            "connection.blocked": True,
                            "authentication_failure_close": True,
                        },
                    },
                    mechanism="PLAIN",
                    response=f"\0{user}\0{password}",
                ),
            )
        )
        tuned = await tune
        frame_max = min(tuned.frame_max or FRAME_MAX, FRAME_MAX)
        heartbeat = (
            min(tuned.heartbeat, self._heartbeat_wanted)
            if tuned.heartbeat and self._heartbeat_wanted
            else tuned.heartbeat or self._heartbeat_wanted
        )
        self._send(
            _method_frame(
                0,
                commands.Connection.TuneOk(channel_max=1, frame_max=frame_max, heartbeat=heartbeat),
            )
        )
        self._frame_max = frame_max
        await self._call(
            0, commands.Connection.Open(virtual_host=vhost), commands.Connection.OpenOk
        )
        await self._call(CHANNEL, commands.Channel.Open(), commands.Channel.OpenOk)
        await self._call(CHANNEL, commands.Confirm.Select(), commands.Confirm.SelectOk)
        if heartbeat:
            self._heartbeat_s = heartbeat
            self._heartbeat_timer = self._loop.call_later(heartbeat / 2, self._heartbeat)

    # --- the aiormq.Channel subset the driver uses ---------------------------------------------
    @property
    def is_closed(self) -> bool:
        return self.closed.done()

    async def basic_qos(self, *, prefetch_count: int) -> Any:
        return await self._call(
            CHANNEL, commands.Basic.Qos(prefetch_count=prefetch_count), commands.Basic.QosOk
        )

    async def basic_consume(
        self, queue: str, consumer_callback: Callable[[Delivered], Any], *, no_ack: bool = False
    ) -> commands.Basic.ConsumeOk:
        """Consume ``queue``; ``consumer_callback`` is called (not awaited) per delivery, in
        order, from the reading side: it must be quick and must not raise."""
        future = self._expect(commands.Basic.ConsumeOk, channel=CHANNEL)
        self._consuming.append(consumer_callback)
        self._send(_method_frame(CHANNEL, commands.Basic.Consume(queue=queue, no_ack=no_ack)))
        ok: commands.Basic.ConsumeOk = await future
        return ok

    async def basic_cancel(self, consumer_tag: str) -> Any:
        reply = await self._call(
            CHANNEL, commands.Basic.Cancel(consumer_tag=consumer_tag), commands.Basic.CancelOk
        )
        self._consumers.pop(consumer_tag, None)
        return reply

    async def basic_publish(
        self,
        body: bytes,
        *,
        exchange: str = "",
        routing_key: str = "",
        properties: commands.Basic.Properties | None = None,
        mandatory: bool = False,
        wait: bool = False,
    ) -> commands.Basic.Ack | commands.Basic.Nack | Returned:
        """Publish and wait for the broker's confirm (``wait`` is accepted for aiormq's
        signature; the frames are queued either way)."""
        self._check_open()
        properties = properties or commands.Basic.Properties()
        self._next_tag += 1
        tag = self._next_tag
        confirm: asyncio.Future[Any] = self._loop.create_future()
        self._confirms[tag] = confirm
        message_id = properties.message_id
        if mandatory and message_id:
            self._by_message_id[message_id] = tag
        method = commands.Basic.Publish(
            exchange=exchange, routing_key=routing_key, mandatory=mandatory
        )
        header = ContentHeader(0, len(body), properties).marshal()
        parts = [
            _method_frame(CHANNEL, method),
            _HEAD.pack(FRAME_HEADER, CHANNEL, len(header)),
            header,
            b"\xce",
        ]
        room = self._frame_max - 8
        for start in range(0, len(body), room):
            chunk = body[start : start + room]
            parts += (_HEAD.pack(FRAME_BODY, CHANNEL, len(chunk)), chunk, b"\xce")
        self._send(b"".join(parts))
        try:
            return await confirm
        finally:
            if message_id and self._by_message_id.get(message_id) == tag:
                del self._by_message_id[message_id]
            self._returned.pop(tag, None)

    async def basic_ack(
        self, delivery_tag: int, *, multiple: bool = False, wait: bool = False
    ) -> None:
        self._check_open()
        self._send(
            _method_frame(CHANNEL, commands.Basic.Ack(delivery_tag=delivery_tag, multiple=multiple))
        )

    async def basic_nack(
        self, delivery_tag: int, *, multiple: bool = False, requeue: bool = True
    ) -> None:
        self._check_open()
        self._send(
            _method_frame(
                CHANNEL,
                commands.Basic.Nack(delivery_tag=delivery_tag, multiple=multiple, requeue=requeue),
            )
        )

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close politely (Connection.Close, wait for Close-Ok), then drop the socket."""
        if self.is_closed:
            return
        closing = self._expect(commands.Connection.CloseOk, channel=0)
        self._send(
            _method_frame(
                0,
                commands.Connection.Close(
                    reply_code=200, reply_text="bye", class_id=0, method_id=0
                ),
            )
        )
        try:
            async with asyncio.timeout(timeout_s):
                await closing
        except (TimeoutError, ConnectionError):
            pass
        self._fail(AmqpClosed("closed by the client", 200))

    # --- requests ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed.done():
            raise self.closed.result()

    def _expect(self, kind: type, *, channel: int) -> asyncio.Future[Any]:
        self._check_open()
        future: asyncio.Future[Any] = self._loop.create_future()
        self._rpc[channel].append((kind, future))
        return future

    async def _call(self, channel: int, method: Any, reply: type) -> Any:
        future = self._expect(reply, channel=channel)
        self._send(_method_frame(channel, method))
        return await future

    def _send(self, data: bytes) -> None:
        self._out.append(data)
        self._wrote = True
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        transport = self._transport
        if out and transport is not None and not transport.is_closing():
            transport.write(b"".join(out))

    # --- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's TCPTransport is no asyncio.Transport
        # subclass, though it is one in every method used here.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(AmqpClosed(f"AMQP connection lost: {exc!r}" if exc else "AMQP connection lost"))

    def data_received(self, data: bytes) -> None:
        self._received = True
        buf = self._buf
        buf += data
        pos, end_of_data = 0, len(buf)
        try:
            while end_of_data - pos >= 7:
                if buf[pos : pos + 4] == b"AMQP":  # the broker's own protocol header: refused
                    raise AmqpClosed("the broker refused AMQP 0-9-1")
                kind, channel, size = _HEAD.unpack_from(buf, pos)
                if size > self._frame_max:
                    raise AmqpClosed(f"frame of {size} bytes exceeds frame_max {self._frame_max}")
                end = pos + 7 + size
                if end >= end_of_data:
                    break
                if buf[end] != FRAME_END:
                    raise AmqpClosed("malformed frame (no frame-end octet)")
                payload = bytes(buf[pos + 7 : end])
                pos = end + 1
                self._frame(kind, channel, payload)
                if self.closed.done():
                    return
        except AmqpClosed as e:
            self._fail(e)
            return
        except Exception as e:  # pamqp refused a method or header: the stream cannot be trusted
            self._fail(AmqpClosed(f"AMQP protocol error: {e!r}"))
            return
        del buf[:pos]

    # --- frames --------------------------------------------------------------------------------
    def _frame(self, kind: int, channel: int, payload: bytes) -> None:
        if kind == FRAME_BODY:
            self._body(payload)
        elif kind == FRAME_METHOD:
            (index,) = _METHOD_ID.unpack_from(payload)
            method = commands.INDEX_MAPPING[index]()
            method.unmarshal(payload[4:])
            self._method(channel, method)
        elif kind == FRAME_HEADER:
            header = ContentHeader()
            try:
                header.unmarshal(payload)
            except (ValueError, struct.error) as e:  # UnicodeDecodeError is a ValueError
                if len(payload) < _HEADER_FIXED.size:
                    raise AmqpClosed(f"a content header of {len(payload)} bytes") from None
                _, _, size = _HEADER_FIXED.unpack_from(payload)
                self._header(ContentHeader(0, size, commands.Basic.Properties()), repr(e))
            else:
                self._header(header)
        elif kind != FRAME_HEARTBEAT:
            raise AmqpClosed(f"unknown frame type {kind}")

    def _method(self, channel: int, method: Any) -> None:
        if self._content is not None:
            raise AmqpClosed(f"{method.name} inside a message's content")
        if isinstance(method, commands.Basic.Deliver):
            self._content = _Content(Delivered, method)
        elif isinstance(method, commands.Basic.Ack | commands.Basic.Nack):
            self._confirmed(method)
        elif isinstance(method, commands.Basic.Return):
            self._content = _Content(Returned, method)
        elif not isinstance(method, _ASYNC):
            self._answer(channel, method)
        elif isinstance(method, commands.Connection.Close):
            self._send(_method_frame(0, commands.Connection.CloseOk()))
            self._flush()
            raise AmqpClosed(
                f"the broker closed the connection: {method.reply_code} {method.reply_text}",
                method.reply_code,
            )
        elif isinstance(method, commands.Channel.Close):
            self._send(_method_frame(channel, commands.Channel.CloseOk()))
            raise AmqpClosed(
                f"the broker closed the channel: {method.reply_code} {method.reply_text}",
                method.reply_code,
            )
        elif isinstance(method, commands.Basic.Cancel):
            # consumer_cancel_notify: the queue went away; a new session declares it again.
            raise AmqpClosed(f"the broker cancelled consumer {method.consumer_tag}")
        elif isinstance(method, commands.Channel.Flow):
            self._send(_method_frame(channel, commands.Channel.FlowOk(active=method.active)))
        elif isinstance(method, commands.Connection.Blocked):
            self.blocked = True
            log.warning("amqp_connection_blocked reason=%r", method.reason)
        elif isinstance(method, commands.Connection.Unblocked):
            self.blocked = False
            log.info("amqp_connection_unblocked")

    def _answer(self, channel: int, method: Any) -> None:
        waiting = self._rpc.get(channel)
        if not waiting:
            raise AmqpClosed(f"unexpected {method.name} on channel {channel} from the broker")
        kind, future = waiting.popleft()
        if not isinstance(method, kind):
            raise AmqpClosed(f"expected {kind.__name__}, the broker sent {method.name}")
        if isinstance(method, commands.Basic.ConsumeOk):
            self._consumers[method.consumer_tag or ""] = self._consuming.popleft()
        if not future.done():
            future.set_result(method)

    def _header(self, header: ContentHeader, problem: str | None = None) -> None:
        content = self._content
        if content is None or content.header is not None:
            raise AmqpClosed("a content header without its method")
        content.header, content.remaining = header, header.body_size
        content.problem = problem
        if not content.remaining:
            self._content = None
            self._complete(content.kind(content.method, header, b"", problem))

    def _body(self, payload: bytes) -> None:
        content = self._content
        if content is None or content.header is None:
            raise AmqpClosed("a content body without its header")
        content.remaining -= len(payload)
        if content.remaining < 0:
            raise AmqpClosed("a content body longer than its header said")
        content.chunks.append(payload)
        if content.remaining:
            return
        self._content = None
        chunks = content.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._complete(content.kind(content.method, content.header, body, content.problem))

    def _complete(self, message: Delivered) -> None:
        if isinstance(message, Returned):
            message_id = message.header.properties.message_id
            tag = self._by_message_id.get(message_id or "")
            if tag is None:
                log.warning("amqp_return_unmatched message_id=%r", message_id)
            else:
                self._returned[tag] = message  # its confirm (an ack) follows
            return
        tag = message.delivery.delivery_tag or 0
        callback = self._consumers.get(message.delivery.consumer_tag or "")
        if callback is None:  # not expected (deliveries precede their consumer's Cancel-Ok)
            log.warning("amqp_delivery_unknown_consumer tag=%r", message.delivery.consumer_tag)
            self._send(_method_frame(CHANNEL, commands.Basic.Nack(delivery_tag=tag, requeue=True)))
            return
        try:
            callback(message)
        except Exception:
            # A bug in the callback must not end the connection: the message would come back
            # and end the next one too. Rejected, it goes to the queue's dead-letter exchange.
            log.exception("amqp_delivery_callback_failed delivery_tag=%d", tag)
            nack = commands.Basic.Nack(delivery_tag=tag, requeue=False)
            self._send(_method_frame(CHANNEL, nack))

    def _confirmed(self, method: commands.Basic.Ack | commands.Basic.Nack) -> None:
        tag = method.delivery_tag
        if method.multiple:
            done = [t for t in self._confirms if t <= tag]
        else:
            done = [tag] if tag in self._confirms else []
        for t in done:
            future = self._confirms.pop(t)
            if not future.done():
                returned = self._returned.get(t)
                future.set_result(returned if returned is not None else method)

    # --- liveness ------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        """Every half heartbeat: send one if we wrote nothing; give up on a silent broker."""
        if self.closed.done():
            return
        if not self._wrote:
            self._send(_HEARTBEAT_FRAME)
        self._wrote = False
        if self._received:
            self._silent_checks = 0
        else:
            self._silent_checks += 1
            if self._silent_checks >= 4:  # two heartbeat intervals without a byte
                self._fail(AmqpClosed("the broker sent nothing for two heartbeat intervals"))
                return
        self._received = False
        self._heartbeat_timer = self._loop.call_later(self._heartbeat_s / 2, self._heartbeat)

    def _fail(self, error: AmqpClosed) -> None:
        if self.closed.done():
            return
        self.closed.set_result(error)
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
        for waiting in self._rpc.values():
            for _, future in waiting:
                if not future.done():
                    future.set_exception(error)
            waiting.clear()
        for future in self._confirms.values():
            if not future.done():
                future.set_exception(error)
        self._confirms.clear()
        self._by_message_id.clear()
        self._returned.clear()
        self._consumers.clear()
        self._consuming.clear()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            self._flush()  # a Close-Ok we owe goes out first
            transport.close()
