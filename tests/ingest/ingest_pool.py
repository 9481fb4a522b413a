"""Real pools for the broker tests: a PoolManager with coglet runners plus the consumers,
in this process or as a ``python -m cogpool serve`` child process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ingest_helpers import wait_until

from ingest import Consumers, start_consumers
from pool.config import PoolConfig, env_var_name, load_config
from pool.manager import PoolManager

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ECHO_MODEL = os.path.join(ROOT, "tests", "models", "ingest", "echo")
# Returns a file of seeded random bytes (size_kb, seed): large file outputs through the queues.
BIGFILE_MODEL = os.path.join(ROOT, "tests", "models", "api", "bigfile")
REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def unique(prefix: str) -> str:
    return f"test-ingest-{prefix}-{uuid.uuid4().hex[:12]}"


def redis_overrides(stream: str, **extra: Any) -> dict[str, Any]:
    """Queue names private to one test, derived from its stream name."""
    return {
        "queues.redis.url": REDIS_URL,
        "queues.redis.stream": stream,
        "queues.redis.group": f"{stream}:group",
        "queues.redis.results_stream": f"{stream}:results",
        "queues.redis.cancel_channel": f"{stream}:cancel",
        "queues.redis.block_ms": 200,
        **extra,
    }


def amqp_overrides(queue: str, **extra: Any) -> dict[str, Any]:
    return {
        "queues.amqp.url": AMQP_URL,
        "queues.amqp.queue": queue,
        "queues.amqp.dead_letter_exchange": f"{queue}.dlx",
        "queues.amqp.dead_letter_queue": f"{queue}.dead",
        "queues.amqp.cancel_exchange": f"{queue}.cancel",
        **extra,
    }


def pool_config(state_dir: str, overrides: dict[str, Any], runners: int = 2) -> PoolConfig:
    return load_config(
        None,
        env={},
        overrides={
            "model.path": ECHO_MODEL,
            "runners.count": runners,
            "state_dir": state_dir,
            "shutdown.grace_s": 10.0,
            "runners.backoff_initial_s": 0.1,
            **overrides,
        },
    )


@contextlib.asynccontextmanager
async def running_pool(config: PoolConfig) -> AsyncIterator[tuple[PoolManager, Consumers]]:
    """A started pool whose runners are all ready, with its queue consumers."""
    manager = PoolManager(config)
    await manager.start()
    capacity = config.runners.count * (config.runners.max_concurrency or 1)
    await wait_until(
        lambda: manager.free_slots() >= capacity, timeout_s=30, what="runners ready"
    )
    consumers = await start_consumers(config, manager)
    # Declared and consuming (a quorum queue refuses publishes while it is being created).
    await wait_until(
        lambda: all(h["state"] == "connected" for h in consumers.health().values()),
        timeout_s=30,
        what="consumers connected",
    )
    try:
        yield manager, consumers
    finally:
        await consumers.stop(5.0)
        await manager.shutdown(5.0)


async def queue_depth(queue: str) -> int:
    """Messages ready in an AMQP queue (delivered-but-unacked ones are not counted)."""
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await connection.close()


async def delete_amqp_names(
    queue: str,
    queue_suffixes: tuple[str, ...] = ("", ".dead"),
    exchange_suffixes: tuple[str, ...] = (".dlx", ".cancel"),
) -> None:
    """Remove the queues and exchanges a test named after ``queue`` (see amqp_overrides)."""
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        for suffix in queue_suffixes:
            await channel.queue_delete(f"{queue}{suffix}")
        for suffix in exchange_suffixes:
            await channel.exchange_delete(f"{queue}{suffix}")
    finally:
        await connection.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_pool_process(overrides: dict[str, Any], log_path: str) -> subprocess.Popen[bytes]:
    """``python -m cogpool serve`` with the queue settings in COG_POOL_* variables."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT
    for key, value in overrides.items():
        env[env_var_name(key)] = str(value)
    log = open(log_path, "wb")  # the child writes it; closed when the test process ends
    return subprocess.Popen(
        [sys.executable, "-m", "cogpool", "serve", ECHO_MODEL, "--runners", "2",
         "--port", str(free_port()), "--log-level", "debug"],  # per-prediction lines are DEBUG
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def count_runs(runs_file: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    if os.path.exists(runs_file):
        with open(runs_file) as f:
            for line in f:
                if line.strip():
                    counts[int(line)] = counts.get(int(line), 0) + 1
    return counts


async def close_connections_named(marker: str) -> int:
    """Close, on the broker, the connections whose client-given name contains ``marker``."""
    listing = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "list_connections", "pid", "client_properties", "-q",
        "--no-table-headers", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(listing.communicate(), 60)
    pids = [line.split("\t", 1)[0] for line in out.decode().splitlines() if marker in line]
    for pid in pids:
        close = await asyncio.create_subprocess_exec(
            "rabbitmqctl", "close_connection", pid, "chaos test",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert await asyncio.wait_for(close.wait(), 60) == 0
    return len(pids)
