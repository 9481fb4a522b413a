"""AmqpConsumer bookkeeping against the real RabbitMQ and a stand-in manager (no runners)."""

from __future__ import annotations

import asyncio
import json

import aio_pika
import pytest
from ingest_fakes import BlockingSubmitManager
from ingest_helpers import wait_until
from ingest_pool import AMQP_URL, delete_amqp_names, queue_depth, unique

from ingest.amqp import AmqpConsumer
from ingest.results import MemoryResultStore
from pool.config import AmqpConfig

pytestmark = pytest.mark.broker


@pytest.fixture
async def amqp_config():
    queue = unique("amqp-unit")
    yield AmqpConfig(
        url=AMQP_URL,
        queue=queue,
        dead_letter_exchange=f"{queue}.dlx",
        dead_letter_queue=f"{queue}.dead",
        cancel_exchange=f"{queue}.cancel",
    )
    await delete_amqp_names(queue)


async def publish(queue: str, body: dict) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        message = aio_pika.Message(json.dumps(body).encode(), message_id=body.get("id"))
        await channel.default_exchange.publish(message, routing_key=queue)
    finally:
        await connection.close()


async def test_shutdown_during_submit_cancels_the_prediction_it_handed_back(amqp_config):
    manager = BlockingSubmitManager(slots=2, auto_finish=False)
    consumer = AmqpConsumer(amqp_config, manager, store=MemoryResultStore(ttl_s=60))
    await consumer.start()
    try:
        await wait_until(lambda: consumer.state == "connected", what="consumer connected")
        await publish(amqp_config.queue, {"id": "slow", "input": {}})
        await asyncio.wait_for(manager.entered.wait(), 20)
        # Shutdown nacks the message back while the manager is still inside submit()...
        stopping = asyncio.create_task(consumer.stop(grace_s=20))
        await wait_until(lambda: consumer.health()["returned"] == 1, what="message handed back")
        manager.release.set()  # ...then submit() returns a prediction nobody would own
        await asyncio.wait_for(stopping, 30)
    finally:
        manager.release.set()
        if consumer.state != "stopped":
            await consumer.stop(grace_s=0)
    assert manager.canceled == ["slow"] and manager.predictions["slow"].status == "canceled"
    assert await queue_depth(amqp_config.queue) == 1  # back in the queue for another pool
