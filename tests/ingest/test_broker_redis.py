"""Redis Streams end to end: real Redis, real PoolManager, real coglet runners."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import signal

import pytest
import redis.asyncio as aioredis
from ingest_helpers import redis_up, wait_until
from ingest_pool import (
    BIGFILE_MODEL,
    REDIS_URL,
    ROOT,
    count_runs,
    pool_config,
    redis_overrides,
    running_pool,
    spawn_pool_process,
    stop_process,
    unique,
)
from redis.exceptions import RedisError

from ingest import names

pytestmark = pytest.mark.broker


@pytest.fixture
async def redis_client():
    client = aioredis.from_url(REDIS_URL, decode_responses=True)
    created: list[str] = []
    yield client, created
    for stream in created:
        keys = [k async for k in client.scan_iter(match=f"{stream}*")]
        if keys:
            await client.delete(*keys)
    await client.aclose()


@pytest.fixture
def stream(redis_client):
    _, created = redis_client
    name = unique("redis")
    created.append(name)
    return name


def bigfile_content(size_kb: int, seed: int) -> bytes:
    """What tests/models/api/bigfile returns."""
    return random.Random(seed).randbytes(size_kb << 10)


async def push(client, stream: str, body: dict | str) -> str:
    value = body if isinstance(body, str) else json.dumps(body)
    return await client.xadd(stream, {"value": value})


def nested_body(levels: int) -> str:
    return '{"input": {"n": ' + "[" * levels + "]" * levels + "}}"


async def results_by_id(client, stream: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for _, fields in await client.xrange(f"{stream}:results"):
        out.setdefault(fields["id"], []).append(json.loads(fields["value"]))
    return out


async def until_results(client, stream: str, n: int, timeout_s: float = 60.0):
    async def enough():
        try:
            got = await results_by_id(client, stream)
        except RedisError:  # the private server was just restarted under this client
            return None
        return got if len(got) >= n else None

    return await wait_until(enough, timeout_s=timeout_s, what=f"{n} results on {stream}")


async def until_dead(client, stream: str, n: int, timeout_s: float = 60.0):
    """The stream's dead letters once there are at least ``n``."""
    dead_stream = names.dead_stream_name(stream)

    async def enough():
        entries = await client.xrange(dead_stream)
        return entries if len(entries) >= n else None

    return await wait_until(enough, timeout_s=timeout_s, what=f"{n} dead letters")


async def test_200_predictions_two_runners_one_result_each(redis_client, stream, tmp_path):
    client, _ = redis_client
    config = pool_config(str(tmp_path / "state"), redis_overrides(stream))
    async with running_pool(config) as (_, consumers):
        for n in range(200):
            await push(client, stream, {"id": f"p-{n}", "input": {"n": n}})
        results = await until_results(client, stream, 200)
        assert consumers.health()["redis"]["state"] == "connected"
    assert sorted(results) == sorted(f"p-{n}" for n in range(200))
    for pid, entries in results.items():
        assert len(entries) == 1, pid
        (result,) = entries
        assert result["status"] == "succeeded"
        assert result["output"] == f"echo {pid[2:]}"
        assert result["input"]["n"] == int(pid[2:])
    group = (await client.xinfo_groups(stream))[0]
    assert group["pending"] == 0 and group["lag"] == 0


async def test_a_large_file_output_is_published_whole(redis_client, stream, tmp_path):
    client, _ = redis_client
    overrides = redis_overrides(stream, **{"model.path": BIGFILE_MODEL})
    config = pool_config(str(tmp_path / "state"), overrides, runners=1)
    # Steps: a message whose prediction returns a 3 MiB file (kept on disk by its record).
    async with running_pool(config):
        inputs = {"size_kb": 3072, "seed": 7, "path": str(tmp_path / "out.bin")}
        await push(client, stream, {"id": "f", "input": inputs})
        results = await until_results(client, stream, 1)
    # Result: the published result carries the whole file as its data: URI, byte for byte
    # (built off the loop, a slice at a time), and the stored result is the same text.
    (result,) = results["f"]
    assert result["status"] == "succeeded", result["error"]
    assert base64.b64decode(result["output"].partition(",")[2]) == bigfile_content(3072, 7)
    stored = await client.get(names.result_key(stream, "f"))
    assert json.loads(stored) == result


