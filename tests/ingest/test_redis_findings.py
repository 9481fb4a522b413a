"""Regression tests of issue 8 on the real Redis: a RedisConsumer on a real server, fed to a
stand-in manager (no runners: the runner is not what these test) unless a test says otherwise.

Each test is named after the behaviour the finding asked for; each failed before its fix.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json

import pytest
import redis.asyncio as aioredis
from ingest_fakes import BlockingSubmitManager, FakeManager
from ingest_helpers import holds_for, repeat_until, wait_until
from ingest_pool import REDIS_URL, unique

from ingest import names
from ingest.redis import RedisConsumer
from pool.config import RedisConfig

pytestmark = pytest.mark.broker


@pytest.fixture
async def client():
    c = aioredis.from_url(REDIS_URL, decode_responses=True)
    yield c
    await c.aclose()


@pytest.fixture
async def config(client):
    stream = unique("redis-fix")
    yield RedisConfig(
        url=REDIS_URL,
        stream=stream,
        group=f"{stream}:group",
        consumer="c1",
        results_stream=f"{stream}:results",
        cancel_channel=f"{stream}:cancel",
        block_ms=100,
        claim_idle_s=1.0,
        max_deliveries=3,
    )
    keys = [k async for k in client.scan_iter(match=f"{stream}*")]
    if keys:
        await client.delete(*keys)


class Running:
    """Consumers started by a test, stopped at its end."""

    def __init__(self) -> None:
        self.consumers: list[RedisConsumer] = []

    async def start(self, config: RedisConfig, manager: object) -> RedisConsumer:
        consumer = RedisConsumer(config, manager)
        self.consumers.append(consumer)
        await consumer.start()
        return consumer


@pytest.fixture
async def running():
    r = Running()
    yield r
    for consumer in r.consumers:
        if consumer.state != "stopped":
            await consumer.stop(grace_s=1)


async def push(client, stream: str, body: dict | str | bytes) -> str:
    value = body if isinstance(body, str | bytes) else json.dumps(body)
    return await client.xadd(stream, {"value": value})


async def results_by_id(client, stream: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for _, fields in await client.xrange(stream):
        out.setdefault(fields["id"], []).append(json.loads(fields["value"]))
    return out


async def dead_letters(client, config: RedisConfig) -> list[dict]:
    return [f for _, f in await client.xrange(names.dead_stream_name(config.stream))]


async def pending(client, config: RedisConfig) -> int:
    groups = await client.xinfo_groups(config.stream)
    return sum(int(g["pending"]) for g in groups if g["name"] == config.group)


# --- finding 1 --------------------------------------------------------------------------------
async def test_non_utf8_entry_is_dead_lettered_and_intake_goes_on(client, config, running):
    raw = aioredis.from_url(REDIS_URL)  # bytes in, bytes out: the hostile entry as sent
    try:
        bad_id = await raw.xadd(config.stream, {b"value": b'{"input": {}, "x": "\xff\xfe"}'})
    finally:
        await raw.aclose()
    for n in range(3):
        await push(client, config.stream, {"id": f"ok-{n}", "input": {"n": n}})
    consumer = await running.start(config, FakeManager(slots=2))
    results = await wait_until(
        lambda: _at_least(results_by_id(client, config.results_stream), 3), what="3 results"
    )
    assert sorted(results) == ["ok-0", "ok-1", "ok-2"]
    (dead,) = await wait_until(lambda: dead_letters(client, config), what="a dead letter")
    assert dead[names.FIELD_ORIGINAL_ID] == bad_id.decode()
    assert dead[names.FIELD_REASON].startswith(names.REASON_INVALID_JSON)
    assert "UTF-8" in dead[names.FIELD_REASON]
    # Readable by any client (this one decodes UTF-8), the original bytes kept losslessly.
    assert "value" not in dead
    assert base64.b64decode(dead["value_base64"]) == b'{"input": {}, "x": "\xff\xfe"}'
    await wait_until(lambda: _is(pending(client, config), 0), what="nothing pending")
    assert consumer.health()["state"] == "connected"


async def test_a_consumer_task_that_dies_does_not_leave_health_connected(config, running):
    consumer = await running.start(config, FakeManager(slots=2))
    await wait_until(lambda: consumer.health()["state"] == "connected", what="connected")

    async def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("a bug in the read loop")

    consumer._poll = broken  # type: ignore[method-assign]
    await wait_until(lambda: consumer.health()["state"] == "failed", what="state failed")
    assert "a bug in the read loop" in consumer.health()["last_error"]


# --- finding 2 --------------------------------------------------------------------------------
async def test_reply_to_outside_the_allowed_prefix_is_dead_lettered_unrun(client, config, running):
    manager = FakeManager(slots=2)
    await running.start(config, manager)
    victim = f"{config.stream}-victim"
    await push(client, config.stream, {"id": "r1", "input": {}, "reply_to": victim})
    (dead,) = await wait_until(lambda: dead_letters(client, config), what="a dead letter")
    assert dead[names.FIELD_REASON].startswith(names.REASON_INVALID_REPLY_TO)
    assert victim in dead[names.FIELD_REASON]
    assert manager.submitted == [] and not await client.exists(victim)
    assert await pending(client, config) == 0


async def test_reply_to_naming_a_non_stream_key_gives_no_duplicates_and_a_true_reason(
    client, config, running
):
    manager = FakeManager(slots=2)
    await running.start(config, manager)
    reply_to = f"{config.stream}:reply:not-a-stream"
    await client.set(reply_to, "a string key")
    await push(client, config.stream, {"id": "r2", "input": {}, "reply_to": reply_to})
    await push(client, config.stream, {"id": "after", "input": {}})
    await wait_until(
        lambda: _has(results_by_id(client, config.results_stream), "after"), what="later entry"
    )
    (dead,) = await wait_until(lambda: dead_letters(client, config), what="a dead letter")
    assert dead[names.FIELD_REASON].startswith(names.REASON_INVALID_REPLY_TO)
    assert "not a stream" in dead[names.FIELD_REASON]
    assert "r2" not in await results_by_id(client, config.results_stream)
    assert manager.submitted.count("r2") <= 1
    await wait_until(lambda: _is(pending(client, config), 0), what="nothing pending")
    assert await client.get(reply_to) == "a string key"


# --- finding 5 --------------------------------------------------------------------------------
async def test_autoclaim_walks_past_live_entries_to_reach_a_dead_consumers(client, config, running):
    config = dataclasses.replace(config, claim_idle_s=0.5)
    await client.xgroup_create(config.stream, config.group, "0", mkstream=True)
    live = [await push(client, config.stream, {"id": f"live-{n}", "input": {}}) for n in range(25)]
    await client.xreadgroup(config.group, "live-pool", {config.stream: ">"}, count=25)
    for n in range(5):
        await push(client, config.stream, {"id": f"dead-{n}", "input": {}})
    await client.xreadgroup(config.group, "dead-pool", {config.stream: ">"}, count=5)
    stop = asyncio.Event()

    async def keep_claims() -> None:  # what a live pool's keepalive does
        await client.xclaim(config.stream, config.group, "live-pool", 0, live, justid=True)

    keeper = asyncio.create_task(repeat_until(stop, keep_claims))
    try:
        await running.start(config, FakeManager(slots=2))
        results = await wait_until(
            lambda: _at_least(results_by_id(client, config.results_stream), 5),
            timeout_s=30,
            what="the dead pool's 5 entries",
        )
    finally:
        stop.set()
        await keeper
    assert sorted(results) == [f"dead-{n}" for n in range(5)]


# --- finding 6 --------------------------------------------------------------------------------
async def test_an_entry_stays_claimed_while_its_submit_waits(client, config, running):
    config = dataclasses.replace(config, claim_idle_s=0.5)
    manager = BlockingSubmitManager(slots=2)
    await running.start(config, manager)
    await push(client, config.stream, {"id": "slow-download", "input": {}})
    await asyncio.wait_for(manager.entered.wait(), 20)

    # Another pool tries to take the entry over for 4 x claim_idle_s while submit() waits
    # (as for an input download): it must never get it.
    async def never_taken() -> None:
        _, taken, _ = await client.xautoclaim(
            config.stream, config.group, "other-pool", int(config.claim_idle_s * 1000), "0-0"
        )
        assert taken == [], "another pool claimed an entry this pool holds"

    await holds_for(never_taken, 4 * config.claim_idle_s, every_s=0.1)
    manager.release.set()
    results = await wait_until(
        lambda: _has(results_by_id(client, config.results_stream), "slow-download"),
        what="the result",
    )
    assert len(results["slow-download"]) == 1 and manager.submitted == ["slow-download"]


# --- finding 8 --------------------------------------------------------------------------------
async def test_results_dead_letters_and_acked_entries_are_trimmed(client, config, running):
    config = dataclasses.replace(config, results_maxlen=10, dead_maxlen=5)
    await running.start(config, FakeManager(slots=2))
    for n in range(30):
        await push(client, config.stream, {"id": f"t-{n}", "input": {}})
    for _ in range(12):
        await push(client, config.stream, "{not json")
    dead_stream = names.dead_stream_name(config.stream)

    async def all_settled() -> bool:
        completed = await client.xrevrange(config.results_stream, count=1)
        last_dead = await client.xrevrange(dead_stream, count=1)
        return (
            await pending(client, config) == 0
            and bool(completed)
            and bool(last_dead)
            and (await client.xlen(config.stream) == 0)
        )

    await wait_until(all_settled, timeout_s=30, what="everything settled")
    assert await client.xlen(config.results_stream) == 10
    assert await client.xlen(dead_stream) == 5
    assert await client.xlen(config.stream) == 0  # acked request entries are deleted


# --- finding 9 (and issue 7a) -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "reason", "why"),
    [
        ('{"input": {"x": NaN}}', names.REASON_INVALID_REQUEST, "input.x: number nan is not"),
        ('{"input": {"x": -Infinity}}', names.REASON_INVALID_REQUEST, "number -inf is not"),
        ('{"input": {"x": 1e999}}', names.REASON_INVALID_REQUEST, "input.x: number inf is not"),
        ('{"input": {"text": "\\ud800"}}', names.REASON_INVALID_REQUEST, "surrogate"),
        ('{"input": {"\\udfff": 1}}', names.REASON_INVALID_REQUEST, "surrogate"),
    ],
)
async def test_non_finite_numbers_and_lone_surrogates_are_dead_lettered(
    client, config, running, raw, reason, why
):
    manager = FakeManager(slots=2)
    await running.start(config, manager)
    await push(client, config.stream, raw)
    await push(client, config.stream, {"id": "next", "input": {}})
    (dead,) = await wait_until(lambda: dead_letters(client, config), what="a dead letter")
    assert dead[names.FIELD_REASON].startswith(reason)
    assert why in dead[names.FIELD_REASON]
    await wait_until(
        lambda: _has(results_by_id(client, config.results_stream), "next"), what="next one"
    )
    assert manager.submitted == ["next"]


async def test_pending_and_lag_in_health_are_fresh(client, config, running):
    config = dataclasses.replace(config, claim_idle_s=30.0)  # keepalive every 10 s
    consumer = await running.start(config, FakeManager(slots=2))
    for n in range(5):
        await push(client, config.stream, {"id": f"h-{n}", "input": {}})
    await wait_until(
        lambda: _at_least(results_by_id(client, config.results_stream), 5), what="5 results"
    )
    await wait_until(
        lambda: consumer.health()["pending"] == 0 and consumer.health()["lag"] == 0,
        timeout_s=5,
        what="health pending=0 lag=0 well before the keepalive",
    )


async def _at_least(coro, n: int):
    got = await coro
    return got if len(got) >= n else None


async def _has(coro, key: str):
    got = await coro
    return got if key in got else None


async def _is(coro, value: object) -> bool:
    return await coro == value


# --- reading ahead -----------------------------------------------------------------------------
async def _lag(client, config: RedisConfig) -> int:
    groups = await client.xinfo_groups(config.stream)
    return int(groups[0]["lag"]) if groups else -1


@pytest.mark.parametrize("ahead", [0, 1, 3])
async def test_entries_read_ahead_are_bounded_by_read_ahead_per_slot(
    client, config, running, ahead
):
    config = dataclasses.replace(config, read_ahead_per_slot=ahead)
    manager = FakeManager(slots=2, auto_finish=False)  # both slots stay busy
    consumer = await running.start(config, manager)
    for n in range(12):
        await push(client, config.stream, {"id": f"m{n}", "input": {"n": n}})
    held = 2 * ahead  # read ahead per slot, over 2 slots
    await wait_until(lambda: len(manager.submitted) == 2, what="both slots taken")
    await wait_until(lambda: _is(_lag(client, config), 12 - 2 - held), what="read ahead")

    async def bounded() -> None:
        assert await _lag(client, config) == 12 - 2 - held
        assert consumer.health()["held"] == held
        assert len(manager.submitted) == 2

    await holds_for(bounded, 0.5)  # never more, while the slots stay busy
    # A slot frees: the oldest entry read ahead takes it, and one more is read.
    manager.finish("m0")
    await wait_until(lambda: len(manager.submitted) == 3, what="the next one submitted")
    assert manager.submitted == ["m0", "m1", "m2"]
    await wait_until(lambda: _is(_lag(client, config), max(0, 12 - 3 - held)), what="refill")


async def test_a_slot_that_frees_goes_to_the_oldest_entry_waiting(client, config, running):
    config = dataclasses.replace(config, read_ahead_per_slot=4)
    manager = FakeManager(slots=1, auto_finish=False)
    await running.start(config, manager)
    for n in range(5):
        await push(client, config.stream, {"id": f"o{n}", "input": {"n": n}})
    await wait_until(lambda: _is(_lag(client, config), 0), what="all five read")
    for n in range(4):  # each finish frees the one slot: taken in stream order every time
        await wait_until(lambda n=n: len(manager.submitted) == n + 1, what=f"o{n} submitted")
        manager.finish(f"o{n}")
    await wait_until(lambda: len(manager.submitted) == 5, what="all submitted")
    assert manager.submitted == [f"o{n}" for n in range(5)]


class CountingManager(FakeManager):
    """Counts free_slots() calls: every look at the slots a waiting message makes."""

    looks = 0

    def free_slots(self) -> int:
        self.looks += 1
        return super().free_slots()


async def test_a_freed_slot_wakes_the_head_of_the_line_not_every_held_message(
    client, config, running
):
    held = 24
    config = dataclasses.replace(config, read_ahead_per_slot=held)
    manager = CountingManager(slots=1, auto_finish=False)
    await running.start(config, manager)
    for n in range(held + 1):
        await push(client, config.stream, {"id": f"w{n}", "input": {"n": n}})
    await wait_until(lambda: manager.submitted == ["w0"], what="w0 submitted")
    await wait_until(lambda: _is(_lag(client, config), 0), what="all read")
    await wait_until(lambda: len(running.consumers[0].core._waiting) == held, what="all held")
    for n in range(3):  # each freed slot: a few looks, however many messages wait behind it
        manager.looks = 0
        manager.finish(f"w{n}")
        await wait_until(lambda n=n: len(manager.submitted) == n + 2, what=f"w{n + 1} submitted")
        await wait_until(
            lambda n=n: len(running.consumers[0].core._waiting) == held - n - 1, what="in line"
        )
        # Measured: ~10 looks (the reader, the line's watcher, the next job), whatever the
        # line's length; one per waiting message before (~100 here).
        assert manager.looks < held, f"{manager.looks} looks at the slots for one freed slot"
    assert manager.submitted == [f"w{n}" for n in range(4)]
