"""The lean Redis connection of the Redis driver's hot path (ingest/resp.py).

The parser and packer are checked against hypothesis-generated replies split at every
place; the connection against the real Redis: replies in call order (across a connect too),
redis-py's error classes, a script reloaded after SCRIPT FLUSH, a killed connection, a server
that stops answering, a cancelled caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st
from ingest_helpers import redis_up, wait_until
from ingest_pool import free_port
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ingest import resp
from ingest.resp import LeanRedis, ProtocolError, pack, parse_replies, supports

REDIS_URL = os.environ.get("COG_POOL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


# --- wire format, no server ------------------------------------------------------------------
def _encode(value: Any) -> bytes:
    """A reply as Redis would send it (RESP2)."""
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, ResponseError):
        return b"-%s\r\n" % str(value).encode()
    if isinstance(value, str):
        return b"+%s\r\n" % value.encode()
    return b"*%d\r\n" % len(value) + b"".join(_encode(v) for v in value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Exception) or isinstance(b, Exception):
        return type(a) is type(b) and str(a) == str(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


_line = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20)
replies = st.recursive(
    st.none()
    | st.binary(max_size=64)  # bulk strings hold any bytes, CRLF included
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | _line
    | _line.filter(lambda t: t.strip() == t and t).map(lambda t: ResponseError(f"ERR {t}")),
    lambda children: st.lists(children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(replies, min_size=1, max_size=5), data=st.data())
def test_replies_split_anywhere_parse_to_what_was_sent(values, data):
    wire = b"".join(_encode(v) for v in values)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    conn = resp._Connection()
    loop = asyncio.new_event_loop()
    try:
        futures = [loop.create_future() for _ in values]
        conn.pending.extend((f, float("inf")) for f in futures)
        last = 0
        for cut in [*cuts, len(wire)]:
            conn.data_received(wire[last:cut])
            last = cut
        got = [f.exception() or f.result() for f in futures]
    finally:
        loop.close()
    assert all(_same(a, b) for a, b in zip(got, values, strict=True)), (got, values)
    assert conn.closed is None and not conn.buf


@pytest.mark.parametrize(
    "wire",
    [b"?what\r\n", b":12x\r\n", b"$abc\r\n", b"$%d\r\n" % (resp.MAX_BULK_BYTES + 1)],
    ids=["unknown type", "bad integer", "bad length", "oversized bulk"],
)
def test_a_reply_that_is_not_resp_drops_the_connection_and_fails_what_waits(wire):
    class Transport:
        aborted = False

        def abort(self) -> None:
            self.aborted = True

    conn = resp._Connection()
    conn.transport = Transport()  # type: ignore[assignment]
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
        conn.pending.append((future, float("inf")))
        conn.data_received(wire)
        assert isinstance(future.exception(), ProtocolError)
    finally:
        loop.close()
    assert conn.transport.aborted  # type: ignore[attr-defined]


def test_error_replies_become_redis_py_error_classes():
    replies, used = parse_replies(
        bytearray(b"-NOSCRIPT No matching script\r\n-NOGROUP No such key\r\n-ERR wrong\r\n")
    )
    assert used > 0
    assert isinstance(replies[0], NoScriptError)
    # A plain ResponseError keeps its prefix: the driver matches "NOGROUP" in the message.
    assert type(replies[1]) is ResponseError and "NOGROUP" in str(replies[1])
    assert type(replies[2]) is ResponseError and str(replies[2]) == "ERR wrong"


def test_pack_sends_text_as_utf8_and_refuses_what_is_not_an_argument():
    assert pack(("SET", "k\u00e9", b"\xff", 7)) == (
        b"*4\r\n$3\r\nSET\r\n$3\r\nk\xc3\xa9\r\n$1\r\n\xff\r\n$1\r\n7\r\n"
    )
    for bad in (None, True, object()):
        with pytest.raises(TypeError):
            pack(("SET", "k", bad))


@pytest.mark.parametrize(
    ("url", "taken"),
    [
        ("redis://127.0.0.1:6379/0", True),
        ("redis://:secret@host:6380/3", True),
        ("redis://user:p%40ss@host?db=2", True),
        ("unix:///run/redis.sock?db=1", True),
        ("rediss://host:6380/0", False),  # TLS: redis-py serves it
        ("redis://host/0?socket_timeout=5", False),  # an option this module does not apply
        ("redis://host/notanumber", False),
    ],
)
def test_supports_only_what_it_implements(url, taken):
    assert supports(url) is taken


# --- against the real Redis ------------------------------------------------------------------
@pytest.fixture
async def lean():
    if not await redis_up(REDIS_URL):
        pytest.fail(f"Redis is not answering at {REDIS_URL} (bash .ci/run starts it)")
    client = LeanRedis(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def redis_py():
    client = aioredis.from_url(REDIS_URL)
    keys: list[str] = []
    yield client, keys
    if keys:
        await client.delete(*keys)
    await client.aclose()


def _key(keys: list[str]) -> str:
    key = f"test-resp-{uuid.uuid4().hex[:12]}"
    keys.append(key)
    return key


async def test_concurrent_calls_get_their_own_replies_also_those_made_while_connecting(
    lean, redis_py
):
    client, keys = redis_py
    names = [_key(keys) for _ in range(200)]
    await client.mset({name: f"value-{i}" for i, name in enumerate(names)})
    # The first call opens the connection; all 200 are made before it is open.
    got = await asyncio.gather(*(lean.get(name) for name in names))
    assert got == [f"value-{i}".encode() for i in range(len(names))]
    got = await asyncio.gather(*(lean.get(name) for name in reversed(names)))
    assert got == [f"value-{i}".encode() for i in reversed(range(len(names)))]


async def test_error_replies_raise_and_the_connection_goes_on(lean, redis_py):
    client, keys = redis_py
    key = _key(keys)
    await client.set(key, "not a stream")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await lean.execute("XADD", key, "*", "f", "v")
    with pytest.raises(ResponseError, match="NOGROUP"):
        await lean.execute("XREADGROUP", "GROUP", "nogroup", "c", "STREAMS", _key(keys), ">")
    assert await lean.get(key) == b"not a stream"


async def test_a_script_is_loaded_again_after_script_flush(lean, redis_py):
    client, keys = redis_py
    key = _key(keys)
    sha = lean.register_script("redis.call('SET', KEYS[1], ARGV[1]) return {1, ARGV[1]}")
    assert await lean.evalsha(sha, [key], ["a"]) == [1, b"a"]
    await client.script_flush()
    assert await lean.evalsha(sha, [key], ["b"]) == [1, b"b"]
    assert await client.get(key) == b"b"


async def test_a_database_number_in_the_url_selects_it(redis_py):
    client, keys = redis_py
    key = _key(keys)
    lean = LeanRedis(REDIS_URL.rsplit("/", 1)[0] + "/5")
    db5 = aioredis.from_url(REDIS_URL.rsplit("/", 1)[0] + "/5")
    try:
        await lean.execute("SET", key, "in five")
        assert await db5.get(key) == b"in five"
        assert await client.get(key) is None
    finally:
        await db5.delete(key)
        await db5.aclose()
        await lean.aclose()


async def test_a_killed_connection_fails_its_calls_and_the_next_call_reconnects(lean, redis_py):
    client, keys = redis_py
    key = _key(keys)
    await lean.execute("SET", key, "v")
    own_id = await lean.execute("CLIENT", "ID")
    blocked = asyncio.ensure_future(
        lean.execute("BLPOP", _key(keys), 30, timeout_s=60)  # in flight when it is killed
    )
    await wait_until(lambda: _blocked_clients(client), what="the BLPOP waits on the server")
    await client.client_kill_filter(_id=own_id)
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(blocked, 10)
    assert await lean.get(key) == b"v"  # a new connection
    assert await lean.execute("CLIENT", "ID") != own_id


async def _blocked_clients(client: Any) -> bool:
    return int((await client.info("clients"))["blocked_clients"]) > 0


async def test_a_cancelled_caller_leaves_the_replies_of_the_others_in_order(lean, redis_py):
    client, keys = redis_py
    key = _key(keys)
    await client.set(key, "after")
    read = asyncio.ensure_future(lean.execute("BLPOP", _key(keys), 1, timeout_s=10))
    await wait_until(lambda: _blocked_clients(client), what="the BLPOP waits on the server")
    read.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await read
    # Sent behind the BLPOP on the same connection: its reply is the GET's, not the BLPOP's.
    assert await lean.get(key) == b"after"


async def test_a_refused_connection_is_a_connection_error():
    lean = LeanRedis(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(RedisConnectionError, match="cannot connect"):
            await lean.get("k")
        with pytest.raises(RedisConnectionError):  # tried again on the next call, not cached
            await lean.get("k")
    finally:
        await lean.aclose()


async def test_a_server_that_stops_answering_times_out_and_drops_the_connection(monkeypatch):
    monkeypatch.setattr(resp, "WATCHDOG_S", 0.05)
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    lean = LeanRedis(f"redis://127.0.0.1:{port}/0", reply_timeout_s=0.2)
    try:
        with pytest.raises(RedisTimeoutError, match="did not answer"):
            await asyncio.wait_for(lean.get("k"), 10)
        with pytest.raises(RedisTimeoutError):  # a fresh connection, the same silence
            await asyncio.wait_for(lean.get("k"), 10)
        assert len(accepted) == 2
    finally:
        await lean.aclose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_closed_client_refuses_calls(lean):
    await lean.aclose()
    with pytest.raises(RedisConnectionError, match="closed"):
        await lean.get("k")
