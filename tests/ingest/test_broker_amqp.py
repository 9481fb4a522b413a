"""AMQP end to end: real RabbitMQ, real PoolManager, real coglet runners."""

from __future__ import annotations

import base64
import json
import os
import random
import signal

import aio_pika
import pytest
from ingest_helpers import wait_until
from ingest_pool import (
    AMQP_URL,
    BIGFILE_MODEL,
    REDIS_URL,
    AmqpClient,
    amqp_overrides,
    close_connections_named,
    count_runs,
    pool_config,
    queue_depth,
    running_pool,
    spawn_pool_process,
    stop_process,
    unique,
)

from ingest import names
from pool.prediction import PredictionRequest

pytestmark = pytest.mark.broker


def nested_body(levels: int) -> bytes:
    return ('{"input": {"n": ' + "[" * levels + "]" * levels + "}}").encode()


@pytest.fixture
async def broker():
    b = AmqpClient(unique("amqp"))
    await b.connect()
    yield b
    await b.cleanup()


# The hot path (consume, publish, ack, dead letters) runs on the lean connection for a plain
# amqp:// URL and on aiormq for any other (amqps://, or options in the query, as here).
HOT_PATHS = pytest.mark.parametrize(
    "url", [AMQP_URL, f"{AMQP_URL}?heartbeat=60"], ids=["lean", "aiormq"]
)


@HOT_PATHS
async def test_200_predictions_two_runners_one_reply_each(broker, tmp_path, url):
    overrides = amqp_overrides(broker.queue, **{"queues.amqp.url": url})
    config = pool_config(str(tmp_path / "state"), overrides)
    async with running_pool(config) as (_, consumers):
        for n in range(200):
            await broker.publish({"id": f"p-{n}", "input": {"n": n}}, correlation_id=str(n))
        results = await broker.until_results(200)
        assert consumers.health()["amqp"]["state"] == "connected"
    assert sorted(results) == sorted(f"p-{n}" for n in range(200))
    by_correlation = {m.correlation_id: json.loads(m.body) for m in broker.replies}
    for n in range(200):
        (result,) = results[f"p-{n}"]
        assert result["status"] == "succeeded" and result["output"] == f"echo {n}"
        assert by_correlation[str(n)]["id"] == f"p-{n}"
    assert await queue_depth(broker.queue) == 0


async def test_a_large_file_output_is_replied_whole(broker, tmp_path):
    overrides = amqp_overrides(broker.queue, **{"model.path": BIGFILE_MODEL})
    config = pool_config(str(tmp_path / "state"), overrides, runners=1)
    # Steps: a message whose prediction returns a 3 MiB file (kept on disk by its record).
    async with running_pool(config):
        inputs = {"size_kb": 3072, "seed": 8, "path": str(tmp_path / "out.bin")}
        await broker.publish({"id": "f", "input": inputs}, correlation_id="f")
        results = await broker.until_results(1)
    # Result: the reply carries the whole file as its data: URI, byte for byte.
    (result,) = results["f"]
    assert result["status"] == "succeeded", result["error"]
    data = random.Random(8).randbytes(3072 << 10)
    assert base64.b64decode(result["output"].partition(",")[2]) == data


@HOT_PATHS
async def test_poison_and_a_dying_model_are_dead_lettered(broker, tmp_path, url):
    overrides = amqp_overrides(
        broker.queue,
        **{
            "queues.amqp.url": url,
            "queues.amqp.max_message_bytes": 10_000,
            "queues.amqp.max_deliveries": 2,
        },
    )
    config = pool_config(str(tmp_path / "state"), overrides)
    async with running_pool(config):
        await broker.watch_dead()
        cases = {
            "c-json": (b"{not json", names.REASON_INVALID_JSON),
            "c-list": (b"[1, 2]", "must be a JSON object"),
            "c-noinput": ({"id": "x"}, "missing required field 'input'"),
            "c-huge": ({"input": {"payload": "x" * 20_000}}, names.REASON_TOO_LARGE),
            "c-invalid": ({"input": {"n": "seven"}}, names.REASON_INVALID_REQUEST),
            # Hostile nesting: the decoder's RecursionError must not crash the consumer.
            "c-deep": (nested_body(3_000), "nested deeper than 64 levels"),
            "c-deep-100": (nested_body(100), "nested deeper than 64 levels"),
            "c-dies": ({"id": "dies", "input": {"exit_now": True}}, names.REASON_MAX_DELIVERIES),
        }
        for correlation_id, (body, _) in cases.items():
            await broker.publish(body, correlation_id=correlation_id)
        await broker.publish({"id": "fine", "input": {"n": 5}}, correlation_id="fine")
        await wait_until(lambda: len(broker.dead) >= len(cases), timeout_s=60, what="dead")
        results = await broker.until_results(1)
    reasons = {m.correlation_id: m.headers[names.AMQP_DEAD_REASON_HEADER] for m in broker.dead}
    assert set(reasons) == set(cases)
    for correlation_id, (_, reason) in cases.items():
        assert reason in reasons[correlation_id], reasons[correlation_id]
    assert "died" in reasons["c-dies"]
    assert next(m.body for m in broker.dead if m.correlation_id == "c-json") == b"{not json"
    assert list(results) == ["fine"] and results["fine"][0]["output"] == "echo 5"


