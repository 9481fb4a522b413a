"""Hypothesis-generated messages through both real brokers into one real pool process.

Arbitrary bytes, unicode, JSON shapes (non-finite numbers, lone surrogates, wrong types,
unknown fields, ids that collide), sizes around ``max_message_bytes``: every message ends as
exactly one result or one dead letter with a reason, intake never stops (each message settles
within a deadline, the next one too), and nothing stays pending at the end.

One ``python -m cogpool serve`` process (real coglet runners) consumes a private Redis
stream and a private AMQP queue for the whole module; each example sends one message and
waits for its settle. Bounded: 120 examples per broker.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aio_pika
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ingest_helpers import wait_until, wait_until_sync
from ingest_pool import (
    AMQP_URL,
    REDIS_URL,
    amqp_overrides,
    delete_amqp_names,
    redis_overrides,
    spawn_pool_process,
    stop_process,
    unique,
)

from ingest import names

pytestmark = pytest.mark.broker

MAX_BYTES = 4096
EXAMPLES = 120
SETTLE_S = 20.0

# --- messages -----------------------------------------------------------------------------------
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["\ud800", "a\udfffb", "\U0001f600", "\x00", "é"]),  # lone surrogates too
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# The echo model's inputs: n (int), payload (str); anything else is refused by its schema.
inputs = st.dictionaries(
    st.sampled_from(["n", "payload", "unknown", "\ud800", ""]),
    st.one_of(st.integers(min_value=-(10**6), max_value=10**6), json_values),
    max_size=3,
)
ids = st.one_of(st.none(), st.sampled_from(["same-id", "other", "../x", ""]), st.text(max_size=12))
bodies = st.fixed_dictionaries(
    {"input": st.one_of(inputs, json_values)},
    optional={
        "id": ids,
        "context": json_values,
        "webhook_events_filter": json_values,
        "extra": json_values,
    },
)


def encode(body: dict[str, Any], pad: int) -> bytes:
    # json.dumps writes NaN/Infinity and \\udXXX escapes: hostile JSON, exactly as a producer would
    text = json.dumps(body)
    if pad:
        text = text[:-1] + ', "pad": "' + "p" * pad + '"}'
    return text.encode()


messages = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.tuples(bodies, st.sampled_from([0, 0, 0, MAX_BYTES - 200, MAX_BYTES + 10])).map(
        lambda bp: encode(*bp)
    ),
    st.builds(lambda n: json.dumps({"input": {"n": n}}).encode(), st.integers(0, 1000)),
)


# --- one pool process for the module ------------------------------------------------------------
@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Iterator[dict[str, str]]:
    stream = unique("hyp")
    queue = unique("hyp")
    overrides = {
        **redis_overrides(stream, **{"queues.redis.max_message_bytes": MAX_BYTES}),
        **amqp_overrides(queue, **{"queues.amqp.max_message_bytes": MAX_BYTES}),
    }
    log = str(tmp_path_factory.mktemp("hyp") / "pool.log")
    proc = spawn_pool_process(overrides, log)
    r = redis.Redis.from_url(REDIS_URL)
    try:

        def consuming() -> bool:
            assert proc.poll() is None, open(log).read()[-3000:]
            return bool(r.exists(stream)) and _amqp_declared(queue)

        wait_until_sync(consuming, timeout_s=60, what="the pool to start consuming")
        yield {"stream": stream, "queue": queue, "log": log}
    finally:
        stop_process(proc)
        keys = list(r.scan_iter(match=f"{stream}*"))
        if keys:
            r.delete(*keys)
        r.close()
        asyncio.run(delete_amqp_names(queue, ("", ".dead", ".replies"), (".dlx", ".cancel")))


def _amqp_declared(queue: str) -> bool:
    async def check() -> bool:
        connection = await aio_pika.connect(AMQP_URL)
        try:
            channel = await connection.channel()
            await channel.declare_queue(queue, passive=True)
            return True
        except aio_pika.exceptions.ChannelClosed:
            return False
        finally:
            await connection.close()

    return asyncio.run(check())


HYPOTHESIS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # CI runs the same messages every time
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# --- Redis --------------------------------------------------------------------------------------
class RedisSide:
    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.r = redis.Redis.from_url(REDIS_URL)
        self.sent = 0

    def settled(self) -> int:
        results = self.r.xlen(f"{self.stream}:results")
        return int(results) + int(self.r.xlen(names.dead_stream_name(self.stream)))


@pytest.fixture(scope="module")
def redis_side(pool) -> Iterator[RedisSide]:
    side = RedisSide(pool["stream"])
    yield side
    side.r.close()


@HYPOTHESIS
@given(message=messages)
def test_every_redis_message_ends_as_one_result_or_one_dead_letter(redis_side, message):
    side = redis_side
    entry_id = side.r.xadd(side.stream, {"value": message}).decode()
    side.sent += 1
    # Intake goes on: this one settles, within a deadline.
    wait_until_sync(
        lambda: side.settled() >= side.sent,
        timeout_s=SETTLE_S,
        what=f"entry {entry_id} to settle: {message!r}",
    )
    assert side.settled() == side.sent  # one settle, not two
    dead = side.r.xrevrange(names.dead_stream_name(side.stream), count=1)
    if dead and dead[0][1][b"original_id"].decode() == entry_id:
        assert dead[0][1][b"reason"], "a dead letter without a reason"


def test_redis_nothing_stays_pending(redis_side):
    # Runs after the generated messages (file order): every entry was acked.
    (group,) = redis_side.r.xinfo_groups(redis_side.stream)
    assert group["pending"] == 0 and group["lag"] == 0
    assert redis_side.sent >= EXAMPLES


# --- AMQP ---------------------------------------------------------------------------------------
class AmqpSide:
    """A private event loop with one connection, driven from the synchronous test."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.loop = asyncio.new_event_loop()
        self.replies = 0
        self.dead: list[str] = []
        self.sent = 0
        self.loop.run_until_complete(self._connect())

    async def _connect(self) -> None:
        self.connection = await aio_pika.connect(AMQP_URL)
        self.channel = await self.connection.channel()
        replies = await self.channel.declare_queue(f"{self.queue}.replies", durable=True)
        await replies.consume(self._reply, no_ack=True)
        dead = await self.channel.declare_queue(f"{self.queue}.dead", durable=True)
        await dead.consume(self._dead, no_ack=True)

    async def _reply(self, message: Any) -> None:
        self.replies += 1

    async def _dead(self, message: Any) -> None:
        self.dead.append(str((message.headers or {}).get(names.AMQP_DEAD_REASON_HEADER) or ""))

    def settled(self) -> int:
        return self.replies + len(self.dead)

    def send_and_settle(self, body: bytes) -> None:
        self.loop.run_until_complete(self._send_and_settle(body))

    async def _send_and_settle(self, body: bytes) -> None:
        await self.channel.default_exchange.publish(
            aio_pika.Message(body, reply_to=f"{self.queue}.replies"), routing_key=self.queue
        )
        self.sent += 1
        await wait_until(
            lambda: self.settled() >= self.sent,
            timeout_s=SETTLE_S,
            what=f"the message to settle: {body!r}",
        )

    def close(self) -> None:
        self.loop.run_until_complete(self.connection.close())
        self.loop.close()


@pytest.fixture(scope="module")
def amqp_side(pool) -> Iterator[AmqpSide]:
    side = AmqpSide(pool["queue"])
    yield side
    side.close()


@HYPOTHESIS
@given(message=messages)
def test_every_amqp_message_ends_as_one_result_or_one_dead_letter(amqp_side, message):
    amqp_side.send_and_settle(message)
    assert amqp_side.settled() == amqp_side.sent
    assert all(amqp_side.dead), "a dead letter without a reason"


def test_amqp_nothing_stays_unacked(amqp_side, pool):
    async def depth() -> tuple[int, int]:
        channel = await amqp_side.connection.channel()
        declared = await channel.declare_queue(amqp_side.queue, passive=True)
        await channel.close()
        return int(declared.declaration_result.message_count or 0), int(
            declared.declaration_result.consumer_count or 0
        )

    ready, consumers = amqp_side.loop.run_until_complete(depth())
    assert ready == 0 and consumers == 1
    assert amqp_side.sent >= EXAMPLES
    assert "amqp_job_crashed" not in open(pool["log"]).read()
    assert "redis_job_crashed" not in open(pool["log"]).read()
