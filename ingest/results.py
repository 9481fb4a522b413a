"""The idempotency record of the AMQP driver: the terminal prediction (JSON) of each id, kept
for a TTL, and whether its publish was confirmed by the broker.

A redelivered message whose id has a recorded terminal result is never re-run: it is
re-published, unless the broker already confirmed its publish (then only acked).
Redis-backed when a Redis URL is configured (shared by every pool, survives a pool's death);
otherwise in memory (this pool only; enough when one pool consumes the queue), bounded in
entries and in bytes.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ingest import names
from ingest.core import ResultValue, StoreUnavailable

__all__ = ["MemoryResultStore", "RedisResultStore", "ResultStore"]

# Store-transient: the store's server is out of reach, restarting, or refusing writes for now.
STORE_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    ConnectionError,
    OSError,
)


class ResultStore(Protocol):
    async def get(self, prediction_id: str) -> ResultValue | None:
        """The recorded terminal prediction JSON of this id, or None."""
        ...

    async def put(self, prediction_id: str, result: ResultValue) -> None:
        """Record the terminal prediction JSON of this id (kept for the store's TTL)."""
        ...

    async def mark_published(self, prediction_id: str) -> None:
        """Record that the broker confirmed the publish of this id's result."""
        ...

    async def published(self, prediction_id: str) -> bool: ...

    async def count_delivery(self, prediction_id: str) -> int:
        """Count one more delivery of this id and return the total (kept for the TTL)."""
        ...

    async def close(self) -> None: ...


class MemoryResultStore:
    """Results of this pool only, bounded by ``max_entries``, ``max_bytes`` and ``ttl_s``:
    past a bound the oldest results are forgotten first."""

    def __init__(
        self, *, ttl_s: float, max_entries: int = 100_000, max_bytes: int = 256 * 1024 * 1024
    ) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._max_bytes = max_bytes
        self.bytes = 0  # the recorded results' JSON, in bytes (the bound counts this)
        # id -> (expires at, result JSON, publish confirmed)
        self._results: OrderedDict[str, tuple[float, ResultValue, bool]] = OrderedDict()
        self._deliveries: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._results)

    def _expire(self) -> None:
        now = time.monotonic()
        results = self._results
        while results and (
            len(results) > self._max
            or self.bytes > self._max_bytes
            or next(iter(results.values()))[0] <= now
        ):
            _, (_, value, _) = results.popitem(last=False)
            self.bytes -= len(value)
        deliveries = self._deliveries
        while deliveries and (
            len(deliveries) > self._max or next(iter(deliveries.values()))[0] <= now
        ):
            deliveries.popitem(last=False)

    async def get(self, prediction_id: str) -> ResultValue | None:
        self._expire()
        entry = self._results.get(prediction_id)
        return entry[1] if entry else None

    async def put(self, prediction_id: str, result: ResultValue) -> None:
        old = self._results.pop(prediction_id, None)
        if old is not None:
            self.bytes -= len(old[1])
        self._results[prediction_id] = (time.monotonic() + self._ttl_s, result, False)
        self.bytes += len(result)
        self._expire()

    async def mark_published(self, prediction_id: str) -> None:
        entry = self._results.get(prediction_id)
        if entry is not None:
            self._results[prediction_id] = (entry[0], entry[1], True)

    async def published(self, prediction_id: str) -> bool:
        entry = self._results.get(prediction_id)
        return bool(entry and entry[2])

    async def count_delivery(self, prediction_id: str) -> int:
        _, count = self._deliveries.get(prediction_id, (0.0, 0))
        self._deliveries[prediction_id] = (time.monotonic() + self._ttl_s, count + 1)
        self._deliveries.move_to_end(prediction_id)
        self._expire()
        return count + 1

    async def close(self) -> None:
        return None


class RedisResultStore:
    """Results in Redis keys ``<prefix>:result:<id>`` with a TTL, shared by all pools.

    Every Redis error that means "not now" is raised as :class:`StoreUnavailable`
    (store-transient): the delivery core retries it; it is never a reason to requeue or
    dead-letter the message.
    """

    def __init__(self, client: Any, *, prefix: str, ttl_s: float) -> None:
        self._redis = client
        self._prefix = prefix
        self._ttl_ms = max(1, int(ttl_s * 1000))

    async def _call(self, op: Any) -> Any:
        try:
            return await op()
        except STORE_ERRORS as e:
            raise StoreUnavailable(f"result store: {type(e).__name__}: {e}") from e

    async def get(self, prediction_id: str) -> ResultValue | None:
        raw = await self._call(
            lambda: self._redis.get(names.result_key(self._prefix, prediction_id))
        )
        return str(raw) if raw is not None else None

    async def put(self, prediction_id: str, result: ResultValue) -> None:
        key = names.result_key(self._prefix, prediction_id)
        await self._call(lambda: self._redis.set(key, result, px=self._ttl_ms))

    async def mark_published(self, prediction_id: str) -> None:
        key = names.published_key(self._prefix, prediction_id)
        await self._call(lambda: self._redis.set(key, "1", px=self._ttl_ms))

    async def published(self, prediction_id: str) -> bool:
        key = names.published_key(self._prefix, prediction_id)
        return bool(await self._call(lambda: self._redis.exists(key)))

    async def count_delivery(self, prediction_id: str) -> int:
        key = names.deliveries_key(self._prefix, prediction_id)

        async def op() -> int:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.pexpire(key, self._ttl_ms)
                count, _ = await pipe.execute()
            return int(count)

        result: int = await self._call(op)
        return result

    async def close(self) -> None:
        await self._redis.aclose()
