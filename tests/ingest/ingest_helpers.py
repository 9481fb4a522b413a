"""Bounded waits for the ingest tests: poll a condition until a deadline, then fail loudly;
or check that something keeps holding for a while. The only places these tests sleep."""

from __future__ import annotations

import asyncio
import contextlib
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


def wait_until_sync(
    check: Callable[[], Any], *, timeout_s: float = 20.0, what: str = "condition"
) -> Any:
    """``wait_until`` for code outside an event loop (hypothesis tests, fixtures)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.005)


async def holds_for(check: Callable[[], Any], seconds: float, *, every_s: float = 0.05) -> None:
    """Run ``check()`` (sync or async; it asserts) again and again for ``seconds``: for
    "this never happens while ..." (a sampled window, not a wait for a condition)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if isinstance(value, Awaitable):
            await value
        await asyncio.sleep(every_s)


async def repeat_until(
    stop: asyncio.Event, action: Callable[[], Awaitable[Any]], *, every_s: float = 0.05
) -> None:
    """Await ``action()`` every ``every_s`` until ``stop`` is set (a stand-in for another
    process's periodic work)."""
    while not stop.is_set():
        await action()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


async def redis_up(url: str) -> bool:
    """True when the Redis at ``url`` answers PING (a readiness probe for wait_until)."""
    client = aioredis.from_url(url)
    try:
        return bool(await client.ping())
    except (OSError, RedisError):
        return False
    finally:
        await client.aclose()
