"""The lean AMQP connection of the AMQP driver's hot path (ingest/amqp_wire.py).

Frames are fed split at hypothesis-chosen places and must give the same deliveries and
confirms; malformed streams close the connection and fail what waits. Against a scripted
broker (a local socket): deliveries in the same read as their Consume-Ok, a broker that goes
silent (heartbeats), a broker that never answers the connect. Against the real RabbitMQ:
round trips with bodies larger than a frame, a mandatory message returned, a closed channel,
a connection the broker closes, a refused login.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ingest_helpers import wait_until
from pamqp import commands
from pamqp import frame as pframe
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from ingest.amqp_wire import AmqpClosed, AmqpWire, Delivered, Returned, supports

AMQP_URL = os.environ.get("COG_POOL_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def _frames(*values: Any, channel: int = 1) -> bytes:
    return b"".join(pframe.marshal(v, channel) for v in values)


def _message(
    tag: int, body: bytes, *, ctag: str = "ct", frame_max: int = 4096, **props: Any
) -> bytes:
    """A delivery as the broker sends it: method, header, body frames of at most frame_max."""
    room = frame_max - 8
    parts = [
        commands.Basic.Deliver(consumer_tag=ctag, delivery_tag=tag, exchange="", routing_key="q"),
        ContentHeader(0, len(body), commands.Basic.Properties(**props)),
    ]
    parts += [ContentBody(body[i : i + room]) for i in range(0, len(body), room)]
    return _frames(*parts)


class _Transport(asyncio.Transport):
    """Collects what the connection writes; closing it ends the connection as a socket would."""

    def __init__(self, wire: AmqpWire) -> None:
        super().__init__()
        self.wire = wire
        self.written = bytearray()
        self.closing = False

    def write(self, data: Any) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.wire.connection_lost(None)


def _opened(frame_max: int = 4096) -> tuple[AmqpWire, _Transport, list[Delivered]]:
    """A wire past its handshake (as if tuned to frame_max) with one consumer, tag "ct"."""
    wire = AmqpWire("test")
    transport = _Transport(wire)
    wire.connection_made(transport)
    wire._frame_max = frame_max
    got: list[Delivered] = []
    wire._consumers["ct"] = got.append
    return wire, transport, got


# --- frames, no broker -----------------------------------------------------------------------
_bodies = st.lists(st.binary(max_size=9000), min_size=1, max_size=4)


@settings(max_examples=100, deadline=None)
@given(bodies=_bodies, data=st.data())
async def test_deliveries_split_anywhere_arrive_whole_and_in_order(bodies, data):
    wire, _, got = _opened()
    stream = b"".join(
        _message(n + 1, body, message_id=f"m{n}", headers={"x-delivery-count": n})
        for n, body in enumerate(bodies)
    )
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=12)))
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        wire.data_received(stream[start:end])
    assert not wire.is_closed
    assert [m.body for m in got] == bodies
    assert [m.delivery.delivery_tag for m in got] == list(range(1, len(bodies) + 1))
    assert [m.header.properties.message_id for m in got] == [f"m{n}" for n in range(len(bodies))]
    assert [m.header.properties.headers for m in got] == [
        {"x-delivery-count": n} for n in range(len(bodies))
    ]


def _confirm_waiters(wire: AmqpWire, n: int) -> list[asyncio.Task[Any]]:
    return [
        asyncio.ensure_future(
            wire.basic_publish(
                b"r",
                routing_key="q",
                properties=commands.Basic.Properties(message_id=f"p{i}"),
                mandatory=True,
            )
        )
        for i in range(n)
    ]


async def test_confirms_settle_one_many_and_returned_publishes():
    wire, transport, _ = _opened()
    waiting = _confirm_waiters(wire, 4)  # sequence numbers 1-4, message ids p0-p3
    await asyncio.sleep(0)  # the publishes queue their frames
    return_p2 = commands.Basic.Return(
        reply_code=312, reply_text="NO_ROUTE", exchange="", routing_key="q"
    )
    wire.data_received(
        _frames(
            commands.Basic.Ack(delivery_tag=1),
            return_p2,
            ContentHeader(0, 1, commands.Basic.Properties(message_id="p2")),
            ContentBody(b"r"),
            commands.Basic.Ack(delivery_tag=3, multiple=True),  # 2 and 3
            commands.Basic.Nack(delivery_tag=4),
        )
    )
    results = await asyncio.gather(*waiting)
    assert [type(r) for r in results] == [
        commands.Basic.Ack,
        commands.Basic.Ack,
        Returned,
        commands.Basic.Nack,
    ]
    assert results[2].header.properties.message_id == "p2"
    assert not wire.is_closed and transport.written.count(b"r\xce") == 4


@pytest.mark.parametrize(
    "stream, why",
    [
        (_frames(commands.Basic.Ack(delivery_tag=1))[:-1] + b"\x00", "frame-end"),
        (struct.pack(">BHI", 1, 1, 10_000_000), "exceeds frame_max"),
        (_frames(ContentBody(b"x")), "without its header"),
        (struct.pack(">BHI", 9, 1, 1) + b"x\xce", "unknown frame type"),
        (struct.pack(">BHI", 1, 1, 4) + b"\x00\x63\x00\x01\xce", "protocol error"),
        (_message(1, b"abc")[:-11] + _frames(ContentBody(b"abcd")), "longer than"),
        (b"AMQP\x00\x00\x09\x01", "refused"),
        (_frames(commands.Basic.QosOk()), "unexpected"),
    ],
    ids=[
        "frame-end",
        "oversize",
        "orphan-body",
        "frame-type",
        "method",
        "long-body",
        "header",
        "unasked",
    ],
)
async def test_a_malformed_stream_closes_the_connection_and_fails_what_waits(stream, why):
    wire, transport, got = _opened()
    confirm = _confirm_waiters(wire, 1)[0]
    await asyncio.sleep(0)
    wire.data_received(stream)
    assert wire.is_closed and transport.closing
    assert why in str(wire.closed.result())
    with pytest.raises(AmqpClosed):
        await confirm
    with pytest.raises(AmqpClosed):
        await wire.basic_ack(1)
    assert got == []


@pytest.mark.parametrize(
    "url, taken",
    [
        ("amqp://guest:guest@127.0.0.1:5672/", True),
        ("amqp://u:p%40ss@rabbit/prod%2Fjobs", True),
        ("amqp://localhost", True),
        ("amqps://guest:guest@127.0.0.1:5671/", False),
        ("amqp://guest:guest@127.0.0.1/?heartbeat=5", False),
        ("amqp://127.0.0.1:notaport/", False),
        ("redis://127.0.0.1/", False),
    ],
)
def test_supports_only_plain_amqp_urls(url, taken):
    assert supports(url) is taken


# --- a scripted broker on a local socket -----------------------------------------------------
class _ScriptedBroker:
    """Speaks the handshake (with the given heartbeat), then runs ``after`` with the socket."""

    def __init__(
        self, after: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any], heartbeat: int = 0
    ) -> None:
        self.after = after
        self.heartbeat = heartbeat

    async def _frame(self, reader: asyncio.StreamReader) -> Any:
        head = await reader.readexactly(7)
        _, _, size = struct.unpack(">BHI", head)
        rest = await reader.readexactly(size + 1)
        return pframe.unmarshal(head + rest)[2]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readexactly(8)
            writer.write(_frames(commands.Connection.Start(mechanisms="PLAIN"), channel=0))
            await self._frame(reader)  # Start-Ok
            tune = commands.Connection.Tune(channel_max=1, frame_max=4096, heartbeat=self.heartbeat)
            writer.write(_frames(tune, channel=0))
            await self._frame(reader)  # Tune-Ok
            await self._frame(reader)  # Open
            writer.write(_frames(commands.Connection.OpenOk(), channel=0))
            await self._frame(reader)  # Channel.Open
            writer.write(_frames(commands.Channel.OpenOk()))
            await self._frame(reader)  # Confirm.Select
            writer.write(_frames(commands.Confirm.SelectOk()))
            await self.after(self, reader, writer)


@contextlib.asynccontextmanager
async def scripted(after: Any, heartbeat: int = 0) -> AsyncIterator[str]:
    broker = _ScriptedBroker(after, heartbeat)
    server = await asyncio.start_server(broker.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"amqp://guest:guest@127.0.0.1:{port}/"
    finally:
        server.close()


async def test_deliveries_in_the_same_read_as_their_consume_ok_are_not_lost():
    async def after(broker: _ScriptedBroker, reader: Any, writer: Any) -> None:
        await broker._frame(reader)  # Consume
        writer.write(
            _frames(commands.Basic.ConsumeOk(consumer_tag="ct"))
            + _message(1, b"first")
            + _message(2, b"second")
        )
        await reader.read()  # until the client goes

    async with scripted(after) as url:
        wire = await AmqpWire.connect(url, connection_name="test")
        got: list[Delivered] = []
        await wire.basic_consume("q", got.append)
        await wait_until(lambda: len(got) == 2, what="both deliveries")
        assert [m.body for m in got] == [b"first", b"second"]
        await wire.close(timeout_s=0.2)


async def test_a_broker_that_goes_silent_is_given_up_after_two_heartbeats():
    async def after(broker: _ScriptedBroker, reader: Any, writer: Any) -> None:
        await reader.read()  # reads our heartbeats, answers nothing

    async with scripted(after, heartbeat=1) as url:
        wire = await AmqpWire.connect(url, connection_name="test")
        waiting = _confirm_waiters(wire, 1)[0]
        await wait_until(lambda: wire.is_closed, timeout_s=10, what="silence noticed")
        assert "two heartbeat intervals" in str(wire.closed.result())
        with pytest.raises(AmqpClosed):
            await waiting


async def test_a_broker_that_never_answers_the_connect_times_out():
    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await asyncio.start_server(never, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(AmqpClosed, match="timed out"):
            await AmqpWire.connect(
                f"amqp://guest:guest@127.0.0.1:{port}/", connection_name="t", timeout_s=0.3
            )
    finally:
        server.close()


# --- the real RabbitMQ -----------------------------------------------------------------------
@pytest.fixture
async def queue() -> AsyncIterator[str]:
    name = f"test-wire-{uuid.uuid4().hex[:12]}"
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    await channel.declare_queue(name, durable=False)
    try:
        yield name
    finally:
        await channel.queue_delete(name)
        await connection.close()


@pytest.fixture
async def wire() -> AsyncIterator[AmqpWire]:
    wire = await AmqpWire.connect(AMQP_URL, connection_name=f"test-wire {uuid.uuid4().hex}")
    try:
        yield wire
    finally:
        await wire.close()


@pytest.mark.broker
async def test_round_trip_with_bodies_larger_than_a_frame(wire, queue):
    got: asyncio.Queue[Delivered] = asyncio.Queue()
    await wire.basic_qos(prefetch_count=10)
    await wire.basic_consume(queue, got.put_nowait)
    bodies = [b"", b"x", os.urandom(131072 * 2 + 17)]
    confirms = await asyncio.gather(
        *(
            wire.basic_publish(
                body,
                routing_key=queue,
                properties=commands.Basic.Properties(message_id=str(n), headers={"n": n}),
                mandatory=True,
            )
            for n, body in enumerate(bodies)
        )
    )
    assert all(isinstance(c, commands.Basic.Ack) for c in confirms)
    for n, body in enumerate(bodies):
        message = await asyncio.wait_for(got.get(), 10)
        assert message.body == body and message.header.properties.headers == {"n": n}
        await wire.basic_ack(message.delivery.delivery_tag)
    assert not wire.is_closed


@pytest.mark.broker
async def test_a_mandatory_message_to_no_queue_comes_back_returned(wire):
    confirm = await wire.basic_publish(
        b"lost?",
        routing_key=f"no-such-queue-{uuid.uuid4().hex}",
        properties=commands.Basic.Properties(message_id="m1"),
        mandatory=True,
    )
    assert isinstance(confirm, Returned) and confirm.delivery.reply_text == "NO_ROUTE"
    assert confirm.body == b"lost?" and not wire.is_closed


@pytest.mark.broker
async def test_a_channel_the_broker_closes_ends_the_connection(wire):
    with pytest.raises(AmqpClosed, match="404"):
        await wire.basic_publish(b"x", exchange=f"no-such-exchange-{uuid.uuid4().hex}")
    assert wire.is_closed and wire.closed.result().reply_code == 404
    with pytest.raises(AmqpClosed):
        await wire.basic_publish(b"x", routing_key="q")


@pytest.mark.broker
async def test_a_connection_the_broker_closes_fails_its_waiters():
    name = f"test-wire-close {uuid.uuid4().hex}"
    wire = await AmqpWire.connect(AMQP_URL, connection_name=name)
    listing = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "list_connections", "pid", "client_properties", "-q", "--no-table-headers"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    pids = [line.split("\t", 1)[0] for line in listing.stdout.splitlines() if name in line]
    assert len(pids) == 1  # the connection_name reaches the broker
    await asyncio.to_thread(
        subprocess.run, ["rabbitmqctl", "close_connection", pids[0], "test"], timeout=60, check=True
    )
    await wait_until(lambda: wire.is_closed, what="close seen")
    assert wire.closed.result().reply_code == 320  # CONNECTION_FORCED


@pytest.mark.broker
async def test_a_refused_login_is_an_amqp_closed_error():
    with pytest.raises(AmqpClosed, match=r"403|ACCESS_REFUSED"):
        await AmqpWire.connect(
            "amqp://guest:wrong-password@127.0.0.1:5672/", connection_name="test", timeout_s=10
        )


async def test_properties_that_do_not_decode_make_a_delivery_with_a_problem_not_a_close():
    wire, _, got = _opened()
    bad = _message(1, b'{"input": {}}', message_id="PLACEHOLDER")
    bad = bad.replace(b"\x0bPLACEHOLDER", b"\x0b\xff\xfe" + b"x" * 9)  # not UTF-8, same length
    wire.data_received(bad + _message(2, b"next", message_id="m2"))
    assert not wire.is_closed
    assert [m.body for m in got] == [b'{"input": {}}', b"next"]
    assert "UnicodeDecodeError" in (got[0].problem or "")
    assert got[0].header.properties.message_id is None
    assert got[1].problem is None and got[1].header.properties.message_id == "m2"


async def test_a_callback_that_raises_rejects_its_message_and_the_connection_goes_on():
    wire, transport, got = _opened()

    def broken(message: Delivered) -> None:
        if message.body == b"boom":
            raise RuntimeError("a bug in the consumer")
        got.append(message)

    wire._consumers["ct"] = broken
    wire.data_received(_message(7, b"boom") + _message(8, b"fine"))
    await asyncio.sleep(0)  # the flush
    assert not wire.is_closed and [m.body for m in got] == [b"fine"]
    nack = _frames(commands.Basic.Nack(delivery_tag=7, requeue=False))
    assert nack in transport.written
