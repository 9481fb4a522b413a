"""Queue front doors end to end: predictions/s and enqueue -> result latency.

    .venv/bin/python bench/queue_bench.py                  # both brokers, prints the table
    .venv/bin/python bench/queue_bench.py --only redis --saturation 2000 --light 200
    .venv/bin/python bench/queue_bench.py --pools 3          # 3 pool processes, one stream/queue
    .venv/bin/python bench/queue_bench.py --long-cost        # AMQP prefetch cost, long work

``--pools`` ``cog-pool serve`` child processes (bench/models/null, 2 runners each) consume
one fresh Redis stream and one fresh AMQP queue. For each broker:
- saturation: ``--saturation`` requests enqueued at once; throughput = requests / (last
  result seen - first enqueue); latency per request = result seen - its enqueue;
- light load: ``--light`` requests one at a time (the next after the previous result).
"Result seen" is when this client reads the terminal result (Redis: the results stream;
AMQP: its reply queue), i.e. after the pool published and recorded it. ``dups`` counts
results seen more than once for one id (by the end of the run).
``--long-cost``: two pools of one runner each, AMQP only, one 3 s prediction then nine
0.1 s ones enqueued at once, for prefetch 1 and the default (2 per slot): the makespan and
the worst latency of a short prediction (one held behind the long one waits for it).
Needs Redis on 127.0.0.1:6379 and RabbitMQ on 127.0.0.1:5672 (guest/guest).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NULL_MODEL = os.path.join(ROOT, "bench", "models", "null")
SLEEP_MODEL = os.path.join(ROOT, "tests", "models", "ingest", "echo")  # has a sleep_s input
REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_pool(
    name: str,
    log_path: str,
    *,
    runners: int = 2,
    extra: dict[str, str] | None = None,
    model: str = NULL_MODEL,
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=ROOT, **(extra or {}))
    env.update(
        {
            "COG_POOL_QUEUES_REDIS_URL": REDIS_URL,
            "COG_POOL_QUEUES_REDIS_STREAM": name,
            "COG_POOL_QUEUES_REDIS_GROUP": f"{name}:group",
            "COG_POOL_QUEUES_REDIS_RESULTS_STREAM": f"{name}:results",
            "COG_POOL_QUEUES_AMQP_URL": AMQP_URL,
            "COG_POOL_QUEUES_AMQP_QUEUE": name,
            "COG_POOL_QUEUES_AMQP_DEAD_LETTER_EXCHANGE": f"{name}.dlx",
            "COG_POOL_QUEUES_AMQP_DEAD_LETTER_QUEUE": f"{name}.dead",
            "COG_POOL_QUEUES_AMQP_CANCEL_EXCHANGE": f"{name}.cancel",
        }
    )
    cmd = [sys.executable, "-m", "cogpool", "serve", model, "--runners", str(runners),
           "--port", str(_free_port()), "--log-level", "warning"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log_path, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


COUNTS: dict[str, int] = {}  # results seen per id (both brokers), for the duplicate count
POOL_PIDS: list[int] = []  # the pool processes under test (their runners are their children)
TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """user + system CPU seconds of one process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _broker_pid(broker: str) -> int | None:
    name = "beam.smp" if broker == "amqp" else "redis-server"
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() in (name, name[:15]):
                        return int(entry)
            except OSError:
                continue
    return None


def cpu_snapshot(broker: str) -> dict[str, float]:
    """CPU seconds so far: pool managers, their runners, the broker."""
    runners = [c for p in POOL_PIDS for c in _children(p)]
    broker_pid = _broker_pid(broker)
    return {
        "pool": sum(_cpu_s(p) for p in POOL_PIDS),
        "runners": sum(_cpu_s(c) for c in runners),
        "broker": _cpu_s(broker_pid) if broker_pid else 0.0,
        "client": _cpu_s(os.getpid()),  # this bench: producer and result reader
    }


