"""Redis Streams consumer: one consumer group per deployment, one consumer per pool.

Delivery rules (DESIGN §5):
- pull only what can run: ``XREADGROUP COUNT <free slots>``;
- the terminal result is published, recorded and acked by ONE Lua script, which Redis runs
  atomically: a pool dying at any point leaves either nothing or all three done, and since the
  script publishes only when no result is recorded for the id yet, an id is published at most
  once even when two pools ran it (the second only acks);
- entries of dead consumers are taken over with ``XAUTOCLAIM`` after ``claim_idle_s``; a live
  consumer keeps its running entries claimed with ``XCLAIM ... JUSTID`` every third of that;
- poison goes to ``<stream>:dead`` with the reason and the original fields, then is acked;
- on shutdown, entries not started are handed back (left pending, unacked) for other pools.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ingest import names
from ingest.backoff import retry_forever, watch_task
from ingest.messages import (
    RETRY_LATER,
    ConsumerStats,
    Poison,
    after_runner_died,
    over_delivered,
    parse_request,
    runner_died,
    shutdown_casualty,
)
from pool.config import RedisConfig
from pool.errors import InvalidRequest, ShuttingDown
from pool.prediction import EVENT_COMPLETED, Prediction, PredictionRequest

__all__ = ["RedisConsumer", "default_consumer_name"]

log = logging.getLogger(__name__)

BROKER_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    OSError,
)
PROGRESS_THROTTLE_S = 0.5


# KEYS: result key, request stream, reply streams...; ARGV: group, entry id, prediction id,
# result JSON, ttl ms, republish (0/1), the id/event/value field names, the event name.
_PUBLISH_AND_ACK = """
local recorded = redis.call('GET', KEYS[1])
if (not recorded) or ARGV[6] == '1' then
  local value = recorded or ARGV[4]
  for i = 3, #KEYS do
    redis.call('XADD', KEYS[i], '*', ARGV[7], ARGV[3], ARGV[8], ARGV[10], ARGV[9], value)
  end
