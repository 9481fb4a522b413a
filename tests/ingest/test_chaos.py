"""Chaos per broker: two pool processes, 500 messages, ``kill -9`` of one pool mid-work, then
a broker connection drop under the other; every id must come out, nothing stays pending.

- Redis: a private ``redis-server --appendonly yes`` restarted under the surviving pool. The
  publish script makes results exactly once: every id exactly once in the results stream.
- RabbitMQ: the surviving pool's own connections are closed by the broker (``rabbitmqctl
  close_connection``, found by the pool's ``connection_name``). Results carry the prediction
  id as ``message_id``; a result whose confirm was lost with the connection (or whose confirm
  was not yet recorded when its pool was killed) can be published again by the redelivery:
  that is the documented duplicate window, so the test deduplicates by ``message_id`` as a
  consumer would, and bounds the raw duplicates by what was in flight at the two events.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import aio_pika
import pytest
import redis.asyncio as aioredis
from ingest_helpers import redis_up, wait_until
from ingest_pool import (
    AMQP_URL,
    REDIS_URL,
    amqp_overrides,
    close_connections_named,
    delete_amqp_names,
    queue_depth,
    redis_overrides,
    spawn_pool_process,
    stop_process,
    unique,
)
from redis.exceptions import RedisError

pytestmark = pytest.mark.broker

TOTAL = 500
SLEEP_S = 0.02  # per prediction: 500 take ~3 s of runner time on each of the 4 runners


def _kill_9(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the pool and its runners, mid-work
    proc.wait(10)


async def test_redis_chaos_kill_9_and_a_redis_restart_every_id_exactly_once(
    private_redis, tmp_path
):
    url, start_redis, stop_redis = private_redis
    await wait_until(lambda: redis_up(url), what="private redis up")
    stream = unique("chaos")
    overrides = {
        **redis_overrides(stream, **{"queues.redis.claim_idle_s": 1.0}),
        "queues.redis.url": url,
    }
    client = aioredis.from_url(url, decode_responses=True)

    async def ids_done() -> dict[str, int] | None:
        try:
            entries = await client.xrange(f"{stream}:results")
        except RedisError:  # restarting under this client
            return None
        counts: dict[str, int] = {}
        for _, fields in entries:
            counts[fields["id"]] = counts.get(fields["id"], 0) + 1
        return counts

    async def at_least(n: int) -> dict[str, int] | None:
        got = await ids_done()
        return got if got is not None and len(got) >= n else None

    async with client.pipeline(transaction=False) as pipe:
        for n in range(TOTAL):
            body = {"id": f"c-{n}", "input": {"n": n, "sleep_s": SLEEP_S}}
            pipe.xadd(stream, {"value": json.dumps(body)})
        await pipe.execute()
    procs = [spawn_pool_process(overrides, str(tmp_path / f"pool-{i}.log")) for i in range(2)]
    try:
        await wait_until(lambda: at_least(60), timeout_s=60, what="both pools working")
        _kill_9(procs[0])
        await wait_until(lambda: at_least(200), timeout_s=60, what="the survivor working")
        stop_redis()
        start_redis()
        await wait_until(lambda: redis_up(url), what="redis back")
        counts = await wait_until(lambda: at_least(TOTAL), timeout_s=90, what="every id")
        groups = await client.xinfo_groups(stream)
    finally:
        for proc in procs:
            stop_process(proc)
        await client.aclose()
    assert set(counts) == {f"c-{n}" for n in range(TOTAL)}
    assert {k: v for k, v in counts.items() if v != 1} == {}  # exactly once each
    assert groups[0]["pending"] == 0 and groups[0]["lag"] == 0


async def test_amqp_chaos_kill_9_and_closed_connections_every_id_out(tmp_path):
    queue = unique("chaos")
    overrides = amqp_overrides(queue, **{"queues.amqp.result_store_redis_url": REDIS_URL})
    connection = await aio_pika.connect(AMQP_URL)
    replies: list[aio_pika.abc.AbstractIncomingMessage] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        channel = await connection.channel()
        reply_queue = await channel.declare_queue(f"{queue}.replies", durable=True)

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            replies.append(message)

        await reply_queue.consume(on_reply, no_ack=True)
        dead = await channel.declare_queue(f"{queue}.dead", durable=True)
        # The pools declare the quorum queue; publish once the first one has.
        procs = [spawn_pool_process(overrides, str(tmp_path / f"pool-{i}.log")) for i in range(2)]
        await wait_until(lambda: _declared(queue), timeout_s=60, what="queue declared")
        for n in range(TOTAL):
            body = json.dumps({"id": f"c-{n}", "input": {"n": n, "sleep_s": SLEEP_S}}).encode()
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    message_id=f"c-{n}",
                    reply_to=reply_queue.name,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=queue,
            )

        def ids() -> set[str]:
            return {str(m.message_id) for m in replies}

        await wait_until(lambda: len(ids()) >= 60, timeout_s=60, what="both pools working")
        _kill_9(procs[0])
        await wait_until(lambda: len(ids()) >= 200, timeout_s=60, what="the survivor working")
        assert await close_connections_named(queue) >= 1
        await wait_until(lambda: len(ids()) >= TOTAL, timeout_s=90, what="every id")
        await wait_until(lambda: _queue_empty(queue), timeout_s=30, what="queue drained")
        dead_count = int((await dead.declare()).message_count or 0)
    finally:
        for proc in procs:
            stop_process(proc)
        await connection.close()
        await delete_amqp_names(queue, ("", ".dead", ".replies"), (".dlx", ".cancel"))
    assert ids() == {f"c-{n}" for n in range(TOTAL)}
    bodies = [json.loads(m.body) for m in replies]
    assert all(
        b["id"] == m.message_id and b["status"] == "succeeded"
        for b, m in zip(bodies, replies, strict=True)
    )
    # Raw duplicates only from the two events: at most the 8 messages a pool holds (2 runners,
    # prefetch 4) at the kill, and again at the connection drop.
    duplicates = len(replies) - TOTAL
    print(f"amqp_chaos duplicates={duplicates}")  # shown with -s; the bound is the assertion
    assert 0 <= duplicates <= 16, duplicates
    assert dead_count == 0


async def _declared(queue: str) -> bool:
    try:
        await queue_depth(queue)
        return True
    except aio_pika.exceptions.ChannelClosed:
        return False


async def _queue_empty(queue: str) -> bool:
    return await queue_depth(queue) == 0
