"""RedisConsumer bookkeeping against fakeredis and a stand-in manager (no runners)."""

from __future__ import annotations

import asyncio
import json
import uuid

import fakeredis
import pytest
from ingest_fakes import BlockingSubmitManager, FakeManager
from ingest_helpers import holds_for, wait_until

from ingest import names
from ingest.redis import RedisConsumer
from pool.config import RedisConfig


@pytest.fixture
async def setup():
    client = fakeredis.FakeAsyncRedis(decode_responses=True)
    stream = f"t-{uuid.uuid4().hex}"
    config = RedisConfig(
        url="redis://unused",
        stream=stream,
        group="g",
        consumer="c1",
        results_stream=f"{stream}:results",
        block_ms=50,
        claim_idle_s=0.3,
        max_deliveries=2,
    )
    manager = FakeManager(slots=2)
    consumer = RedisConsumer(config, manager, client=client)
    yield client, config, manager, consumer
    if consumer.state != "stopped":
        await consumer.stop(grace_s=1)


async def results_of(client, config) -> list[dict]:
    entries = await client.xrange(config.results_stream)
    return [fields for _, fields in entries]


async def test_each_entry_gets_one_result_and_is_acked(setup):
    client, config, _manager, consumer = setup
    for n in range(5):
        await client.xadd(config.stream, {"value": json.dumps({"input": {"n": n}})})
    await consumer.start()
    results = await wait_until(
        lambda: _len_at_least(results_of(client, config), 5), what="5 results"
    )
    assert sorted(json.loads(r["value"])["output"]["n"] for r in results) == list(range(5))
    assert all(r[names.FIELD_EVENT] == "completed" for r in results)
    # ids came from the entry ids; each result is recorded under its id and nothing is pending
    for r in results:
        assert await client.get(names.result_key(config.stream, r["id"])) == r["value"]
    await wait_until(lambda: _pending_is(client, config, 0), what="all acked")
    assert consumer.health()["completed"] == 5


async def _len_at_least(coro, n):
    items = await coro
    return items if len(items) >= n else None


async def _pending_is(client, config, n):
    info = await client.xpending(config.stream, config.group)
    return info["pending"] == n


async def test_recorded_result_is_republished_not_rerun(setup):
    client, config, manager, consumer = setup
    recorded = json.dumps({"id": "p1", "status": "succeeded", "output": "old"})
    await client.set(names.result_key(config.stream, "p1"), recorded)
    reply_to = f"{config.stream}:reply:p1"
    body = {"id": "p1", "input": {}, "reply_to": reply_to}
    await client.xadd(config.stream, {"value": json.dumps(body)})
    await consumer.start()
    results = await wait_until(lambda: _len_at_least(results_of(client, config), 1), what="result")
    assert results[0]["value"] == recorded
    assert manager.submitted == []
    replies = await client.xrange(reply_to)
    assert [f["value"] for _, f in replies] == [recorded]
    await wait_until(lambda: _pending_is(client, config, 0), what="acked")


async def test_poison_goes_to_dead_stream_with_reason_and_consumer_goes_on(setup):
    client, config, _manager, consumer = setup
    await client.xadd(config.stream, {"value": "{nope"})
    await client.xadd(config.stream, {"other": "x"})
    await client.xadd(config.stream, {"value": json.dumps({"input": {"bad": True}})})
    await client.xadd(config.stream, {"value": json.dumps({"input": {"n": 1}})})
    await consumer.start()
    dead_stream = names.dead_stream_name(config.stream)
    dead = await wait_until(lambda: _len_at_least(_xrange(client, dead_stream), 3), what="3 dead")
    reasons = [fields["reason"] for _, fields in dead]
    assert reasons[0].startswith(names.REASON_INVALID_JSON)
    assert reasons[1].startswith(names.REASON_MISSING_VALUE)
    assert reasons[2].startswith(names.REASON_INVALID_REQUEST) and "bad input" in reasons[2]
    assert dead[0][1]["value"] == "{nope" and dead[1][1]["other"] == "x"
    assert all(fields[names.FIELD_ORIGINAL_ID] for _, fields in dead)
    await wait_until(lambda: _len_at_least(results_of(client, config), 1), what="good one served")
    await wait_until(lambda: _pending_is(client, config, 0), what="all acked")