async def test_a_large_data_uri_input_is_decoded_and_echoed_whole(redis_client, stream, tmp_path):
    client, _ = redis_client
    digest_model = os.path.join(ROOT, "tests", "models", "api", "digest")
    overrides = redis_overrides(
        stream, **{"model.path": digest_model, "queues.redis.max_message_bytes": 8 << 20}
    )
    config = pool_config(str(tmp_path / "state"), overrides, runners=1)
    content = os.urandom(3 << 20)
    uri = "data:application/octet-stream;base64," + base64.b64encode(content).decode()
    # Steps: a message whose input is a 3 MiB file as a data: URI (4 MiB of base64): parsed
    # with the URI kept as a slice of the message (pool.jsonbody), decoded to its file.
    async with running_pool(config):
        await push(client, stream, {"id": "d", "input": {"data": uri}})
        results = await until_results(client, stream, 1)
    # Result: the model read the very bytes; the published result echoes the URI whole.
    (result,) = results["d"]
    assert result["status"] == "succeeded", result["error"]
    seen = json.loads(result["output"])
    assert seen["data"] == [len(content), hashlib.sha256(content).hexdigest()]
    assert result["input"] == {"data": uri}


async def test_poison_and_a_dying_model_go_to_dead_letters(redis_client, stream, tmp_path):
    client, _ = redis_client
    overrides = redis_overrides(
        stream,
        **{
            "queues.redis.max_message_bytes": 10_000,
            "queues.redis.max_deliveries": 2,
            "queues.redis.claim_idle_s": 0.5,
        },
    )
    config = pool_config(str(tmp_path / "state"), overrides)
    async with running_pool(config):
        sent = {
            await push(client, stream, "{not json"): names.REASON_INVALID_JSON,
            await push(client, stream, "[1, 2, 3]"): "must be a JSON object",
            await push(client, stream, {"id": "no-input"}): "missing required field 'input'",
            await push(client, stream, {"input": {"payload": "x" * 20_000}}): "too large",
            await push(client, stream, {"input": {"n": "seven"}}): "invalid request",
            # Hostile nesting: the decoder's RecursionError must not crash the consumer.
            await push(client, stream, nested_body(3_000)): "nested deeper than 64 levels",
            await push(client, stream, nested_body(100)): "nested deeper than 64 levels",
            await push(client, stream, {"id": "dies", "input": {"exit_now": True}}): (
                names.REASON_MAX_DELIVERIES
            ),
        }
        await push(client, stream, {"id": "fine", "input": {"n": 5}})
        dead = await until_dead(client, stream, len(sent))
        results = await until_results(client, stream, 1)
    by_origin = {fields[names.FIELD_ORIGINAL_ID]: fields for _, fields in dead}
    assert set(by_origin) == set(sent)
    for entry_id, reason in sent.items():
        assert reason in by_origin[entry_id]["reason"], by_origin[entry_id]["reason"]
    assert "died" in by_origin[next(iter(e for e, r in sent.items() if "too many" in r))]["reason"]
    assert by_origin[next(iter(sent))]["value"] == "{not json"  # original fields kept
    assert list(results) == ["fine"] and results["fine"][0]["output"] == "echo 5"
    assert (await client.xinfo_groups(stream))[0]["pending"] == 0


async def test_cancel_broadcast_reaches_the_pool_running_it(redis_client, stream, tmp_path):
    client, _ = redis_client
    overrides = redis_overrides(stream)
    config_a = pool_config(str(tmp_path / "a"), overrides, runners=1)
    config_b = pool_config(str(tmp_path / "b"), overrides, runners=1)
    async with running_pool(config_a) as (manager_a, _):
        await push(client, stream, {"id": "long", "input": {"sleep_s": 60}})
        await wait_until(lambda: manager_a.get("long") is not None, what="pool A runs it")
        async with running_pool(config_b) as (manager_b, _):
            assert manager_b.get("long") is None
            assert await manager_b.cancel("long") is False  # not here: broadcast
            results = await until_results(client, stream, 1, timeout_s=30)
    assert results["long"][0]["status"] == "canceled"