def summary(broker: str, load: str, sent: dict[str, float], seen: dict[str, float]) -> dict:
    """Throughput over the whole run (first enqueue to last result) and per-request latency."""
    lat = sorted(seen[i] - sent[i] for i in sent)
    span = max(seen.values()) - min(sent.values())
    return {
        "broker": broker, "load": load, "n": len(lat), "per_s": len(lat) / span,
        "dups": sum(COUNTS.get(i, 0) - 1 for i in sent if COUNTS.get(i, 0) > 1),
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    }


async def bench_redis(name: str, saturation: int, light: int) -> list[dict]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL, decode_responses=True)
    results = f"{name}:results"
    last = "$"

    async def read_until(ids: set[str], seen: dict[str, float]) -> None:
        nonlocal last
        while not ids <= seen.keys():
            reply: Any = await client.xread({results: last}, block=1000, count=1000)
            now = time.perf_counter()
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    seen.setdefault(fields["id"], now)
                    COUNTS[fields["id"]] = COUNTS.get(fields["id"], 0) + 1

    async def push(pid: str) -> None:
        await client.xadd(name, {"value": json.dumps({"id": pid, "input": {}})})

    async def push_all(ids: list[str]) -> None:
        # The whole backlog in one pipelined round trip: the producer is not the limit.
        async with client.pipeline(transaction=False) as pipe:
            for pid in ids:
                pipe.xadd(name, {"value": json.dumps({"id": pid, "input": {}})})
            await pipe.execute()

    try:
        return await measure("redis", push, push_all, read_until, saturation, light)
    finally:
        keys = [k async for k in client.scan_iter(match=f"{name}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def bench_amqp(name: str, saturation: int, light: int) -> list[dict]:
    import aio_pika
    from pamqp import commands

    from ingest.amqp_wire import AmqpWire

    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=False)
    # Not exclusive: the results are read on the lean connection below, not this one.
    replies = await channel.declare_queue(f"{name}.replies", auto_delete=True)
    seen_at: dict[str, float] = {}
    arrived = asyncio.Event()
    # The client shares the machine's cores with the pool and the broker: it publishes and
    # reads through the pool's own lean AMQP connection (ingest/amqp_wire.py) and takes the
    # id from the result's message_id (the pool sets it to the prediction id).
    wire = await AmqpWire.connect(AMQP_URL, connection_name=f"queue-bench {name}")

    def on_reply(message: Any) -> None:
        pid = message.header.properties.message_id
        seen_at.setdefault(pid, time.perf_counter())
        COUNTS[pid] = COUNTS.get(pid, 0) + 1
        arrived.set()

    await wire.basic_consume(replies.name, on_reply, no_ack=True)

    async def push(pid: str) -> None:
        body = json.dumps({"id": pid, "input": {}}).encode()
        properties = commands.Basic.Properties(reply_to=replies.name, message_id=pid)
        await wire.basic_publish(body, routing_key=name, properties=properties)

    async def read_until(ids: set[str], seen: dict[str, float]) -> None:
        while not ids <= seen_at.keys():
            arrived.clear()
            await arrived.wait()
        seen.update({i: seen_at[i] for i in ids})

    async def push_all(ids: list[str]) -> None:
        # The whole backlog published at once: the producer is not the limit.
        await asyncio.gather(*(push(pid) for pid in ids))

    try:
        return await measure("amqp", push, push_all, read_until, saturation, light)
    finally:
        await wire.close()
        for queue in (name, f"{name}.dead", replies.name):
            await channel.queue_delete(queue)
        for exchange in (f"{name}.dlx", f"{name}.cancel"):
            await channel.exchange_delete(exchange)
        await connection.close()


async def measure(
    broker: str, push: Any, push_all: Any, read_until: Any, saturation: int, light: int
) -> list[dict]:
    """Warm up, then the saturation run (the backlog at once) and the light run (one by one)."""
    await _warm(push, read_until)
    rows = []
    sent: dict[str, float] = {}
    seen: dict[str, float] = {}
    ids = [f"s-{uuid.uuid4().hex}" for _ in range(saturation)]
    cpu_before = cpu_snapshot(broker)
    now = time.perf_counter()
    sent.update(dict.fromkeys(ids, now))
    await push_all(ids)
    await read_until(set(ids), seen)
    cpu_after = cpu_snapshot(broker)
    row = summary(broker, "saturation", sent, seen)
    # CPU per prediction of each party: less sensitive to other load than predictions/s.
    row["cpu_ms"] = {k: (cpu_after[k] - cpu_before[k]) * 1000 / saturation for k in cpu_after}
    rows.append(row)
    sent, seen = {}, {}
    for _ in range(light):
        pid = f"l-{uuid.uuid4().hex}"
        sent[pid] = time.perf_counter()
        await push(pid)
        await read_until({pid}, seen)
    rows.append(summary(broker, "light", sent, seen))
    return rows


async def _warm(push: Any, read_until: Any, n: int = 20) -> None:
    """A few predictions first: the pool is up, consuming, and its code paths are warm."""
    ids = {f"w-{uuid.uuid4().hex}" for _ in range(n)}
    for pid in ids:
        await push(pid)
    await asyncio.wait_for(read_until(ids, {}), 120)


async def _wait_declared(name: str) -> None:
    import aio_pika

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        connection = await aio_pika.connect(AMQP_URL)
        try:
            channel = await connection.channel()
            await channel.declare_queue(name, passive=True)
            return
        except aio_pika.exceptions.ChannelNotFoundEntity:
            await asyncio.sleep(0.2)  # the pool is still starting
        finally:
            await connection.close()
    raise TimeoutError(f"the pool never declared {name}")


async def _declare_classic(name: str) -> None:
    """The request queue made beforehand as a durable classic queue: the pool uses it as it
    is (deliveries counted in its result store), to show what the quorum queue costs."""
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True)
    finally:
        await connection.close()


