"""Queue messages that cannot be written to a runner or shown as JSON: dead letters, never a
stuck slot (real Redis, real PoolManager, real coglet runners)."""

from __future__ import annotations

import json

import pytest
import redis.asyncio as aioredis
from ingest_helpers import wait_until
from ingest_pool import REDIS_URL, pool_config, redis_overrides, running_pool, unique

from ingest import names

pytestmark = pytest.mark.broker


@pytest.fixture
async def redis_stream():
    client = aioredis.from_url(REDIS_URL, decode_responses=True)
    stream = unique("unencodable")
    yield client, stream
    keys = [k async for k in client.scan_iter(match=f"{stream}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_lone_surrogates_and_non_finite_numbers_are_dead_lettered(redis_stream, tmp_path):
    client, stream = redis_stream
    config = pool_config(str(tmp_path / "state"), redis_overrides(stream))
    async with running_pool(config) as (manager, _):
        # Steps: on a 2-runner pool, messages whose JSON parses into values no request file
        # (UTF-8 JSON) can hold: lone surrogates in input and context, NaN and 1e309 (inf).
        bad = {
            '{"id": "s1", "input": {"payload": "\\ud800"}}': ["body", "input", "payload"],
            '{"id": "s2", "input": {"payload": "x\\udfff"}}': ["body", "input", "payload"],
            '{"id": "c1", "input": {}, "context": {"k": "\\udc00"}}': ["body", "context", "k"],
            '{"id": "f1", "input": {"sleep_s": NaN}}': ["body", "input", "sleep_s"],
            '{"id": "f2", "input": {"sleep_s": 1e309}}': ["body", "input", "sleep_s"],
        }
        sent = {await client.xadd(stream, {"value": body}): loc for body, loc in bad.items()}
        await client.xadd(stream, {"value": json.dumps({"id": "fine", "input": {"n": 3}})})
        dead_stream = names.dead_stream_name(stream)

        async def all_dead():
            entries = await client.xrange(dead_stream)
            return entries if len(entries) >= len(sent) else None

        async def served():
            entries = await client.xrange(f"{stream}:results")
            return entries or None

        dead = await wait_until(all_dead, timeout_s=60, what="dead letters")
        results = await wait_until(served, timeout_s=60, what="the good message served")
        health = manager.health()
        pending = (await client.xinfo_groups(stream))[0]["pending"]
    # Result: each went to the dead letters naming its field; no slot was ever taken.
    by_origin = {fields[names.FIELD_ORIGINAL_ID]: fields for _, fields in dead}
    assert set(by_origin) == set(sent)
    for entry_id, loc in sent.items():
        reason = by_origin[entry_id]["reason"]
        assert reason.startswith(names.REASON_INVALID_REQUEST), reason
        assert "surrogate" in reason or "finite" in reason, reason
        assert f"{loc[1]}.{loc[2]}: " in reason, reason  # names the field
    [(_, fields)] = results
    assert fields["id"] == "fine" and json.loads(fields["value"])["output"] == "echo 3"
    assert health["concurrency"]["current"] == 0
    assert all(r["busy"] == 0 for r in health["runners"])
    assert pending == 0
