"""Redis Streams driver: one consumer group per deployment, one consumer per pool.

It only fetches, acks, hands back, dead-letters, publishes, keeps claims and trims; the
delivery core (``ingest/core.py``) decides what happens to each entry. Delivery rules
(DESIGN §5):

- pull only what can run: ``XREADGROUP COUNT <free slots>``; entries are read as bytes and
  decoded per entry, so one entry that is not UTF-8 is dead-lettered, not fatal to the read;
- the terminal result is published, recorded, acked (and the entry deleted) by ONE Lua
  script, which Redis runs atomically. It checks every stream it writes to before writing
  anything (Redis does not roll a script back), and publishes only when no result is recorded
  for the id yet, so an id is published at most once even when two pools ran it;
- ``reply_to`` must be a key under ``reply_to_prefix`` that is a stream or absent;
- entries of dead consumers are taken over with ``XAUTOCLAIM`` after ``claim_idle_s``, its
  cursor walked across calls; a live consumer keeps every entry it holds claimed (from
  delivery on, also while its inputs download or it waits for a slot) with ``XCLAIM JUSTID``
  every third of ``claim_idle_s``;
- results, reply and progress streams are capped at ``results_maxlen``, the dead letters at
  ``dead_maxlen``; acked request entries are deleted (``delete_acked``);
- on shutdown, entries not started are handed back (left pending, unacked) for other pools.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import math
import os
import socket
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ingest import names
from ingest.backoff import retry_forever, watch_task
from ingest.core import ConsumerStats, Delivery, DeliveryCore, Job, ResultValue, result_value
from ingest.messages import Poison
from ingest.port import Manager
from ingest.resp import LeanRedis, supports
from pool.config import RedisConfig
from pool.prediction import EVENT_COMPLETED, PredictionRequest

__all__ = ["RedisConsumer", "default_consumer_name"]

log = logging.getLogger(__name__)

# Broker-transient: the connection is gone, or the server refuses writes for now.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,  # BusyLoadingError (a restart loading its AOF) is one of these
    RedisTimeoutError,
    ReadOnlyError,  # a replica that has not been promoted yet
    ConnectionError,
    OSError,
)
PROGRESS_THROTTLE_S = 0.5
BACKLOG_REFRESH_S = 1.0
AUTOCLAIM_PAGES = 10  # XAUTOCLAIM calls per poll at most (each scans 10 x COUNT entries)

# KEYS: result key, request stream, reply streams...
# ARGV: group, entry id, prediction id, result JSON, ttl ms, republish (0/1), the id/event/value
# field names, the event name, results maxlen, delete acked (0/1).
# Returns {0|1 (1: a result was recorded already)} or {-1, key, type} when a reply stream is
# not a stream: then nothing at all was written.
_PUBLISH_AND_ACK = """
for i = 3, #KEYS do
  local t = redis.call('TYPE', KEYS[i])['ok']
  if t ~= 'stream' and t ~= 'none' then
    return {-1, KEYS[i], t}
  end
end
local recorded = redis.call('GET', KEYS[1])
if (not recorded) or ARGV[6] == '1' then
  local value = recorded or ARGV[4]
  for i = 3, #KEYS do
    redis.call('XADD', KEYS[i], 'MAXLEN', ARGV[11], '*',
               ARGV[7], ARGV[3], ARGV[8], ARGV[10], ARGV[9], value)
  end
end
if not recorded then
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[5])
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
if ARGV[12] == '1' then
  redis.call('XDEL', KEYS[2], ARGV[2])