async def main_async(args: argparse.Namespace) -> list[dict]:
    name = f"bench-queue-{uuid.uuid4().hex[:8]}"
    os.makedirs(os.path.join(ROOT, "bench", ".work"), exist_ok=True)
    if args.long_cost:
        return await long_cost(name)
    extra = {"COG_POOL_QUEUES_AMQP_PREFETCH": str(args.prefetch)} if args.prefetch else None
    if args.classic_queue:
        await _declare_classic(name)
    pools = [
        start_pool(name, os.path.join(ROOT, "bench", ".work", f"queue-bench-pool-{i}.log"),
                   extra=extra)
        for i in range(args.pools)
    ]
    POOL_PIDS[:] = [p.pid for p in pools]
    rows: list[dict] = []
    try:
        if args.only in (None, "redis"):
            rows += await asyncio.wait_for(bench_redis(name, args.saturation, args.light), 600)
        if args.only in (None, "amqp"):
            await _wait_declared(name)
            rows += await asyncio.wait_for(bench_amqp(name, args.saturation, args.light), 600)
    finally:
        stop_pools(pools)
    for row in rows:
        row["pools"] = args.pools
    return rows


def stop_pools(pools: list[subprocess.Popen[bytes]]) -> None:
    for pool in pools:
        pool.send_signal(signal.SIGTERM)
    for pool in pools:
        try:
            pool.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(pool.pid, signal.SIGKILL)