async def test_graceful_shutdown_acks_finished_and_leaves_the_rest(redis_client, stream, tmp_path):
    client, _ = redis_client
    overrides = redis_overrides(stream, **{"queues.redis.claim_idle_s": 1.0})
    config = pool_config(str(tmp_path / "a"), overrides)
    async with running_pool(config) as (manager, consumers):
        await push(client, stream, {"id": "short", "input": {"sleep_s": 1.0}})
        await push(client, stream, {"id": "long", "input": {"sleep_s": 4.0}})
        # No free slot: up to two are read ahead (one per slot, the default) and held
        # unstarted; the rest stay unread in the stream.
        for n in range(3):
            await push(client, stream, {"id": f"later-{n}", "input": {"n": n}})
        await wait_until(
            lambda: all(manager.get(i) is not None for i in ("short", "long")),
            what="both running",
        )
        await consumers.stop(grace_s=2.5)
        results = await results_by_id(client, stream)
        assert list(results) == ["short"]
        pending = await client.xpending_range(stream, f"{stream}:group", "-", "+", 10)
        lag = (await client.xinfo_groups(stream))[0]["lag"]
        # "long" and those read ahead: unacked, for another pool to claim; the rest unread.
        assert len(pending) >= 1 and len(pending) + lag == 4, (pending, lag)
        assert all(manager.get(f"later-{n}") is None for n in range(3))  # none ran here
    # The manager's shutdown canceled "long": that is not published as its result.
    assert list(await results_by_id(client, stream)) == ["short"]
    async with running_pool(pool_config(str(tmp_path / "b"), overrides)):
        results = await until_results(client, stream, 5)
    assert results["long"][0]["status"] == "succeeded"
    assert all(len(v) == 1 for v in results.values())


async def test_two_pool_processes_share_work_and_kill_9_loses_nothing(
    redis_client, stream, tmp_path
):
    client, _ = redis_client
    overrides = redis_overrides(stream, **{"queues.redis.claim_idle_s": 1.0})
    total = 60
    for n in range(total):
        await push(client, stream, {"id": f"k-{n}", "input": {"n": n, "sleep_s": 0.1}})
    procs = [spawn_pool_process(overrides, str(tmp_path / f"pool-{i}.log")) for i in range(2)]
    try:

        async def both_consuming():
            try:
                consumers = await client.xinfo_consumers(stream, f"{stream}:group")
            except RedisError:  # the group does not exist until a pool made it
                return False
            done = await client.xlen(f"{stream}:results")
            return len(consumers) == 2 and done >= 10

        await wait_until(both_consuming, timeout_s=60, what="both pools consuming")
        os.killpg(procs[0].pid, signal.SIGKILL)  # the pool and its runners, mid-work
        procs[0].wait(10)
        results = await until_results(client, stream, total, timeout_s=90)
    finally:
        for proc in procs:
            stop_process(proc)
    assert sorted(results) == sorted(f"k-{n}" for n in range(total))
    assert all(len(v) == 1 and v[0]["status"] == "succeeded" for v in results.values())
    consumers = await client.xinfo_consumers(stream, f"{stream}:group")
    assert all(c["pending"] == 0 for c in consumers)
    for pid in results:
        assert await client.get(names.result_key(stream, pid)) is not None


async def test_redis_restart_reconnects_nothing_lost_or_run_twice(private_redis, tmp_path):
    url, start, stop = private_redis
    await wait_until(lambda: redis_up(url), what="private redis up")
    client = aioredis.from_url(url, decode_responses=True)
    stream = unique("restart")
    runs_file = str(tmp_path / "runs.txt")
    overrides = {**redis_overrides(stream), "queues.redis.url": url}
    total = 16
    try:
        async with running_pool(pool_config(str(tmp_path / "state"), overrides)) as (
            _,
            consumers,
        ):
            for n in range(total):
                body = {"id": f"r-{n}", "input": {"n": n, "sleep_s": 0.3, "runs_file": runs_file}}
                await push(client, stream, body)
            await until_results(client, stream, 3)
            stop()
            await wait_until(
                lambda: consumers.health()["redis"]["state"] == "reconnecting",
                what="consumer sees the loss",
            )
            start()
            await wait_until(lambda: redis_up(url), what="redis back")
            results = await until_results(client, stream, total, timeout_s=60)
            health = consumers.health()["redis"]
            assert health["reconnects"] == 1  # one outage, one reconnect
            await wait_until(
                lambda: consumers.health()["redis"]["state"] == "connected", what="connected"
            )
    finally:
        await client.aclose()
    assert all(len(v) == 1 and v[0]["status"] == "succeeded" for v in results.values())
    assert count_runs(runs_file) == {n: 1 for n in range(total)}


TRAIN_MODEL = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "api", "train"
)


