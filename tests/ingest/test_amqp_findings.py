"""Regression tests of issue 8 on the real RabbitMQ: an AmqpConsumer on a real broker, fed to
a stand-in manager (no runners: the runner is not what these test).

Each test is named after the behaviour the finding asked for; each failed before its fix.
"""

from __future__ import annotations

import asyncio
import functools
import json

import aio_pika
import pytest
import redis.asyncio as aioredis
from ingest_fakes import FakeManager
from ingest_helpers import redis_up, wait_until
from ingest_pool import AMQP_URL, AmqpClient, queue_depth, unique
from pamqp.body import ContentBody

from ingest import amqp as amqp_module
from ingest import names
from ingest.amqp import AmqpConsumer
from ingest.core import Delivery
from ingest.prefetch import PrefetchTuner
from ingest.results import MemoryResultStore, RedisResultStore, ResultStore
from pool.config import AmqpConfig

pytestmark = pytest.mark.broker


@pytest.fixture
async def client():
    c = AmqpClient(unique("amqp-fix"))
    await c.connect()
    await c.watch_dead()
    yield c
    await c.cleanup()


def config_for(queue: str, **extra: object) -> AmqpConfig:
    return AmqpConfig(
        url=AMQP_URL,
        queue=queue,
        dead_letter_exchange=f"{queue}.dlx",
        dead_letter_queue=f"{queue}.dead",
        cancel_exchange=f"{queue}.cancel",
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture
async def start():
    consumers: list[AmqpConsumer] = []

    async def start_one(
        queue: str, manager: FakeManager, store: ResultStore | None = None
    ) -> AmqpConsumer:
        consumer = AmqpConsumer(
            config_for(queue), manager, store=store or MemoryResultStore(ttl_s=60)
        )
        consumers.append(consumer)
        await consumer.start()
        await wait_until(lambda: consumer.state == "connected", what="consumer connected")
        return consumer

    yield start_one
    for consumer in consumers:
        if consumer.state != "stopped":
            await consumer.stop(grace_s=1)


# --- finding 3 --------------------------------------------------------------------------------
async def test_a_reply_to_queue_that_does_not_exist_is_dead_lettered_not_lost(client, start):
    consumer = await start(client.queue, FakeManager(slots=2))
    nowhere = f"{client.queue}.no-such-queue"
    await client.publish({"id": "lost", "input": {}}, reply_to=nowhere)
    await client.publish({"id": "fine", "input": {}})
    await wait_until(lambda: client.dead and "fine" in client.results(), what="both settled")
    (reason,) = client.dead_reasons()
    assert reason.startswith(names.REASON_UNROUTABLE) and nowhere in reason
    health = consumer.health()
    assert health["unroutable"] == 1 and health["completed"] == 1
    assert list(client.results()) == ["fine"]
    assert await queue_depth(client.queue) == 0


# --- finding 4 --------------------------------------------------------------------------------
async def test_a_confirmed_result_is_not_published_again_when_the_ack_was_lost(
    client, start, monkeypatch
):
    manager = FakeManager(slots=2)
    consumer = await start(client.queue, manager)
    original_ack = consumer._ack
    lost: list[str] = []

    async def ack_lost_with_the_connection(delivery: Delivery) -> None:
        if delivery.meta.message.message_id == "dup" and not lost:
            lost.append("dup")  # the result is confirmed; now the connection dies
            assert consumer._connection is not None
            await consumer._connection.close()
        return await original_ack(delivery)

    monkeypatch.setattr(consumer, "_ack", ack_lost_with_the_connection)
    await client.publish({"id": "dup", "input": {}}, message_id="dup")
    await wait_until(lambda: consumer.health()["deduplicated"] == 1, what="redelivery acked")
    await client.publish({"id": "after", "input": {}}, message_id="after")
    results = await wait_until(
        lambda: "after" in (r := client.results()) and r, what="a later result"
    )
    assert len(results["dup"]) == 1
    (reply,) = [m for m in client.replies if m.message_id == "dup"]
    assert reply.message_id == "dup"  # the prediction id: consumers can deduplicate by it
    assert manager.submitted.count("dup") == 1
    assert consumer.health()["reconnects"] == 1
    assert await queue_depth(client.queue) == 0


# --- finding 7 --------------------------------------------------------------------------------
async def test_a_result_store_outage_is_retried_not_dead_lettered(client, start, private_redis):
    url, start_redis, stop_redis = private_redis
    store_client = aioredis.from_url(url, decode_responses=True)
    await wait_until(lambda: redis_up(url), what="private redis up")
    store = RedisResultStore(store_client, prefix=client.queue, ttl_s=60)
    manager = FakeManager(slots=2)
    consumer = await start(client.queue, manager, store)
    stop_redis()
    await client.publish({"id": "during-outage", "input": {}}, message_id="during-outage")
    await wait_until(lambda: consumer.health()["store_errors"] >= 2, what="store errors seen")
    start_redis()
    results = await wait_until(
        lambda: "during-outage" in (r := client.results()) and r,
        timeout_s=30,
        what="the result once the store is back",
    )
    assert len(results["during-outage"]) == 1
    assert client.dead == [] and consumer.health()["dead_lettered"] == 0
    assert manager.submitted == ["during-outage"]


# --- finding 9 and issue 7a -------------------------------------------------------------------
async def test_non_finite_numbers_and_lone_surrogates_are_dead_lettered(client, start):
    manager = FakeManager(slots=2)
    await start(client.queue, manager)
    for raw in (
        b'{"id": "nan", "input": {"x": NaN}}',
        b'{"id": "inf", "input": {"x": 1e999}}',
        b'{"id": "sur", "input": {"t": "\\ud800"}}',
        b'{"input": {}, "x": "\xff\xfe"}',
    ):
        await client.publish(raw)
    await client.publish({"id": "fine", "input": {}})
    await wait_until(
        lambda: len(client.dead) == 4 and "fine" in client.results(), what="all settled"
    )
    reasons = sorted(client.dead_reasons())
    assert sum("nan is not finite" in r for r in reasons) == 1
    assert sum("inf is not finite" in r for r in reasons) == 1
    assert sum("surrogate" in r for r in reasons) == 1
    assert sum("not UTF-8" in r for r in reasons) == 1
    assert manager.submitted == ["fine"]


async def test_hostile_message_properties_settle_once_each(client, start):
    # The driver reads deliveries from aiormq's frames itself (ingest.amqp._Incoming): a
    # message id that looks like a path, a delivery count that is not a number or is huge,
    # odd header values. Each settles exactly once; no prediction id leaves the id alphabet.
    manager = FakeManager(slots=2)
    consumer = await start(client.queue, manager)
    assert client.channel is not None

    async def send(body: dict, **properties: object) -> None:
        assert client.channel is not None
        await client.channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps(body).encode(), reply_to=f"{client.queue}.replies", **properties
            ),
            routing_key=client.queue,
        )

    await send({"input": {"n": 1}}, message_id="../../etc/passwd")
    await send({"input": {"n": 2}}, correlation_id="/dev/shm/x\x00y")
    await send({"id": "count-text", "input": {}}, headers={"x-delivery-count": "7"})
    await send({"id": "count-huge", "input": {}}, headers={"x-delivery-count": 2**62})
    await send({"id": "odd-headers", "input": {}}, headers={"a": {"b": [1, 2.5, None]}})
    await wait_until(lambda: len(client.results()) + len(client.dead) == 5, what="all five settled")
    assert all(len(v) == 1 for v in client.results().values())
    assert all(names.safe_id(pid) == pid and "/" not in pid for pid in manager.submitted)
    assert "etc_passwd" in manager.submitted
    # A delivery count the broker never sends (2**62) is taken at its word: too many.
    assert any(names.REASON_MAX_DELIVERIES in r for r in client.dead_reasons())
    assert consumer.state == "connected" and await queue_depth(client.queue) == 0


