"""Queue ingestion: Redis Streams and AMQP consumers feeding the pool manager (DESIGN §5).

``await start_consumers(config, manager)`` starts the consumers the configuration enables
(``queues.redis.url``, ``queues.amqp.url``), registers their health with the manager, their
cancel broadcast as the manager's cancel forwarder, and their gauges with the manager's
metrics (when it has any). Shut down with ``await consumers.stop(grace_s)``; ``pool serve``
runs it concurrently with the manager's own shutdown (both drain within the same grace).

That order does not matter: a stopping consumer hands back every message no runner has
started (unacked, for another pool) and never publishes a prediction its shutdown ended
(``EndReason.SHUTDOWN``), so the manager canceling those first publishes nothing;
and a message whose ``manager.submit`` is still in progress when it is handed back has its
prediction canceled as soon as the submit returns, so no prediction is left without an owner.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, Protocol

from ingest.amqp import AmqpConsumer
from ingest.port import Manager
from ingest.redis import RedisConsumer
from ingest.results import MemoryResultStore, RedisResultStore, ResultStore
from pool.config import PoolConfig

__all__ = ["AmqpConsumer", "Consumer", "Consumers", "RedisConsumer", "start_consumers"]

log = logging.getLogger(__name__)


class Consumer(Protocol):
    state: str

    async def start(self) -> None: ...
    async def stop(self, grace_s: float) -> None: ...
    def health(self) -> dict[str, Any]: ...
    async def forward_cancel(self, prediction_id: str) -> None: ...


class Consumers:
    """The running consumers of one pool, by name ("redis", "amqp")."""

    def __init__(self, consumers: dict[str, Consumer]) -> None:
        self.consumers = consumers

    async def stop(self, grace_s: float) -> None:
        """Stop all consumers in parallel; each finishes its running work within grace_s."""
        await asyncio.gather(*(c.stop(grace_s) for c in self.consumers.values()))

    def health(self) -> dict[str, Any]:
        return {name: c.health() for name, c in self.consumers.items()}

    async def forward_cancel(self, prediction_id: str) -> None:
        """Broadcast a cancel on every broker; a broker that is down is logged, not fatal."""
        for name, consumer in self.consumers.items():
            try:
                await consumer.forward_cancel(prediction_id)
            except Exception as e:
                log.warning(
                    "cancel_broadcast_failed queue=%s prediction=%s error=%r",
                    name,
                    prediction_id,
                    str(e),
                )

    def samples(self) -> Iterable[Any]:
        """Gauges for /metrics: connection state, backlog and counters per consumer."""
        from pool.metrics import Sample

        for name, consumer in self.consumers.items():
            h = consumer.health()
            labels = {"queue": name}
            yield Sample(
                "cog_pool_queue_connected",
                1.0 if h["state"] == "connected" else 0.0,
                labels,
                "1 when the queue consumer is connected to its broker.",
            )
            for key in ("in_flight", "pending", "lag", "queue_depth", "held"):
                if h.get(key) is not None:
                    yield Sample(
                        f"cog_pool_queue_{key}",
                        float(h[key]),
                        labels,
                        f"Queue consumer {key.replace('_', ' ')}.",
                    )
            for key in (
                "received",
                "completed",
                "republished",
                "deduplicated",
                "dead_lettered",
                "redeliveries",
                "reconnects",
                "unroutable",
                "store_errors",
                "bugs",
            ):
                yield Sample(
                    f"cog_pool_queue_{key}_total",
                    float(h.get(key) or 0),
                    labels,
                    f"Queue messages {key.replace('_', ' ')} since start.",
                )


def _result_store(config: PoolConfig) -> ResultStore:
    amqp = config.queues.amqp
    ttl_s = config.queues.redis.result_ttl_s
    if amqp.result_store_redis_url:
        import redis.asyncio as aioredis

        client = aioredis.from_url(amqp.result_store_redis_url, decode_responses=True)
        return RedisResultStore(client, prefix=amqp.queue, ttl_s=ttl_s)
    return MemoryResultStore(
        ttl_s=ttl_s,
        max_entries=amqp.result_store_max_entries,
        max_bytes=amqp.result_store_max_bytes,
    )


async def start_consumers(config: PoolConfig, manager: Manager) -> Consumers:
    """Start the consumers ``config.queues`` enables and wire them into ``manager``."""
    consumers: dict[str, Consumer] = {}
    if config.queues.redis.url:
        consumers["redis"] = RedisConsumer(config.queues.redis, manager)
    if config.queues.amqp.url:
        consumers["amqp"] = AmqpConsumer(config.queues.amqp, manager, store=_result_store(config))
    result = Consumers(consumers)
    for name, consumer in consumers.items():
        manager.add_health_source(name, consumer.health)
        await consumer.start()
    if consumers:
        manager.add_cancel_forwarder(result.forward_cancel)
        metrics = manager.metrics
        if metrics is not None:
            metrics.add_collector(result.samples)
    return result
