"""Prediction progress by webhook, as Cog sends it.

Events ``start``, ``output``, ``logs`` and ``completed``, each filtered by the request's
``webhook_events_filter``. ``output``/``logs`` are throttled to one per ``throttle_s``: changes
in between coalesce and the latest state is what is sent. The terminal webhook is sent exactly
once and retried with backoff on network errors, 429 and 5xx.

Sending never holds a runner slot: the prediction's listener only records what changed and
wakes a per-prediction task that this sender owns (cancelled and awaited in :meth:`close`).
One task per prediction also keeps that prediction's webhooks in order.

A large payload (a 100 MB output, a file output kept on disk) is never one ``json.dumps``: it
is sent as a streamed body, a slice at a time (:func:`pool.jsonstream.json_chunks`), made
afresh for each attempt; the sender holds the record's output files until its last webhook.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from coglet import protocol
from pool.config import NetworkConfig, WebhooksConfig
from pool.jsonstream import dumps, is_large, json_chunks
from pool.metrics import Metrics
from pool.network import (
    NetworkPolicy,
    NetworkRefused,
    UrlChecker,
    client_session,
    redact_text,
    redact_url,
    refusal,
)
from pool.prediction import (
    EVENT_COMPLETED,
    EVENT_LOGS,
    EVENT_OUTPUT,
    EVENT_START,
    Prediction,
)

__all__ = ["WebhookSender"]

log = logging.getLogger(__name__)

_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_JSON = {"Content-Type": "application/json"}
STREAM_BODY_MIN_CHARS = 1 << 20
"""A payload whose strings add up to more than this is sent as a streamed body."""
_PROGRESS_EVENTS = frozenset({EVENT_OUTPUT, EVENT_LOGS})


class _RetryableResponse(Exception):
    """The receiver answered with a status worth retrying (429 or 5xx)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class _Watch:
    """What changed in one prediction since its task last looked."""

    def __init__(self, prediction: Prediction) -> None:
        self.prediction = prediction
        self.url: str = prediction.request.webhook or ""
        self.events = frozenset(prediction.request.webhook_events_filter)
        self.start_payload: dict[str, Any] | None = None
        self.progress_pending = False
        self.completed = False
        self.changed = asyncio.Event()
        self.last_progress_at: float | None = None
        self.refused = False  # the network policy refused the URL: nothing more is sent

    def on_event(self, prediction: Prediction, event: str) -> None:
        """Prediction listener: record only (it runs inside the manager's update path)."""
        if event == EVENT_START and EVENT_START in self.events:
            # Cog's start webhook shows the prediction as it was then (status processing).
            self.start_payload = prediction.to_dict()
        elif event in _PROGRESS_EVENTS and event in self.events:
            self.progress_pending = True
        elif event == EVENT_COMPLETED:
            self.completed = True
        else:
            return
        self.changed.set()