async def long_cost(name: str) -> list[dict]:
    """AMQP, two pools of one runner: what a held message costs when predictions are long."""
    import aio_pika

    rows = []
    for prefetch in (1, None):
        queue = f"{name}-p{prefetch or 'default'}"
        extra = {"COG_POOL_QUEUES_AMQP_PREFETCH": str(prefetch)} if prefetch else {}
        extra["COG_POOL_RUNNERS_MAX_CONCURRENCY"] = "1"
        logs = os.path.join(ROOT, "bench", ".work", "queue-bench-long-{}.log")
        pools = [
            start_pool(queue, logs.format(i), runners=1, extra=extra, model=SLEEP_MODEL)
            for i in range(2)
        ]
        try:
            await _wait_declared(queue)
            connection = await aio_pika.connect(AMQP_URL)
            channel = await connection.channel()
            replies = await channel.declare_queue(exclusive=True, auto_delete=True)
            done: dict[str, float] = {}
            arrived = asyncio.Event()

            async def on_reply(
                message: Any, done: dict[str, float] = done, arrived: asyncio.Event = arrived
            ) -> None:
                done[json.loads(message.body)["id"]] = time.perf_counter()
                arrived.set()

            await replies.consume(on_reply, no_ack=True)
            await _warm_long(channel, queue, replies.name, done, arrived)
            done.clear()
            start = time.perf_counter()
            ids = []
            for n in range(10):  # one long prediction, then nine short ones
                pid = f"{'long' if n == 0 else 'short'}-{n}"
                ids.append(pid)
                body = {"id": pid, "input": {"sleep_s": 3.0 if n == 0 else 0.1}}
                await channel.default_exchange.publish(
                    aio_pika.Message(json.dumps(body).encode(), reply_to=replies.name),
                    routing_key=queue,
                )
            await _until(lambda ids=ids, done=done: set(ids) <= done.keys(), arrived)
            shorts = [done[i] - start for i in ids if i.startswith("short")]
            rows.append({
                "broker": "amqp", "load": f"long, prefetch={prefetch or 'default (2)'}",
                "n": len(ids), "per_s": len(ids) / (max(done.values()) - start),
                "makespan_s": max(done.values()) - start, "worst_short_s": max(shorts),
                "pools": 2, "dups": 0, "p50_ms": 0.0, "p99_ms": 0.0,
            })
            await channel.queue_delete(queue)
            await connection.close()
        finally:
            stop_pools(pools)
    for row in rows:
        print(f"{row['load']:<30} makespan {row['makespan_s']:.2f} s, "
              f"worst short-prediction latency {row['worst_short_s']:.2f} s")
    return rows


async def _until(check: Any, arrived: asyncio.Event, timeout_s: float = 120) -> None:
    async def wait() -> None:
        while not check():
            arrived.clear()
            await arrived.wait()

    await asyncio.wait_for(wait(), timeout_s)


async def _warm_long(
    channel: Any, queue: str, reply_to: str, done: dict[str, float], arrived: asyncio.Event
) -> None:
    import aio_pika

    for n in range(4):
        body = {"id": f"warm-{n}", "input": {}}
        await channel.default_exchange.publish(
            aio_pika.Message(json.dumps(body).encode(), reply_to=reply_to), routing_key=queue
        )
    await _until(lambda: len(done) >= 4, arrived)


def print_table(rows: list[dict]) -> None:
    print(f"{'broker':<7} {'pools':>5} {'load':<11} {'n':>6} {'pred/s':>9} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'dups':>5}")
    for r in rows:
        print(f"{r['broker']:<7} {r['pools']:>5} {r['load']:<11} {r['n']:>6} {r['per_s']:>9.1f} "
              f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['dups']:>5}"
              + ("  cpu ms/prediction: " + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms"].items())
                 if "cpu_ms" in r else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=("redis", "amqp"))
    p.add_argument("--saturation", type=int, default=1000, help="requests enqueued at once")
    p.add_argument("--light", type=int, default=100, help="requests one at a time")
    p.add_argument("--pools", type=int, default=1, help="pool processes on one stream/queue")
    p.add_argument("--prefetch", type=int, help="queues.amqp.prefetch (default: the pool's)")
    p.add_argument("--long-cost", action="store_true", help="AMQP prefetch cost, long work")
    p.add_argument("--classic-queue", action="store_true",
                   help="AMQP: a durable classic request queue instead of the pool's quorum queue")
    print_table(asyncio.run(main_async(p.parse_args())))


if __name__ == "__main__":
    main()