async def test_cancel_broadcast_reaches_the_pool_running_it(broker, tmp_path):
    overrides = amqp_overrides(broker.queue)
    async with running_pool(pool_config(str(tmp_path / "a"), overrides, runners=1)) as (a, _):
        await broker.publish({"id": "long", "input": {"sleep_s": 60}})
        await wait_until(lambda: a.get("long") is not None, what="pool A runs it")
        config_b = pool_config(str(tmp_path / "b"), overrides, runners=1)
        async with running_pool(config_b) as (b, _):
            assert await b.cancel("long") is False  # not here: broadcast
            results = await broker.until_results(1, timeout_s=30)
    assert results["long"][0]["status"] == "canceled"


async def test_graceful_shutdown_requeues_unstarted_and_acks_finished(broker, tmp_path):
    config = pool_config(str(tmp_path / "state"), amqp_overrides(broker.queue))
    async with running_pool(config) as (manager, consumers):
        # An HTTP prediction takes one of the two slots for a while.
        http = await manager.submit(
            PredictionRequest(id="http", input={"sleep_s": 3.0}), source="http"
        )
        await broker.publish({"id": "q-run", "input": {"sleep_s": 1.0}})
        for n in range(3):
            await broker.publish({"id": f"q-{n}", "input": {"n": n}})
        # Default prefetch 4 (twice the 2 slots): one message runs in the free slot, the
        # other three are held unstarted.
        await wait_until(
            lambda: consumers.health()["amqp"]["held"] == 3, what="three messages held"
        )
        assert consumers.health()["amqp"]["prefetch"] == 4
        assert manager.get("q-run") is not None
        await consumers.stop(grace_s=10)
        results = await broker.until_results(1)
        assert list(results) == ["q-run"]
        assert await queue_depth(broker.queue) == 3  # the three held ones handed back
        await http.wait(30)


async def test_prefetch_setting_holds_that_many_unacked(broker, tmp_path):
    # Steps: one runner, queues.amqp.prefetch 3, five long predictions queued.
    overrides = amqp_overrides(broker.queue, **{"queues.amqp.prefetch": 3})
    config = pool_config(str(tmp_path / "state"), overrides, runners=1)
    async with running_pool(config) as (manager, consumers):
        for n in range(5):
            await broker.publish({"id": f"p-{n}", "input": {"n": n, "sleep_s": 30}})
        # Result: one runs, two wait here unstarted, two stay in the queue for other pools.
        await wait_until(lambda: consumers.health()["amqp"]["held"] == 2, what="two held")
        assert manager.get("p-0") is not None and manager.get("p-1") is None
        assert await queue_depth(broker.queue) == 2
        await consumers.stop(grace_s=0)


async def test_connection_loss_reconnects_nothing_lost_or_run_twice(broker, tmp_path):
    runs_file = str(tmp_path / "runs.txt")
    config = pool_config(str(tmp_path / "state"), amqp_overrides(broker.queue))
    total = 12
    async with running_pool(config) as (_, consumers):
        for n in range(total):
            body = {"id": f"c-{n}", "input": {"n": n, "sleep_s": 0.3, "runs_file": runs_file}}
            await broker.publish(body)
        await broker.until_results(2)
        # Only this pool's connections (by their connection_name): the broker is shared.
        # Two: declarations and the cancel broadcast, and the hot path (ingest/amqp_wire).
        assert await close_connections_named(broker.queue) == 2
        await wait_until(lambda: consumers.health()["amqp"]["reconnects"] == 1, what="loss seen")
        await wait_until(
            lambda: consumers.health()["amqp"]["state"] == "connected", what="reconnected"
        )
        await broker.until_results(total)
    await wait_until(lambda: len(count_runs(runs_file)) == total, what="runs counted")
    assert count_runs(runs_file) == {n: 1 for n in range(total)}
    per_id = broker.results()
    assert all(len(v) == 1 for v in per_id.values()), per_id
    assert set(per_id) == {f"c-{n}" for n in range(total)}