class WebhookSender:
    """Sends the webhooks of every watched prediction from tasks it owns."""

    def __init__(
        self,
        config: WebhooksConfig,
        *,
        network: NetworkConfig | NetworkPolicy | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        # Webhook URLs come from clients: they are sent only where the network policy allows.
        self.policy = (
            network
            if isinstance(network, NetworkPolicy)
            else NetworkPolicy(network or NetworkConfig())
        )
        self._checker = UrlChecker(self.policy, timeout_s=self.policy.config.resolve_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    async def check(self, url: str) -> None:
        """Before a prediction is accepted: raise :class:`~pool.network.NetworkRefused` when
        the network policy refuses ``url`` (its host resolved, off the loop), or
        :class:`~pool.network.UrlUnresolvable` when its host does not resolve within
        ``network.resolve_timeout_s``. Each send is checked again (DNS may change)."""
        await self._checker.check(url)

    def watch(self, prediction: Prediction) -> None:
        """Send ``prediction``'s webhooks from now on; no-op without ``request.webhook``."""
        if not prediction.request.webhook or self._closing:
            return
        watch = _Watch(prediction)
        if prediction.status != protocol.STATUS_STARTING and EVENT_START in watch.events:
            watch.start_payload = prediction.to_dict()
            watch.changed.set()
        if prediction.done:
            watch.completed = True
            watch.changed.set()
        else:
            prediction.add_listener(watch.on_event)
        prediction.hold_output()  # released when its task ends
        task = asyncio.get_running_loop().create_task(
            self._run(watch), name=f"webhook-{prediction.id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, timeout_s: float) -> None:
        """Let pending terminal webhooks finish for up to ``timeout_s``, then stop."""
        self._closing = True
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("webhooks_abandoned count=%d timeout_s=%s", len(pending), timeout_s)
                await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._checker.close()

    # --- per-prediction task -------------------------------------------------------------------
    async def _run(self, watch: _Watch) -> None:
        try:
            while not watch.completed:
                await watch.changed.wait()
                watch.changed.clear()
                await self._send_start(watch)
                if watch.progress_pending and not watch.completed:
                    await self._send_progress(watch)
            await self._send_start(watch)
            await self._send_final(watch)
        except Exception:
            # A bug here must not vanish into an unretrieved task exception.
            log.exception("webhook_task_failed prediction=%s", watch.prediction.id)
            if self.metrics is not None:
                self.metrics.webhook_failed()
        finally:
            watch.prediction.remove_listener(watch.on_event)
            watch.prediction.release_output()

    async def _send_start(self, watch: _Watch) -> None:
        if watch.start_payload is None:
            return
        payload, watch.start_payload = watch.start_payload, None
        await self._post_once(watch, EVENT_START, payload)

    async def _send_progress(self, watch: _Watch) -> None:
        """Send the latest state once the throttle window allows; completion preempts it."""
        loop = asyncio.get_running_loop()
        if watch.last_progress_at is not None:
            wait_s = watch.last_progress_at + self.config.throttle_s - loop.time()
            if wait_s > 0:
                # Wake early only for completion: the terminal payload carries everything.
                try:
                    await asyncio.wait_for(self._until_completed(watch), wait_s)
                except TimeoutError:
                    pass
                if watch.completed:
                    return
        watch.progress_pending = False
        watch.last_progress_at = loop.time()
        await self._post_once(watch, "progress", watch.prediction.to_dict())

    @staticmethod
    async def _until_completed(watch: _Watch) -> None:
        while not watch.completed:
            watch.changed.clear()
            await watch.changed.wait()

    async def _send_final(self, watch: _Watch) -> None:
        payload = watch.prediction.to_dict()
        if EVENT_COMPLETED in watch.events:
            await self._post_terminal(watch, payload)
        elif watch.progress_pending:
            # Without "completed" in the filter the last output/logs change still goes out:
            # the final state is never dropped by the throttle.
            await self._post_once(watch, "progress", payload)

    # --- HTTP ----------------------------------------------------------------------------------
    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = client_session(
                self.policy,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
                headers={"User-Agent": "cog-pool"},
            )
        return self._session

    async def _post(self, url: str, payload: dict[str, Any]) -> int:
        """POST once; raises NetworkRefused (never retried) when the policy refuses ``url``."""
        body: Any
        if is_large(payload, STREAM_BODY_MIN_CHARS):
            body = json_chunks(payload)  # a fresh stream for each attempt
        else:
            body = dumps(payload).encode()
        try:
            async with self._client().post(url, data=body, headers=_JSON) as resp:
                await resp.read()
                if resp.status in _RETRY_STATUSES:
                    raise _RetryableResponse(resp.status)
                return resp.status
        except aiohttp.ClientError as e:
            refused = refusal(e, url)
            if refused is not None:
                raise refused from None
            raise

    async def _post_once(self, watch: _Watch, event: str, payload: dict[str, Any]) -> None:
        """Non-terminal webhooks are best effort: one attempt, a failure is only logged."""
        if watch.refused:
            return
        try:
            status = await self._post(watch.url, payload)
        except NetworkRefused as e:
            self._refused(watch, event, e)
            return
        except (aiohttp.ClientError, TimeoutError, _RetryableResponse) as e:
            log.info(
                "webhook_skipped prediction=%s event=%s error=%s",
                watch.prediction.id,
                event,
                _error_text(e),
            )
            return
        log.debug(
            "webhook_sent prediction=%s event=%s http_status=%d",
            watch.prediction.id,
            event,
            status,
        )

    async def _post_terminal(self, watch: _Watch, payload: dict[str, Any]) -> None:
        if watch.refused:
            return
        retrying = AsyncRetrying(
            stop=stop_after_attempt(max(1, self.config.max_attempts)),
            # exponential from retry_initial_s, capped, plus jitter so receivers that come
            # back are not hit by every pool at once
            wait=wait_exponential(
                multiplier=self.config.retry_initial_s, max=self.config.retry_max_s
            )
            + wait_random(0, self.config.retry_initial_s),
            retry=retry_if_exception_type((aiohttp.ClientError, TimeoutError, _RetryableResponse)),
            before_sleep=lambda rs: log.info(
                "webhook_retry prediction=%s attempt=%d error=%s",
                watch.prediction.id,
                rs.attempt_number,
                _error_text(rs.outcome.exception() if rs.outcome else None),
            ),
        )
        try:
            status: int = await retrying(self._post, watch.url, payload)
        except NetworkRefused as e:
            self._refused(watch, EVENT_COMPLETED, e)
            return
        except RetryError as e:
            self._give_up(watch, e.last_attempt.exception())
            return
        except (aiohttp.ClientError, TimeoutError, _RetryableResponse) as e:
            self._give_up(watch, e)
            return
        if status >= 400:
            # A 4xx other than 429 will not change on retry: the receiver refuses it.
            self._give_up(watch, f"HTTP {status}")
            return
        log.info(
            "webhook_completed_sent prediction=%s status=%s http_status=%d",
            watch.prediction.id,
            watch.prediction.status,
            status,
        )

    def _give_up(self, watch: _Watch, error: object) -> None:
        log.warning(
            "webhook_failed prediction=%s url=%s error=%s",
            watch.prediction.id,
            redact_url(watch.url),
            _error_text(error),
        )
        if self.metrics is not None:
            self.metrics.webhook_failed()

    def _refused(self, watch: _Watch, event: str, error: NetworkRefused) -> None:
        """Not sent: the network policy refuses the webhook's address (logged, never retried)."""
        watch.refused = True
        log.warning(
            "webhook_refused prediction=%s event=%s url=%s reason=%s",
            watch.prediction.id,
            event,
            redact_url(watch.url),
            error.reason,
        )
        if self.metrics is not None:
            self.metrics.webhook_failed()


def _error_text(error: object) -> str:
    """An error for a log line: its type and message, any URL in it redacted."""
    if isinstance(error, BaseException):
        return redact_text(f"{type(error).__name__}({error})")
    return redact_text(str(error))
