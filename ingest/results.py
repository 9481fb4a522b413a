"""The idempotency record: the terminal prediction of each id, kept for a TTL.

A redelivered message whose id has a recorded terminal result is re-published, never re-run.
Redis-backed when a Redis URL is configured (shared by every pool, survives a pool's death);
otherwise in memory (this pool only; enough when one pool consumes the queue).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any, Protocol

from ingest import names

__all__ = ["MemoryResultStore", "RedisResultStore", "ResultStore"]


class ResultStore(Protocol):
    async def get(self, prediction_id: str) -> dict[str, Any] | None:
        """The recorded terminal prediction of this id, or None."""
        ...

    async def put(self, prediction_id: str, result: dict[str, Any]) -> None:
        """Record the terminal prediction of this id (kept for the store's TTL)."""
        ...

    async def count_delivery(self, prediction_id: str) -> int:
        """Count one more delivery of this id and return the total (kept for the TTL)."""
        ...

    async def close(self) -> None: ...


class MemoryResultStore:
    """Results of this pool only, bounded by ``max_entries`` and ``ttl_s``."""

    def __init__(self, *, ttl_s: float, max_entries: int = 100_000) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._results: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._deliveries: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def _expire(self) -> None:
        now = time.monotonic()
        for table in (self._results, self._deliveries):
            while table and (
                len(table) > self._max or next(iter(table.values()))[0] <= now
            ):
                table.popitem(last=False)

    async def get(self, prediction_id: str) -> dict[str, Any] | None:
        self._expire()
        entry = self._results.get(prediction_id)
        return entry[1] if entry else None

    async def put(self, prediction_id: str, result: dict[str, Any]) -> None:
        self._results[prediction_id] = (time.monotonic() + self._ttl_s, result)
        self._results.move_to_end(prediction_id)
        self._expire()

    async def count_delivery(self, prediction_id: str) -> int:
        _, count = self._deliveries.get(prediction_id, (0.0, 0))
        self._deliveries[prediction_id] = (time.monotonic() + self._ttl_s, count + 1)
        self._deliveries.move_to_end(prediction_id)
        self._expire()
        return count + 1

    async def close(self) -> None:
        return None


class RedisResultStore:
    """Results in Redis keys ``<prefix>:result:<id>`` with a TTL, shared by all pools."""

    def __init__(self, client: Any, *, prefix: str, ttl_s: float) -> None:
        self._redis = client
        self._prefix = prefix
        self._ttl_ms = max(1, int(ttl_s * 1000))

    async def get(self, prediction_id: str) -> dict[str, Any] | None:
        raw = await self._redis.get(names.result_key(self._prefix, prediction_id))
        return json.loads(raw) if raw is not None else None

    async def put(self, prediction_id: str, result: dict[str, Any]) -> None:
        await self._redis.set(
            names.result_key(self._prefix, prediction_id),
            json.dumps(result, separators=(",", ":")),
            px=self._ttl_ms,
        )

    async def count_delivery(self, prediction_id: str) -> int:
        key = names.deliveries_key(self._prefix, prediction_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.pexpire(key, self._ttl_ms)
            count, _ = await pipe.execute()
        return int(count)

    async def close(self) -> None:
        await self._redis.aclose()
