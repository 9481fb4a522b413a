"""Bounded waits for the ingest tests: poll a condition until a deadline, then fail loudly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError


async def wait_until(
    check: Callable[[], Any], *, timeout_s: float = 20.0, what: str = "condition"
) -> Any:
    """Await until ``check()`` (sync or async) returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


async def redis_up(url: str) -> bool:
    """True when the Redis at ``url`` answers PING (a readiness probe for wait_until)."""
    client = aioredis.from_url(url)
    try:
        return bool(await client.ping())
    except (OSError, RedisError):
        return False
    finally:
        await client.aclose()
