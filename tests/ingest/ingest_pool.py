"""Real pools for the broker tests: a PoolManager with coglet runners plus the consumers,
in this process or as a ``python -m cogpool serve`` child process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
from ingest_helpers import wait_until

from ingest import Consumers, names, start_consumers
from pool.config import PoolConfig, env_var_name, load_config
from pool.manager import PoolManager

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ECHO_MODEL = os.path.join(ROOT, "tests", "models", "ingest", "echo")
# Returns a file of seeded random bytes (size_kb, seed): large file outputs through the queues.
BIGFILE_MODEL = os.path.join(ROOT, "tests", "models", "api", "bigfile")
REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


class AmqpClient:
    """A test's own AMQP connection: publishes requests, collects replies and dead letters."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.replies: list[aio_pika.abc.AbstractIncomingMessage] = []
        self.dead: list[aio_pika.abc.AbstractIncomingMessage] = []
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self.channel: aio_pika.abc.AbstractChannel | None = None

    async def connect(self) -> None:
        self.connection = await aio_pika.connect(AMQP_URL)
        self.channel = await self.connection.channel()
        replies = await self.channel.declare_queue(f"{self.queue}.replies", durable=True)
        await replies.consume(self._reply, no_ack=True)

    async def _reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.replies.append(message)

    async def watch_dead(self) -> None:
        assert self.channel is not None
        dead = await self.channel.declare_queue(f"{self.queue}.dead", durable=True)
        await dead.consume(self._dead, no_ack=True)

    async def _dead(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.dead.append(message)

    async def publish(
        self,
        body: dict | bytes,
        *,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        message_id: str | None = None,
    ) -> None:
        assert self.channel is not None
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                raw,
                reply_to=reply_to or f"{self.queue}.replies",
                correlation_id=correlation_id,
                message_id=message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=self.queue,
        )

    def results(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for message in self.replies:
            result = json.loads(message.body)
            out.setdefault(result["id"], []).append(result)
        return out

    async def until_results(self, n: int, timeout_s: float = 60.0) -> dict[str, list[dict]]:
        return await wait_until(
            lambda: (r := self.results()) and len(r) >= n and r,
            timeout_s=timeout_s,
            what=f"{n} replies",
        )

    def dead_reasons(self) -> list[str]:
        return [str((m.headers or {}).get(names.AMQP_DEAD_REASON_HEADER)) for m in self.dead]

    async def cleanup(self) -> None:
        await delete_amqp_names(
            self.queue, ("", ".dead", ".replies"), (".dlx", ".cancel", ".results")
        )
        if self.connection is not None and not self.connection.is_closed:
            await self.connection.close()


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
    await wait_until(lambda: manager.free_slots() >= capacity, timeout_s=30, what="runners ready")
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
        [
            sys.executable,
            "-m",
            "cogpool",
            "serve",
            ECHO_MODEL,
            "--runners",
            "2",
            "--port",
            str(free_port()),
            "--log-level",
            "debug",
        ],  # per-prediction lines are DEBUG
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
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