end
if not recorded then
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[5])
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
return recorded and 1 or 0
"""


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class _Job:
    """One stream entry this consumer holds, from delivery to ack (or hand-back)."""

    entry_id: str
    deliveries: int
    request: PredictionRequest | None = None
    prediction: Prediction | None = None
    returned: bool = False  # handed back on shutdown: never publish, never ack
    task: asyncio.Task[None] | None = None
    progress_task: asyncio.Task[None] | None = None
    progress_dirty: bool = False
    # Set once the entry no longer waits to be handed to the manager (submitted, dead-lettered,
    # republished or given up): until then it is about to take a slot free_slots() still shows.
    admitted: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class RedisStats(ConsumerStats):
    claimed: int = 0
    pending: int | None = None
    lag: int | None = None


class RedisConsumer:
    """Feeds one Redis stream into the pool manager and publishes terminal results."""

    def __init__(self, config: RedisConfig, manager: Any, *, client: Any = None) -> None:
        self.config = config
        self.manager = manager
        if client is None:
            if not config.url:
                raise ValueError("queues.redis.url is not set")
            client = aioredis.from_url(config.url, decode_responses=True, health_check_interval=10)
        self.redis: Any = client
        self.consumer = config.consumer or default_consumer_name()
        self.dead_stream = names.dead_stream_name(config.stream, config.dead_stream)
        self.state = "starting"
        self.stats = RedisStats()
        self._jobs: dict[str, _Job] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._group_ready = False
        self._last_autoclaim = 0.0
        self._ttl_ms = max(1, int(config.result_ttl_s * 1000))
        self._publish_script = self.redis.register_script(_PUBLISH_AND_ACK)

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start consuming, keeping claims alive, and listening for cancels."""
        self._tasks = [
            watch_task(asyncio.create_task(self._consume_forever(), name="redis-consume"), log),
            watch_task(asyncio.create_task(self._keepalive_forever(), name="redis-keepalive"), log),
            watch_task(
                asyncio.create_task(self._listen_cancels_forever(), name="redis-cancels"), log
            ),
        ]
        log.info(
            "redis_consumer_started stream=%s group=%s consumer=%s",
            self.config.stream,
            self.config.group,
            self.consumer,
        )

    async def stop(self, grace_s: float) -> None:
        """Stop reading, hand back unstarted entries, let running ones finish within grace_s.

        Entries still running after ``grace_s`` stay pending (unacked): another pool claims
        them after ``claim_idle_s``.
        """
        self._stopping = True
        consume = self._tasks[0] if self._tasks else None
        if consume is not None:
            consume.cancel()
            await asyncio.gather(consume, return_exceptions=True)
        await self._return_unstarted()
        running = [j.task for j in self._jobs.values() if j.task is not None]
        if running:
            await asyncio.wait(running, timeout=max(0.0, grace_s))
        abandoned = [j.task for j in self._jobs.values() if j.task and not j.task.done()]
        for task in [*abandoned, *self._tasks[1:]]:
            task.cancel()
        await asyncio.gather(*abandoned, *self._tasks[1:], return_exceptions=True)
        self.state = "stopped"
        await self.redis.aclose()
        log.info(
            "redis_consumer_stopped stream=%s consumer=%s abandoned=%d",
            self.config.stream,
            self.consumer,
            len(abandoned),
        )

    async def _return_unstarted(self) -> None:
        """Cancel, in the manager, predictions of ours that no runner has started yet."""
        for job in list(self._jobs.values()):
            prediction = job.prediction
            if prediction is None or prediction.started_at is None:
                job.returned = True
                self.stats.returned += 1
                if prediction is not None and not prediction.done:
                    await self.manager.cancel(prediction.id)
                log.info(
                    "redis_entry_returned entry=%s prediction=%s",
                    job.entry_id,
                    job.request.id if job.request else None,
                )

    def health(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "stream": self.config.stream,
            "group": self.config.group,
            "consumer": self.consumer,
            "in_flight": len(self._jobs),
            **self.stats.as_dict(),
        }

    async def forward_cancel(self, prediction_id: str) -> None:
        """Broadcast a cancel for an id this pool does not hold (manager's cancel forwarder)."""
        await self.redis.publish(self.config.cancel_channel, prediction_id)

    # --- connection state ----------------------------------------------------------------------
    def _broker_error(self, exc: BaseException) -> None:
        self.stats.last_error = str(exc) or type(exc).__name__
        if self.state != "reconnecting":
            self.stats.reconnects += 1
            log.warning(
                "redis_disconnected stream=%s error=%r", self.config.stream, self.stats.last_error
            )
        self.state = "reconnecting"
        self._group_ready = False

    def _connected(self) -> None:
        if self.state != "connected" and not self._stopping:
            log.info("redis_connected stream=%s consumer=%s", self.config.stream, self.consumer)
            self.state = "connected"

    async def _retry(self, op: Any) -> Any:
        """Run a broker operation; on a broker error, retry it forever with backoff.

        The first try runs outside tenacity: building a retry controller per call costs more
        than the Redis round trip it guards, and almost every call succeeds.
        """
        try:
            return await op()
        except BROKER_ERRORS as e:
            self._broker_error(e)
        return await retry_forever(op, errors=BROKER_ERRORS, on_error=self._broker_error)

    # --- consuming -----------------------------------------------------------------------------
    async def _consume_forever(self) -> None:
        while not self._draining():
            if not await self._wait_free_slot():
                break
            entries = await self._retry(self._poll)
            self._connected()
            batch = [
                self._spawn(entry_id, fields, deliveries)
                for entry_id, fields, deliveries in entries
            ]
            # Read again only once this batch holds its slots, or COUNT would over-read.
            await asyncio.gather(*(job.admitted.wait() for job in batch))
        log.info("redis_consuming_stopped stream=%s consumer=%s", self.config.stream, self.consumer)

    def _draining(self) -> bool:
        return self._stopping or self.manager.shutting_down

    async def _wait_free_slot(self) -> bool:
        """Wait for a free runner slot; False when the pool is draining (take no more)."""
        try:
            while self.manager.free_slots() <= 0:
                if self._draining():
                    return False
                await self.manager.wait_for_free_slot()
        except ShuttingDown:
            return False
        return not self._draining()

    async def _poll(self) -> list[tuple[str, dict[str, str], int]]:
        """One read: stale entries of dead consumers first, then new ones, at most free slots."""
        if not self._group_ready:
            await self._ensure_group()
        free = max(1, self.manager.free_slots())
        entries = await self._autoclaim(free)
        if entries:
            return entries
        try:
            reply = await self.redis.xreadgroup(
                self.config.group,
                self.consumer,
                {self.config.stream: ">"},
                count=free,
                block=self.config.block_ms,
            )
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self._group_ready = False  # the broker lost the group (restarted without data)
            return []
        self._connected()
        return [(eid, fields, 1) for _, batch in reply or [] for eid, fields in batch]

    async def _ensure_group(self) -> None:
        try:
            # id 0: entries added before the group existed are served too.
            cfg = self.config
            await self.redis.xgroup_create(cfg.stream, cfg.group, "0", mkstream=True)
            log.info("redis_group_created stream=%s group=%s", cfg.stream, cfg.group)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    async def _autoclaim(self, count: int) -> list[tuple[str, dict[str, str], int]]:
        """Take over entries idle longer than claim_idle_s (their consumer is gone)."""
        now = time.monotonic()
        if now - self._last_autoclaim < min(self.config.claim_idle_s / 2, 5.0):
            return []
        self._last_autoclaim = now
        claimed: list[tuple[str, dict[str, str], int]] = []
        reply = await self.redis.xautoclaim(
            self.config.stream,
            self.config.group,
            self.consumer,
            min_idle_time=int(self.config.claim_idle_s * 1000),
            start_id="0-0",
            count=count,
        )
        for entry_id, fields in reply[1]:
            if entry_id in self._jobs or fields is None:
                continue
            deliveries = await self._deliveries(entry_id)
            claimed.append((entry_id, fields, deliveries))
            self.stats.claimed += 1
            log.info("redis_entry_claimed entry=%s deliveries=%d", entry_id, deliveries)
        return claimed

    async def _deliveries(self, entry_id: str) -> int:
        info = await self.redis.xpending_range(
            self.config.stream, self.config.group, min=entry_id, max=entry_id, count=1
        )
        return int(info[0]["times_delivered"]) if info else 1

    def _spawn(self, entry_id: str, fields: dict[str, str], deliveries: int) -> _Job:
        job = _Job(entry_id=entry_id, deliveries=deliveries)
        self._jobs[entry_id] = job
        self.stats.received += 1
        if deliveries > 1:
            self.stats.redeliveries += 1
        job.task = asyncio.create_task(self._run_job(job, fields), name=f"redis-job-{entry_id}")
        return job

    # --- one entry -----------------------------------------------------------------------------
    async def _run_job(self, job: _Job, fields: dict[str, str]) -> None:
        try:
            await self._handle(job, fields)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug here must not kill the consumer; the entry stays pending and is reclaimed.
            log.exception("redis_job_crashed entry=%s", job.entry_id)
        finally:
            job.admitted.set()
            self._jobs.pop(job.entry_id, None)
            if job.progress_task is not None:
                job.progress_task.cancel()

    async def _handle(self, job: _Job, fields: dict[str, str]) -> None:
        try:
            request = parse_request(
                fields.get(names.FIELD_VALUE),
                max_bytes=self.config.max_message_bytes,
                fallback_id=job.entry_id,
            )
        except Poison as p:
            await self._dead_letter(job, fields, p.reason)
            return
        job.request = request
        assert request.id is not None  # parse_request always sets one
        too_many = over_delivered(job.deliveries, self.config.max_deliveries)
        if too_many is not None:
            await self._dead_letter(job, fields, too_many)
            return
        recorded = await self._retry(lambda: self.redis.get(self._result_key(request.id)))
        if recorded is not None:
            log.info("redis_result_republished entry=%s prediction=%s", job.entry_id, request.id)
            self.stats.republished += 1
            await self._publish_and_ack(job, request, recorded, republish=True)
            return
        prediction = await self._submit(job, request, fields)
        if prediction is None or job.returned:
            return
        await prediction.wait()
        await self._finished(job, request, prediction, fields)

    async def _submit(
        self, job: _Job, request: PredictionRequest, fields: dict[str, str]
    ) -> Prediction | None:
        while True:
            if job.returned:
                return None  # handed back by shutdown while we looked up the recorded result
            try:
                prediction: Prediction = await self.manager.submit(request, source="redis")
                break
            except InvalidRequest as e:
                reason = f"{names.REASON_INVALID_REQUEST}: {e}"
                await self._dead_letter(job, fields, reason)
                return None
            except RETRY_LATER as e:
                job.admitted.set()  # no slot to take: the consume loop waits for one anyway
                log.info("redis_submit_deferred entry=%s error=%r", job.entry_id, str(e))
                if not await self._wait_free_slot():
                    job.returned = True  # left pending for another pool
                    return None
        if job.returned:
            # Handed back by shutdown while submit() ran (e.g. a file download): another pool
            # runs the entry, so this copy must not run here with nobody to publish it.
            log.info("redis_submit_undone entry=%s prediction=%s", job.entry_id, prediction.id)
            await self.manager.cancel(prediction.id)
            return None
        job.prediction = prediction
        job.admitted.set()
        if self.config.publish_progress:
            prediction.add_listener(lambda p, event: self._on_progress(job, event))
        log.debug(
            "redis_prediction_submitted entry=%s prediction=%s deliveries=%d",
            job.entry_id,
            prediction.id,
            job.deliveries,
        )
        return prediction

    async def _finished(
        self,
        job: _Job,
        request: PredictionRequest,
        prediction: Prediction,
        fields: dict[str, str],
    ) -> None:
        if job.returned:
            return
        if self._draining() and shutdown_casualty(prediction):
            # Canceled or failed by this pool's shutdown, not by the model: leave it pending
            # so another pool runs it.
            job.returned = True
            log.info("redis_entry_returned entry=%s prediction=%s", job.entry_id, prediction.id)
            return
        if runner_died(prediction):
            reason = after_runner_died(
                prediction, deliveries=job.deliveries, max_deliveries=self.config.max_deliveries
            )
            if reason is not None:
                await self._dead_letter(job, fields, reason)
            else:
                # Left pending and no longer kept claimed: after claim_idle_s any pool takes it
                # over (XAUTOCLAIM counts the delivery) and runs it again.
                log.warning(
                    "redis_entry_left_for_redelivery entry=%s prediction=%s error=%r",
                    job.entry_id,
                    prediction.id,
                    prediction.error,
                )
            return
        value = json.dumps(prediction.to_dict(), separators=(",", ":"), default=str)
        await self._publish_and_ack(job, request, value, republish=False)
        self.stats.completed += 1
        log.debug(
            "redis_prediction_completed entry=%s prediction=%s status=%s",
            job.entry_id,
            prediction.id,
            prediction.status,
        )

    # --- results and dead letters --------------------------------------------------------------
    def _result_key(self, prediction_id: str) -> str:
        return names.result_key(self.config.stream, prediction_id)

    def _reply_streams(self, request: PredictionRequest) -> list[str]:
        streams = [self.config.results_stream]
        reply_to = request.extra.get("reply_to")
        if isinstance(reply_to, str) and reply_to and reply_to not in streams:
            streams.append(reply_to)
        return streams

    async def _publish_and_ack(
        self, job: _Job, request: PredictionRequest, value: str, *, republish: bool
    ) -> None:
        """Publish the terminal result, record it, ack the entry: all or nothing, one trip.

        One Lua script (``_PUBLISH_AND_ACK``) does all three, atomically on the server (no
        MULTI/WATCH round trips): if another pool recorded this id while we ran it (it took
        over our entry while we were cut off), the script only acks, so the id is published
        once; a republish sends the recorded result again, then acks.
        """
        assert request.id is not None
        keys = [self._result_key(request.id), self.config.stream, *self._reply_streams(request)]
        args = [
            self.config.group,
            job.entry_id,
            request.id,
            value,
            self._ttl_ms,
            1 if republish else 0,
            names.FIELD_ID,
            names.FIELD_EVENT,
            names.FIELD_VALUE,
            EVENT_COMPLETED,
        ]
        await self._retry(lambda: self._publish_script(keys=keys, args=args))
        self._connected()

    async def _dead_letter(self, job: _Job, fields: dict[str, str], reason: str) -> None:
        """Move the entry to the dead-letter stream with the reason and ack it, in one
        MULTI/EXEC transaction (no result is involved, so nothing to guard with a script)."""

        async def attempt() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(
                    self.dead_stream,
                    {
                        **fields,
                        names.FIELD_REASON: reason,
                        names.FIELD_ORIGINAL_ID: job.entry_id,
                    },
                )
                pipe.xack(self.config.stream, self.config.group, job.entry_id)
                await pipe.execute()

        await self._retry(attempt)
        self.stats.dead_lettered += 1
        log.warning(
            "redis_dead_lettered entry=%s dead_stream=%s reason=%r",
            job.entry_id,
            self.dead_stream,
            reason,
        )

    # --- progress ------------------------------------------------------------------------------
    def _on_progress(self, job: _Job, event: str) -> None:
        if event == EVENT_COMPLETED or job.returned:
            return
        job.progress_dirty = True
        if job.progress_task is None or job.progress_task.done():
            job.progress_task = asyncio.create_task(self._publish_progress(job, event))

    async def _publish_progress(self, job: _Job, event: str) -> None:
        """Publish the latest state at most every PROGRESS_THROTTLE_S (latest state wins)."""
        while job.progress_dirty and job.prediction is not None and not job.prediction.done:
            job.progress_dirty = False
            assert job.request is not None
            value = json.dumps(job.prediction.to_dict(), separators=(",", ":"), default=str)
            try:
                for stream in self._reply_streams(job.request):
                    await self.redis.xadd(
                        stream,
                        {
                            names.FIELD_ID: job.prediction.id,
                            names.FIELD_EVENT: event,
                            names.FIELD_VALUE: value,
                        },
                    )
            except BROKER_ERRORS as e:
                self._broker_error(e)  # progress is best effort; the terminal result is not
            await asyncio.sleep(PROGRESS_THROTTLE_S)

    # --- keeping claims, watching the backlog --------------------------------------------------
    async def _keepalive_forever(self) -> None:
        interval_s = max(0.05, min(self.config.claim_idle_s / 3, 10.0))
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._keep_claims()
                await self._refresh_backlog()
            except BROKER_ERRORS as e:
                self._broker_error(e)
            except ResponseError as e:
                log.warning("redis_keepalive_failed error=%r", str(e))

    async def _keep_claims(self) -> None:
        """Reset the idle time of entries we are running, so no other pool takes them over."""
        ids = [
            j.entry_id
            for j in self._jobs.values()
            if j.prediction is not None and not j.prediction.done and not j.returned
        ]
        if ids:
            await self.redis.xclaim(
                self.config.stream, self.config.group, self.consumer, 0, ids, justid=True
            )

    async def _refresh_backlog(self) -> None:
        for group in await self.redis.xinfo_groups(self.config.stream):
            if group.get("name") == self.config.group:
                self.stats.pending = int(group.get("pending") or 0)
                lag = group.get("lag")
                self.stats.lag = int(lag) if lag is not None else None
        self._connected()

    # --- cancels from other pools --------------------------------------------------------------
    async def _listen_cancels_forever(self) -> None:
        while True:
            try:
                await self._listen_cancels()
            except BROKER_ERRORS as e:
                self._broker_error(e)
                await asyncio.sleep(1.0)  # the consume loop owns the backoff and the state

    async def _listen_cancels(self) -> None:
        async with self.redis.pubsub() as pubsub:
            await pubsub.subscribe(self.config.cancel_channel)
            async for message in pubsub.listen():
                if message.get("type") != "message":
                    continue
                prediction_id = message.get("data")
                # Only ids held here: cancel() forwards unknown ids, which would echo forever.
                if isinstance(prediction_id, str) and self.manager.get(prediction_id) is not None:
                    log.info("redis_cancel_received prediction=%s", prediction_id)
                    await self.manager.cancel(prediction_id)
