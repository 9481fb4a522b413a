"""Small asyncio helpers shared by the pool, the queue consumers and the command line.

The event loop: :func:`loop_factory` turns the ``event_loop`` setting (``auto``, ``asyncio``,
``uvloop``) into the factory ``cog-pool serve`` runs on, and :func:`loop_name` says which kind
a loop is, for the log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from pool.errors import ConfigError

__all__ = ["TIMER_SLACK_S", "loop_factory", "loop_name", "wait_first"]

# uvloop's clock (libuv's) counts whole milliseconds and rounds a delay to one: a timer armed
# for a time.monotonic() instant may fire up to ~1.5 ms before time.monotonic() reaches it.
# Code that checks "is it due yet?" when its timer fires arms the timer this much later.
TIMER_SLACK_S = 0.002

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


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


def loop_factory(event_loop: str) -> LoopFactory:
    """The factory of new event loops for the ``event_loop`` setting: ``uvloop`` when it is
    asked for, or for ``auto`` when it imports; the standard loop otherwise.

    Raises :class:`ConfigError` when ``uvloop`` is asked for and cannot be imported.
    """
    if event_loop not in ("auto", "asyncio", "uvloop"):
        raise ValueError(f"unknown event loop {event_loop!r}")
    if event_loop == "asyncio":
        return _standard_loop
    try:
        import uvloop
    except ImportError as e:
        if event_loop == "uvloop":
            raise ConfigError(
                "event_loop",
                f"uvloop was asked for but cannot be imported ({e}): install it "
                "(pip install 'uvloop>=0.19'), or set event_loop to auto or asyncio",
            ) from None
        return _standard_loop
    return uvloop.new_event_loop


def _standard_loop() -> asyncio.AbstractEventLoop:
    # asyncio's own loop on Unix, not asyncio.new_event_loop(): that one asks the installed
    # policy, which may be uvloop's (the test suite's COGPOOL_TEST_LOOP installs it).
    return asyncio.SelectorEventLoop()


def loop_name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """``uvloop`` or ``asyncio``: the kind of ``loop`` (default: the running loop)."""
    loop = asyncio.get_running_loop() if loop is None else loop
    return "uvloop" if type(loop).__module__.partition(".")[0] == "uvloop" else "asyncio"