end
return {recorded and 1 or 0}
"""


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclasses.dataclass
class RedisStats(ConsumerStats):
    claimed: int = 0
    pending: int | None = None
    lag: int | None = None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisConsumer:
    """Feeds one Redis stream into the pool manager and publishes terminal results."""

    source = "redis"

    def __init__(
        self, config: RedisConfig, manager: Manager, *, client: Any = None, raw: Any = None
    ) -> None:
        self.config = config
        self.manager = manager
        # The hot path (read, idempotency GET, publish script) goes over lean pipelined
        # connections (ingest/resp.py): reads on their own, as XREADGROUP blocks.
        self.lean: LeanRedis | None = None
        self.lean_reads: LeanRedis | None = None
        if client is None:
            if not config.url:
                raise ValueError("queues.redis.url is not set")
            client = aioredis.from_url(config.url, decode_responses=True, health_check_interval=10)
            raw = aioredis.from_url(config.url, decode_responses=False, health_check_interval=10)
            if supports(config.url):
                self.lean = LeanRedis(config.url)
                self.lean_reads = LeanRedis(config.url)
        self.redis: Any = client
        # Entries are read undecoded: a field that is not UTF-8 is poison for its entry only.
        self.raw: Any = raw if raw is not None else client
        self.consumer = config.consumer or default_consumer_name()
        self.dead_stream = names.dead_stream_name(config.stream, config.dead_stream)
        self.reply_prefix = config.reply_to_prefix or names.default_reply_prefix(config.stream)
        self.max_deliveries = config.max_deliveries
        self.max_message_bytes = config.max_message_bytes
        self.state = "starting"
        self.stats = RedisStats()
        self.core = DeliveryCore(self, manager, self.stats, log)
        self._tasks: list[asyncio.Task[None]] = []
        self._group_ready = False
        self._last_autoclaim = 0.0
        self._autoclaim_cursor = "0-0"
        self._last_backlog = 0.0
        self._ttl_ms = max(1, int(config.result_ttl_s * 1000))
        self._publish_script = self.redis.register_script(_PUBLISH_AND_ACK)
        self._publish_sha = self.lean.register_script(_PUBLISH_AND_ACK) if self.lean else ""
        self._progress: dict[str, asyncio.Task[None]] = {}

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start consuming, keeping claims alive, and listening for cancels."""
        self._tasks = [
            watch_task(
                asyncio.create_task(self._consume_forever(), name="redis-consume"),
                log,
                on_crash=self._crashed,
            ),
            watch_task(
                asyncio.create_task(self._keepalive_forever(), name="redis-keepalive"),
                log,
                on_crash=self._crashed,
            ),
            watch_task(
                asyncio.create_task(self._listen_cancels_forever(), name="redis-cancels"),
                log,
                on_crash=self._crashed,
            ),
        ]
        log.info(
            "redis_consumer_started stream=%s group=%s consumer=%s",
            self.config.stream,
            self.config.group,
            self.consumer,
        )

    def _crashed(self, exc: BaseException) -> None:
        # A task that died is a bug: health must say so, never keep saying "connected".
        self.state = "failed"
        self.stats.last_error = f"{type(exc).__name__}: {exc}"

    async def stop(self, grace_s: float) -> None:
        """Stop reading, hand back unstarted entries, let running ones finish within grace_s.

        Entries still running after ``grace_s`` stay pending (unacked): another pool claims
        them after ``claim_idle_s``.
        """
        self.core.stopping = True
        consume = self._tasks[0] if self._tasks else None
        if consume is not None:
            consume.cancel()
            await asyncio.gather(consume, return_exceptions=True)
        abandoned = await self.core.stop(grace_s)
        for task in [*self._tasks[1:], *self._progress.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks[1:], *self._progress.values(), return_exceptions=True)
        self.state = "stopped"
        await self.redis.aclose()
        if self.raw is not self.redis:
            await self.raw.aclose()
        for lean in (self.lean, self.lean_reads):
            if lean is not None:
                await lean.aclose()
        log.info(
            "redis_consumer_stopped stream=%s consumer=%s abandoned=%d",
            self.config.stream,
            self.consumer,
            abandoned,
        )

    def health(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "stream": self.config.stream,
            "group": self.config.group,
            "consumer": self.consumer,
            **self.core.counts(),
            **self.stats.as_dict(),
        }

    async def forward_cancel(self, prediction_id: str) -> None:
        """Broadcast a cancel for an id this pool does not hold (manager's cancel forwarder)."""
        await self.redis.publish(self.config.cancel_channel, prediction_id)

    # --- connection state ------------------------------------------------------------------------
    def _broker_error(self, exc: BaseException) -> None:
        """Any task lost the broker: the state says so at once (a consume loop blocked behind
        a batch would not notice); the first error of an outage counts one reconnect. (The
        client retries a stale pooled connection itself, so errors mean a real outage.)"""
        self.stats.last_error = str(exc) or type(exc).__name__
        self.stats.pending = self.stats.lag = None  # unknown until connected again
        self._group_ready = False
        if self.state == "connected":
            self.stats.reconnects += 1
            log.warning(
                "redis_disconnected stream=%s error=%r", self.config.stream, self.stats.last_error
            )
        if self.state != "failed":
            self.state = "reconnecting"

    _side_error = _broker_error

    async def _connected(self) -> None:
        if self.state in ("starting", "reconnecting") and not self.core.stopping:
            if self.state == "reconnecting":
                # Idle pooled connections opened before the outage are dead (the server
                # restarted) and would each fail once more on their next use, which would
                # read as new outages: drop them now, the pool opens fresh ones.
                for client in {id(self.redis): self.redis, id(self.raw): self.raw}.values():
                    await client.connection_pool.disconnect(inuse_connections=False)
            log.info("redis_connected stream=%s consumer=%s", self.config.stream, self.consumer)
            self.state = "connected"

    async def _retry(self, op: Any) -> Any:
        """A broker operation of a job; broker errors are retried forever with backoff (the
        entry stays pending to this consumer across a reconnect).

        The first try runs outside tenacity: building a retry controller per call costs more
        than the Redis round trip it guards, and almost every call succeeds.
        """
        try:
            return await op()
        except BROKER_ERRORS as e:
            self._side_error(e)
        result = await retry_forever(op, errors=BROKER_ERRORS, on_error=self._side_error)
        await self._connected()
        return result

    # --- consuming -----------------------------------------------------------------------------
    async def _consume_forever(self) -> None:
        while not self.core.draining():
            room = await self._wait_room()
            if room <= 0:
                break
            try:
                entries = await self._poll(room)
            except BROKER_ERRORS as e:
                self._broker_error(e)
                entries = await retry_forever(
                    lambda: self._poll(self._room()),
                    errors=BROKER_ERRORS,
                    on_error=self._broker_error,
                )
            await self._connected()
            for d in entries:
                self.core.deliver(d)  # held from here on: counted against the room at once
            await self._refresh_backlog_now_and_then()
        log.info("redis_consuming_stopped stream=%s consumer=%s", self.config.stream, self.consumer)

    def _room(self) -> int:
        """Entries to read now: the free slots, plus ``read_ahead_per_slot`` per slot to wait
        parsed and checked behind the busy ones, less the entries already held here."""
        ahead = self.config.read_ahead_per_slot * self.core.slot_capacity()
        return self.manager.free_slots() + ahead - self.core.held_count()

    async def _wait_room(self) -> int:
        """Wait until there is room to read; 0 when the pool is draining (take no more)."""
        while not self.core.draining():
            room = self._room()
            if room > 0:
                return room
            await self.core.wait_room_or_stop()
        return 0

    async def _poll(self, count: int) -> list[Delivery]:
        """One read: stale entries of dead consumers first, then new ones, at most ``count``."""
        if not self._group_ready:
            await self._ensure_group()
        count = max(1, count)
        entries = await self._autoclaim(count)
        if entries:
            return entries
        try:
            reply = await self._xreadgroup(count)
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self._group_ready = False  # the broker lost the group (restarted without data)
            return []
        return [
            self._delivery(_text(eid), fields, 1)
            for _, batch in reply or []
            for eid, fields in batch
        ]

    async def _xreadgroup(self, count: int) -> Any:
        cfg = self.config
        if self.lean_reads is None:
            return await self.raw.xreadgroup(
                cfg.group, self.consumer, {cfg.stream: ">"}, count=count, block=cfg.block_ms
            )
        reply = await self.lean_reads.execute(
            "XREADGROUP", "GROUP", cfg.group, self.consumer, "COUNT", count,
            "BLOCK", cfg.block_ms, "STREAMS", cfg.stream, ">",
            # BLOCK 0 waits for good; otherwise the server answers within block_ms.
            timeout_s=math.inf if cfg.block_ms == 0 else cfg.block_ms / 1000 + 30.0,
        )  # fmt: skip
        # RESP2: [[stream, [[id, [field, value, ...]], ...]]]; redis-py's shape is the same
        # with each entry's fields as a dict.
        return [
            (stream, [(eid, _pairs(flat)) for eid, flat in entries])
            for stream, entries in reply or []
        ]

    def _delivery(self, entry_id: str, fields: dict[Any, Any], deliveries: int) -> Delivery:
        value = fields.get(b"value", fields.get(names.FIELD_VALUE))
        return Delivery(
            key=entry_id,
            body=value,
            deliveries=deliveries,
            fallback_id=entry_id,
            redelivered=deliveries > 1,
            meta=fields,
        )

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

    async def _autoclaim(self, count: int) -> list[Delivery]:
        """Take over entries idle longer than claim_idle_s (their consumer is gone).

        The cursor is walked across calls (XAUTOCLAIM scans a bounded window per call): a
        dead consumer's entries behind many live ones are reached too.
        """
        now = time.monotonic()
        if now - self._last_autoclaim < min(self.config.claim_idle_s / 2, 5.0):
            return []
        claimed: list[Delivery] = []
        for _ in range(AUTOCLAIM_PAGES):
            if len(claimed) >= count:
                break
            reply = await self.raw.xautoclaim(
                self.config.stream,
                self.config.group,
                self.consumer,
                min_idle_time=int(self.config.claim_idle_s * 1000),
                start_id=self._autoclaim_cursor,
                count=count - len(claimed),
            )
            cursor = _text(reply[0])
            for raw_id, fields in reply[1]:
                entry_id = _text(raw_id)
                if entry_id in self.core.jobs or fields is None:
                    continue
                deliveries = await self._deliveries(entry_id)
                claimed.append(self._delivery(entry_id, fields, deliveries))
                self.stats.claimed += 1
                log.info("redis_entry_claimed entry=%s deliveries=%d", entry_id, deliveries)
            self._autoclaim_cursor = cursor
            if cursor == "0-0":  # a full pass over the pending entries is done
                self._last_autoclaim = now
                break
        return claimed

    async def _deliveries(self, entry_id: str) -> int:
        info = await self.redis.xpending_range(
            self.config.stream, self.config.group, min=entry_id, max=entry_id, count=1
        )
        return int(info[0]["times_delivered"]) if info else 1

    # --- the Driver the core calls -------------------------------------------------------------
    def valid(self, delivery: Delivery) -> bool:
        return True  # an entry stays pending to this consumer across reconnects

    async def count_delivery(self, delivery: Delivery, prediction_id: str) -> int:
        return delivery.deliveries

    def _reply_to(self, request: PredictionRequest) -> str | None:
        reply_to = request.extra.get("reply_to")
        if reply_to is None or reply_to == "":
            return None
        if not isinstance(reply_to, str):
            raise Poison(f"{names.REASON_INVALID_REPLY_TO}: must be a string, got {reply_to!r}")
        return reply_to

    async def check_reply_to(self, delivery: Delivery, request: PredictionRequest) -> None:
        reply_to = self._reply_to(request)
        if reply_to is None:
            return
        if not reply_to.startswith(self.reply_prefix):
            raise Poison(
                f"{names.REASON_INVALID_REPLY_TO}: {reply_to!r} is not under the allowed "
                f"prefix {self.reply_prefix!r} (queues.redis.reply_to_prefix)"
            )
        kind = await self._retry(lambda: self.redis.type(reply_to))
        if kind not in ("stream", "none"):
            raise Poison(_not_a_stream(reply_to, kind))

    def _reply_streams(self, request: PredictionRequest) -> list[str]:
        streams = [self.config.results_stream]
        reply_to = request.extra.get("reply_to")
        if isinstance(reply_to, str) and reply_to and reply_to not in streams:
            streams.append(reply_to)
        return streams

    def _result_key(self, prediction_id: str) -> str:
        return names.result_key(self.config.stream, prediction_id)

    async def recorded(self, prediction_id: str) -> str | None:
        key = self._result_key(prediction_id)
        if self.lean is None:
            value = await self._retry(lambda: self.redis.get(key))
            return str(value) if value is not None else None
        lean = self.lean
        raw = await self._retry(lambda: lean.get(key))
        return raw.decode("utf-8") if raw is not None else None

    async def publish(
        self,
        delivery: Delivery,
        request: PredictionRequest,
        value: ResultValue,
        *,
        republish: bool,
    ) -> None:
        """Publish the terminal result, record it, ack the entry: all or nothing, one trip.

        One Lua script (``_PUBLISH_AND_ACK``) does all of it atomically on the server: if
        another pool recorded this id while we ran it (it took over our entry while we were cut
        off), the script only acks, so the id is published once; a republish sends the
        recorded result again (a producer re-sent the id), then acks.
        """
        assert request.id is not None
        keys = [self._result_key(request.id), self.config.stream, *self._reply_streams(request)]
        args = [
            self.config.group,
            delivery.key,
            request.id,
            value,
            self._ttl_ms,
            1 if republish else 0,
            names.FIELD_ID,
            names.FIELD_EVENT,
            names.FIELD_VALUE,
            EVENT_COMPLETED,
            self.config.results_maxlen,
            1 if self.config.delete_acked else 0,
        ]
        if self.lean is None:
            reply = await self._retry(lambda: self._publish_script(keys=keys, args=args))
        else:
            lean, sha = self.lean, self._publish_sha
            reply = await self._retry(lambda: lean.evalsha(sha, keys, args))
        if reply and int(reply[0]) == -1:
            raise Poison(_not_a_stream(_text(reply[1]), _text(reply[2])))

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move the entry to the dead-letter stream with the reason and ack it, in one
        MULTI/EXEC transaction (the original fields are copied byte for byte)."""
        fields = _utf8_fields(delivery.meta or {})
        fields[names.FIELD_REASON] = reason
        fields[names.FIELD_ORIGINAL_ID] = delivery.key

        async def attempt() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(
                    self.dead_stream, fields, maxlen=self.config.dead_maxlen, approximate=False
                )
                pipe.xack(self.config.stream, self.config.group, delivery.key)
                if self.config.delete_acked:
                    pipe.xdel(self.config.stream, delivery.key)
                await pipe.execute()

        await self._retry(attempt)

    async def give_back(self, delivery: Delivery) -> None:
        # Left pending and no longer kept claimed (the job leaves the core): after
        # claim_idle_s another pool takes it over (XAUTOCLAIM counts the delivery).
        return None

    def submitted(self, job: Job) -> None:
        if self.config.publish_progress and job.prediction is not None:
            job.prediction.add_listener(lambda p, event: self._on_progress(job, event))

    # --- progress ------------------------------------------------------------------------------
    def _on_progress(self, job: Job, event: str) -> None:
        key = job.delivery.key
        if event == EVENT_COMPLETED or job.returned:
            return
        task = self._progress.get(key)
        if task is None or task.done():
            self._progress[key] = asyncio.create_task(self._publish_progress(job, event))

    async def _publish_progress(self, job: Job, event: str) -> None:
        """Publish the latest state, then at most every PROGRESS_THROTTLE_S (latest wins)."""
        prediction, request = job.prediction, job.request
        if prediction is None or request is None or prediction.done:
            self._progress.pop(job.delivery.key, None)
            return
        prediction.hold_output()  # a file output it shows is read while this builds
        try:
            value = await result_value(prediction)
            for stream in self._reply_streams(request):
                await self.redis.xadd(
                    stream,
                    {
                        names.FIELD_ID: prediction.id,
                        names.FIELD_EVENT: event,
                        names.FIELD_VALUE: value,
                    },
                    maxlen=self.config.results_maxlen,
                    approximate=False,
                )
            await asyncio.sleep(PROGRESS_THROTTLE_S)
        except BROKER_ERRORS as e:
            self._side_error(e)  # progress is best effort; the terminal result is not
        except ResponseError as e:  # e.g. reply_to turned into another type meanwhile
            self.stats.last_error = str(e)
        finally:
            prediction.release_output()
            self._progress.pop(job.delivery.key, None)

    # --- keeping claims, watching the backlog --------------------------------------------------
    async def _keepalive_forever(self) -> None:
        interval_s = max(0.05, min(self.config.claim_idle_s / 3, 10.0))
        # Not `while True`: the Redis client can turn a cancel that lands inside a command into
        # a ConnectionError, which is caught below; the flag still ends the loop.
        while not self.core.stopping:
            await asyncio.sleep(interval_s)
            try:
                await self._keep_claims()
                await self._refresh_backlog()
            except BROKER_ERRORS as e:
                self._side_error(e)
            except ResponseError as e:
                log.warning("redis_keepalive_failed error=%r", str(e))

    async def _keep_claims(self) -> None:
        """Reset the idle time of every entry held here, from delivery on (also while its
        inputs download or it waits for a slot), so no other pool takes it over."""
        ids = [key for key, job in self.core.jobs.items() if not job.returned]
        if ids:
            await self.redis.xclaim(
                self.config.stream, self.config.group, self.consumer, 0, ids, justid=True
            )

    async def _refresh_backlog_now_and_then(self) -> None:
        if time.monotonic() - self._last_backlog >= BACKLOG_REFRESH_S:
            try:
                await self._refresh_backlog()
            except BROKER_ERRORS as e:
                self._side_error(e)
            except ResponseError as e:  # e.g. the stream was deleted under us
                self.stats.last_error = str(e)

    async def _refresh_backlog(self) -> None:
        self._last_backlog = time.monotonic()
        for group in await self.redis.xinfo_groups(self.config.stream):
            if group.get("name") == self.config.group:
                self.stats.pending = int(group.get("pending") or 0)
                lag = group.get("lag")
                self.stats.lag = int(lag) if lag is not None else None

    # --- cancels from other pools --------------------------------------------------------------
    async def _listen_cancels_forever(self) -> None:
        while not self.core.stopping:  # see _keepalive_forever
            try:
                await self._listen_cancels()
            except BROKER_ERRORS as e:
                # Recorded only: the subscription's long-lived connection reports a restart
                # late (when it next reads), after the other tasks saw the outage and the
                # recovery; counting it would make one outage two.
                self.stats.last_error = str(e) or type(e).__name__
                log.info("redis_cancel_listener_reconnecting error=%r", self.stats.last_error)
                await asyncio.sleep(1.0)

    async def _listen_cancels(self) -> None:
        async with self.redis.pubsub() as pubsub:
            await pubsub.subscribe(self.config.cancel_channel)
            async for message in pubsub.listen():
                if message.get("type") != "message":
                    continue
                prediction_id = message.get("data")
                if isinstance(prediction_id, str):
                    await self.core.cancel_local(prediction_id)


def _pairs(flat: list[Any] | None) -> dict[Any, Any]:
    """An entry's flat field list as a dict (None: an entry deleted while pending)."""
    if not flat:
        return {}
    return dict(zip(flat[::2], flat[1::2], strict=False))


def _utf8_fields(raw: dict[Any, Any]) -> dict[str, str]:
    """The entry's fields for its dead letter, all valid UTF-8 so that any reader can decode
    the dead stream: a value that is not UTF-8 travels base64-encoded as ``<field>_base64``
    (lossless); a key that is not UTF-8 is shown with backslash escapes."""
    reserved = {names.FIELD_REASON, names.FIELD_ORIGINAL_ID}
    out: dict[str, str] = {}
    for key, value in raw.items():
        name = key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else str(key)
        if name in reserved:
            continue
        if isinstance(value, bytes):
            try:
                out[name] = value.decode("utf-8")
            except UnicodeDecodeError:
                out[f"{name}{names.FIELD_BASE64_SUFFIX}"] = base64.b64encode(value).decode()
        else:
            out[name] = str(value)
    return out


def _not_a_stream(key: str, kind: str) -> str:
    return f"{names.REASON_INVALID_REPLY_TO}: {key!r} is a {kind}, not a stream"