async def _xrange(client, stream):
    return await client.xrange(stream)


async def test_entry_of_a_dead_consumer_is_claimed_then_dead_lettered_past_max(setup):
    client, config, _manager, consumer = setup
    await client.xgroup_create(config.stream, config.group, "0", mkstream=True)
    await client.xadd(config.stream, {"value": json.dumps({"id": "a", "input": {}})})
    await client.xadd(config.stream, {"value": json.dumps({"id": "b", "input": {}})})
    # Another consumer took both and died; "b" was already delivered twice before.
    await client.xreadgroup(config.group, "dead", {config.stream: ">"}, count=2)
    (b_entry,) = [e for e, f in await client.xrange(config.stream) if '"b"' in f["value"]]
    await client.xclaim(config.stream, config.group, "dead", 0, [b_entry])
    await consumer.start()
    results = await wait_until(lambda: _len_at_least(results_of(client, config), 1), what="a")
    assert [r["id"] for r in results] == ["a"]
    dead = await wait_until(
        lambda: _len_at_least(_xrange(client, names.dead_stream_name(config.stream)), 1),
        what="b dead-lettered",
    )
    assert dead[0][1]["reason"].startswith(names.REASON_MAX_DELIVERIES)
    assert consumer.health()["claimed"] == 2
    await wait_until(lambda: _pending_is(client, config, 0), what="all acked")


async def test_running_entries_stay_claimed_and_shutdown_leaves_them_pending(setup):
    client, config, manager, consumer = setup
    manager.auto_finish = False
    await client.xadd(config.stream, {"value": json.dumps({"id": "long", "input": {}})})
    await consumer.start()
    await wait_until(lambda: "long" in manager.predictions, what="submitted")

    # For several claim_idle_s periods another pool tries to take over idle entries: a live
    # consumer keeps its running entry claimed, so the thief never gets it.
    async def never_stolen() -> None:
        _, stolen, *_ = await client.xautoclaim(
            config.stream, config.group, "thief", int(config.claim_idle_s * 1000), "0-0"
        )
        assert stolen == []

    await holds_for(never_stolen, 4 * config.claim_idle_s)
    await consumer.stop(grace_s=0.1)
    info = await client.xpending_range(config.stream, config.group, "-", "+", 10)
    assert [i["consumer"] for i in info] == ["c1"]  # not acked: another pool will claim it
    assert await client.xlen(config.results_stream) == 0


async def test_shutdown_during_submit_cancels_the_prediction_it_handed_back(setup):
    client, config, _manager, _consumer = setup
    manager = BlockingSubmitManager(slots=2, auto_finish=False)
    consumer = RedisConsumer(config, manager, client=client)
    await client.xadd(config.stream, {"value": json.dumps({"id": "slow", "input": {}})})
    await consumer.start()
    await asyncio.wait_for(manager.entered.wait(), 20)
    # Shutdown hands the entry back while the manager is still inside submit()...
    stopping = asyncio.create_task(consumer.stop(grace_s=20))
    await wait_until(lambda: consumer.health()["returned"] == 1, what="entry handed back")
    manager.release.set()  # ...then submit() returns a prediction nobody would own
    await asyncio.wait_for(stopping, 30)
    assert manager.canceled == ["slow"] and manager.predictions["slow"].status == "canceled"
    info = await client.xpending_range(config.stream, config.group, "-", "+", 10)
    assert [i["consumer"] for i in info] == ["c1"]  # left pending for another pool
    assert await client.xlen(config.results_stream) == 0