# --- throughput: the default prefetch follows the settle times --------------------------------
class SlowManager(FakeManager):
    """Each prediction takes ``run_s`` (a model of a few tens of milliseconds)."""

    def __init__(self, *, run_s: float, slots: int = 2) -> None:
        super().__init__(slots=slots, auto_finish=False)
        self.run_s = run_s

    async def submit(self, request, *, source: str = "http"):
        prediction = await super().submit(request, source=source)
        asyncio.get_running_loop().call_later(self.run_s, self.finish, prediction.id)
        return prediction


@pytest.fixture
def quick_tuner(monkeypatch):
    """The tuner with a short memory, so a test sees it act within a few dozen messages."""
    monkeypatch.setattr(
        amqp_module, "PrefetchTuner", functools.partial(PrefetchTuner, min_samples=5, interval_s=0)
    )


async def test_instant_predictions_widen_the_window_and_every_message_runs_once(
    client, start, quick_tuner
):
    # Steps: 2 slots, predictions that finish at once, 300 messages. The result's confirm
    # and ack then take longer than a prediction: the pool widens its prefetch (consuming
    # anew) and no message is lost or run twice across the change.
    manager = FakeManager(slots=2)
    consumer = await start(client.queue, manager)
    assert consumer.health()["prefetch"] == 4
    ids = [f"m-{n}" for n in range(300)]
    for pid in ids:
        await client.publish({"id": pid, "input": {}})
    results = await wait_until(
        lambda: len(r := client.results()) == len(ids) and r, what="every result"
    )
    assert all(len(results[pid]) == 1 for pid in ids)
    assert sorted(manager.submitted) == sorted(ids)
    assert 4 < consumer.health()["prefetch"] <= 8  # at most prefetch_max_per_slot per slot
    assert await queue_depth(client.queue) == 0


