"""Reconnect forever with capped exponential backoff and jitter (tenacity)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential_jitter,
)

__all__ = ["log_retry", "retry_forever", "watch_task"]

T = TypeVar("T")


async def retry_forever(
    op: Callable[[], Awaitable[T]],
    *,
    errors: tuple[type[BaseException], ...],
    on_error: Callable[[BaseException], None],
    initial_s: float = 0.1,
    max_s: float = 5.0,
) -> T:
    """Run ``op`` until it succeeds; after each broker error call ``on_error`` and wait.

    Only ``errors`` are retried (a broker going away); anything else is a bug and propagates.
    Cancellation propagates at once, so the owner of the task can always stop it.
    """

    def before_sleep(state: RetryCallState) -> None:
        if state.outcome is not None and (exc := state.outcome.exception()) is not None:
            on_error(exc)

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(errors),
        wait=wait_exponential_jitter(multiplier=initial_s, max=max_s, jitter=initial_s),
        before_sleep=before_sleep,
        reraise=True,
    )

    async def call() -> T:
        # tenacity awaits only coroutine functions; ``op`` may be a lambda returning one.
        return await op()

    return await retrying(call)


def log_retry(log: logging.Logger, event: str, **fields: object) -> Callable[[BaseException], None]:
    """An ``on_error`` that logs one ``event key=value`` line per failed attempt."""
    extra = " ".join(f"{k}={v}" for k, v in fields.items())

    def on_error(exc: BaseException) -> None:
        log.warning("%s %s error=%r", event, extra, str(exc) or type(exc).__name__)

    return on_error


def watch_task(
    task: asyncio.Task[Any],
    log: logging.Logger,
    *,
    on_crash: Callable[[BaseException], None] | None = None,
) -> asyncio.Task[Any]:
    """Log, loudly, a long-lived consumer task that ended with an error, and tell its owner.

    Broker errors are retried inside the tasks; an exception that escapes one is a bug, and a
    consumer that silently stopped consuming would look healthy while work piles up: the
    owner's ``on_crash`` marks its health ``failed``.
    """

    def done(t: asyncio.Task[Any]) -> None:
        if not t.cancelled() and (exc := t.exception()) is not None:
            if on_crash is not None:
                on_crash(exc)
            log.error(
                "consumer_task_crashed task=%s error=%r",
                t.get_name(),
                t.exception(),
                exc_info=t.exception(),
            )

    task.add_done_callback(done)
    return task