async def test_channel_closed_by_the_broker_reconnects_and_consumes_again(broker, tmp_path):
    exchange = f"{broker.queue}.results"
    overrides = amqp_overrides(broker.queue, **{"queues.amqp.results_exchange": exchange})
    config = pool_config(str(tmp_path / "state"), overrides)
    async with running_pool(config) as (_, consumers):
        await broker.publish({"id": "before", "input": {"n": 0}})
        await broker.until_results(1)
        # The next result published to a deleted exchange makes the broker close the
        # consumer's CHANNEL (404 NOT_FOUND) while its connection stays up.
        assert broker.channel is not None
        await broker.channel.exchange_delete(exchange)
        for n in range(1, 5):
            await broker.publish({"id": f"after-{n}", "input": {"n": n}})
        await wait_until(
            lambda: consumers.health()["amqp"]["reconnects"] >= 1, what="channel loss seen"
        )
        await wait_until(
            lambda: consumers.health()["amqp"]["state"] == "connected", what="reconnected"
        )
        results = await broker.until_results(5)
    assert set(results) == {"before", *(f"after-{n}" for n in range(1, 5))}
    assert all(r["status"] == "succeeded" for v in results.values() for r in v)
    assert results["after-4"][0]["output"] == "echo 4"


async def _declared(queue: str) -> bool:
    try:
        await queue_depth(queue)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return False
    return True


async def test_two_pool_processes_share_work_and_kill_9_loses_nothing(broker, tmp_path):
    overrides = amqp_overrides(broker.queue, **{"queues.amqp.result_store_redis_url": REDIS_URL})
    total = 60
    procs = [spawn_pool_process(overrides, str(tmp_path / f"pool-{i}.log")) for i in range(2)]
    try:
        await wait_until(lambda: _declared(broker.queue), timeout_s=60, what="queue declared")
        for n in range(total):
            body = {"id": f"k-{n}-{broker.queue}", "input": {"n": n, "sleep_s": 0.1}}
            await broker.publish(body)
        await wait_until(lambda: len(broker.results()) >= 10, timeout_s=60, what="progress")
        os.killpg(procs[0].pid, signal.SIGKILL)
        procs[0].wait(10)
        results = await broker.until_results(total, timeout_s=90)
    finally:
        for proc in procs:
            stop_process(proc)
    assert len(results) == total
    assert all(r["status"] == "succeeded" for v in results.values() for r in v)
    # A pool killed between its confirmed reply and its ack has its message redelivered; the
    # survivor finds the recorded result and replies again (at most its 2 slots' worth).
    assert sum(len(v) - 1 for v in results.values()) <= 2
    logs = [(tmp_path / f"pool-{i}.log").read_text() for i in range(2)]
    assert all("amqp_prediction_completed" in log for log in logs)  # both did work
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    try:
        for pid in results:
            assert await client.exists(names.result_key(broker.queue, pid))
        for pid in results:
            await client.delete(names.result_key(broker.queue, pid))
    finally:
        await client.aclose()


async def test_a_webhook_the_network_policy_refuses_is_dead_lettered_with_why(broker, tmp_path):
    config = pool_config(str(tmp_path / "state"), amqp_overrides(broker.queue))
    async with running_pool(config):
        await broker.watch_dead()
        # Steps: messages whose webhook is a loopback address, or a host that does not
        # resolve; then a plain one.
        cases = {
            "h-loop": (
                "http://127.0.0.1:9/hook?token=SECRET",
                "webhook: http://127.0.0.1:9/hook is refused by the network policy: "
                "127.0.0.1 is a loopback address",
            ),
            "h-nx": (
                "http://no-such-host.invalid/hook",
                "webhook: http://no-such-host.invalid/hook: its host no-such-host.invalid "
                "did not resolve",
            ),
        }
        for correlation_id, (hook, _) in cases.items():
            body = {"id": correlation_id, "input": {"n": 1}, "webhook": hook}
            await broker.publish(body, correlation_id=correlation_id)
        await broker.publish({"id": "fine", "input": {"n": 5}}, correlation_id="fine")
        await wait_until(lambda: len(broker.dead) >= len(cases), timeout_s=60, what="dead")
        results = await broker.until_results(1)
    # Result: each is dead-lettered once, as invalid input is, with the field, URL and why;
    # the plain message got its reply.
    reasons = {m.correlation_id: m.headers[names.AMQP_DEAD_REASON_HEADER] for m in broker.dead}
    assert sorted(m.correlation_id for m in broker.dead) == sorted(cases)
    for correlation_id, (_, why) in cases.items():
        assert reasons[correlation_id].startswith(f"{names.REASON_INVALID_REQUEST}: {why}")
        assert "SECRET" not in reasons[correlation_id]
    assert list(results) == ["fine"] and results["fine"][0]["output"] == "echo 5"
    assert await queue_depth(broker.queue) == 0