async def test_a_message_with_kind_training_runs_a_training(redis_client, stream, tmp_path):
    client, _ = redis_client
    overrides = redis_overrides(stream, **{"model.path": TRAIN_MODEL})
    config = pool_config(str(tmp_path / "state"), overrides, runners=1)
    async with running_pool(config):
        bad = await push(client, stream, {"id": "t-bad", "kind": "tune", "input": {}})
        await push(client, stream, {"id": "t-1", "kind": "training", "input": {"steps": 4}})
        await push(client, stream, {"id": "p-1", "input": {"text": "z"}})
        results = await until_results(client, stream, 2)
        dead = await wait_until(
            lambda: client.xrange(names.dead_stream_name(stream)), what="the dead letter"
        )
    ((training,), (prediction,)) = results["t-1"], results["p-1"]
    assert training["status"] == "succeeded" and training["output"]["steps"] == 4, training
    assert training["output"]["weights"].startswith("data:")
    assert prediction["output"] == "predicted z"
    ((_, fields),) = dead
    assert fields[names.FIELD_ORIGINAL_ID] == bad
    assert "kind must be one of ['prediction', 'training']" in fields["reason"]


async def test_an_endless_stream_gets_one_failed_result_at_the_output_cap(
    redis_client, stream, tmp_path
):
    client, _ = redis_client
    cap = 256 * 1024
    overrides = redis_overrides(
        stream,
        **{
            "model.path": os.path.join(ROOT, "tests", "models", "api", "endless"),
            "predictions.streamed_output_max_bytes": cap,
        },
    )
    config = pool_config(str(tmp_path / "state"), overrides, runners=1)
    async with running_pool(config) as (manager, _):
        # Steps: a message whose model yields without end; then one that yields 2 items.
        await push(client, stream, {"id": "endless", "input": {"item_kb": 16}})
        await push(client, stream, {"id": "after", "input": {"n": 2}})
        results = await until_results(client, stream, 2)
        restarts = manager.health()["runners"][0]["restarts"]
    # Result: one failed result naming the cap, the next message served by the same runner,
    # nothing pending, nothing dead-lettered.
    assert len(results["endless"]) == 1
    (failed,) = results["endless"]
    assert failed["status"] == "failed"
    assert f"exceeded {cap} bytes (predictions.streamed_output_max_bytes)" in failed["error"]
    assert results["after"][0]["status"] == "succeeded" and len(results["after"]) == 1
    assert restarts == 0
    assert (await client.xinfo_groups(stream))[0]["pending"] == 0
    assert await client.xlen(names.dead_stream_name(stream)) == 0


async def test_a_webhook_the_network_policy_refuses_is_dead_lettered_with_why(
    redis_client, stream, tmp_path
):
    client, _ = redis_client
    config = pool_config(str(tmp_path / "state"), redis_overrides(stream))
    async with running_pool(config):
        # Steps: messages whose webhook is a loopback address, or a host that does not
        # resolve; then a plain one.
        sent = {
            await push(client, stream, {"id": "h-loop", "input": {"n": 1},
                                        "webhook": "http://127.0.0.1:9/hook?token=SECRET"}): (
                "webhook: http://127.0.0.1:9/hook is refused by the network policy: "
                "127.0.0.1 is a loopback address"
            ),
            await push(client, stream, {"id": "h-nx", "input": {"n": 2},
                                        "webhook": "http://no-such-host.invalid/hook"}): (
                "webhook: http://no-such-host.invalid/hook: its host no-such-host.invalid "
                "did not resolve"
            ),
        }  # fmt: skip
        await push(client, stream, {"id": "fine", "input": {"n": 3}})
        dead = await until_dead(client, stream, len(sent))
        results = await until_results(client, stream, 1)
    # Result: each is dead-lettered once, as invalid input is, with the field, URL and why;
    # nothing ran for them; the plain message got its result; nothing is pending.
    by_origin = {fields[names.FIELD_ORIGINAL_ID]: fields for _, fields in dead}
    assert set(by_origin) == set(sent)
    for entry_id, why in sent.items():
        reason = by_origin[entry_id]["reason"]
        assert reason.startswith(f"{names.REASON_INVALID_REQUEST}: {why}"), reason
        assert "SECRET" not in reason
    assert list(results) == ["fine"] and results["fine"][0]["output"] == "echo 3"
    assert (await client.xinfo_groups(stream))[0]["pending"] == 0
