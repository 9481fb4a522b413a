"""Small asyncio helpers shared by the pool, the queue consumers and the command line."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

__all__ = ["wait_first"]


async def wait_first(*aws: Awaitable[Any]) -> None:
    """Return once any of ``aws`` is done; cancel and reap the others. What they raised is
    not re-raised (the caller looks at the state it waited for)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