async def test_longer_predictions_keep_one_waiting_message_per_slot(client, start, quick_tuner):
    # Steps: 2 slots, 30 ms predictions, 40 messages: a result settles well within one
    # prediction, so the window stays at two per slot (one runs, one waits).
    manager = SlowManager(run_s=0.03, slots=2)
    consumer = await start(client.queue, manager)
    ids = [f"s-{n}" for n in range(40)]
    for pid in ids:
        await client.publish({"id": pid, "input": {}})
    await wait_until(lambda: len(client.results()) == len(ids), what="every result")
    assert consumer.health()["prefetch"] == 4
    assert consumer._tuner is not None and consumer._tuner.run_s is not None
    assert consumer._tuner.run_s >= 0.03


async def test_a_prefetch_setting_is_never_tuned(client, start, quick_tuner):
    manager = FakeManager(slots=2)
    consumer = AmqpConsumer(
        config_for(client.queue, prefetch=3), manager, store=MemoryResultStore(ttl_s=60)
    )
    await consumer.start()
    try:
        await wait_until(lambda: consumer.state == "connected", what="consumer connected")
        for n in range(60):
            await client.publish({"id": f"f-{n}", "input": {}})
        await wait_until(lambda: len(client.results()) == 60, what="every result")
        assert consumer.health()["prefetch"] == 3
    finally:
        await consumer.stop(grace_s=1)


# --- hostile properties (lean hot path) --------------------------------------------------------
async def test_a_message_whose_properties_are_not_utf8_is_dead_lettered_and_intake_goes_on(
    client, start
):
    from pamqp import commands
    from pamqp import frame as pframe
    from pamqp.header import ContentHeader

    from ingest.amqp_wire import AmqpWire

    consumer = await start(client.queue, FakeManager(slots=2))
    # A producer that writes raw frames: a message_id that is not UTF-8 (aio-pika cannot).
    body = json.dumps({"id": "bad-props", "input": {}}).encode()
    properties = commands.Basic.Properties(message_id="PLACEHOLDER")
    frames = pframe.marshal(commands.Basic.Publish(routing_key=client.queue), 1)
    frames += pframe.marshal(ContentHeader(0, len(body), properties), 1)
    frames += pframe.marshal(ContentBody(body), 1)
    frames = frames.replace(b"\x0bPLACEHOLDER", b"\x0b\xff\xfe" + b"x" * 9)
    raw = await AmqpWire.connect(AMQP_URL, connection_name=f"{client.queue} raw producer")
    try:
        raw._send(frames)
        await client.publish({"id": "fine", "input": {}})
        await wait_until(lambda: client.dead and "fine" in client.results(), what="both settled")
    finally:
        await raw.close()
    (reason,) = client.dead_reasons()
    assert reason.startswith(names.REASON_INVALID_PROPERTIES) and "utf-8" in reason.lower()
    assert client.dead[0].body == body  # the message itself is kept in the dead letter
    assert consumer.health()["state"] == "connected" and consumer.health()["reconnects"] == 0
    assert await queue_depth(client.queue) == 0
