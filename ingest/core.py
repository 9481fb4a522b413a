"""The delivery core both queue drivers share (DESIGN §5).

One message goes: delivery → parse → idempotency → submit → wait → settle (publish, record,
ack / hand back / dead-letter). A driver (``ingest/redis.py``, ``ingest/amqp.py``) only
fetches, acks, hands back, dead-letters, publishes, keeps claims and trims; every decision
is made here, once, for both brokers.

The error taxonomy, each class with one handling:

- **broker-transient** (:class:`BrokerLost`): the delivery can no longer be settled on this
  connection (AMQP). The job is dropped; the broker redelivers the message, and the redelivery
  finds the recorded result or reruns it. (A Redis entry survives a reconnect, so the Redis
  driver retries its broker operations instead and never raises this.)
- **store-transient** (:class:`StoreUnavailable`): the idempotency store is out of reach. The
  operation is retried with capped backoff for as long as the job holds its message; never
  counted as a delivery, never dead-lettered.
- **poison** (:class:`~ingest.messages.Poison`): the message can never run or be answered
  (not UTF-8, invalid JSON or request, non-finite numbers, lone surrogates, a bad
  ``reply_to``, delivered too many times). Dead-lettered with the reason, then acked.
- **runtime-lost** (:data:`~ingest.port.End.RUNTIME_LOST`): the prediction's runner died under
  it. Handed back for another delivery; dead-lettered once ``max_deliveries`` is reached.
- **bug**: any other exception. Logged with its traceback and dead-lettered with the reason
  ``internal error: ...``, so one message can never stop intake or loop forever.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from ingest import names
from ingest.backoff import retry_forever
from ingest.messages import RETRY_LATER, Poison, after_runner_died, over_delivered, parse_request
from ingest.port import End, Manager, PredictionView, end_of
from pool.aio import wait_first
from pool.errors import InvalidRequest
from pool.jsonstream import LargeValue, dumps_bytes, is_large
from pool.prediction import PredictionRequest

__all__ = [
    "BrokerLost",
    "ConsumerStats",
    "Delivery",
    "DeliveryCore",
    "Driver",
    "Job",
    "ResultValue",
    "StoreUnavailable",
    "result_json",
    "result_value",
]

T = TypeVar("T")


class BrokerLost(Exception):
    """Broker-transient: this delivery's connection or channel is gone (the broker redelivers)."""


class StoreUnavailable(Exception):
    """Store-transient: the result store cannot be reached right now (retried)."""


@dataclasses.dataclass
class ConsumerStats:
    """Counters every queue consumer keeps; each driver adds its broker's own."""

    received: int = 0
    completed: int = 0
    republished: int = 0
    deduplicated: int = 0  # redeliveries whose result was already published: acked only
    dead_lettered: int = 0
    redeliveries: int = 0
    returned: int = 0
    reconnects: int = 0
    store_errors: int = 0
    bugs: int = 0
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Delivery:
    """One message as a driver hands it to the core."""

    key: str  # unique among the messages the driver holds (entry id, generation:tag)
    body: bytes | str | None
    deliveries: int  # 1 on the first delivery
    fallback_id: str  # prediction id when the body has none (stable across redeliveries)
    redelivered: bool = False
    meta: Any = None  # the driver's own handle (fields, the aio-pika message, ...)
    poison: str | None = None  # the driver found it unusable already: dead-letter, why


@dataclasses.dataclass
class Job:
    """A delivery the core holds, from delivery to settle (or hand-back)."""

    delivery: Delivery
    seq: int = 0  # delivery order within its core
    request: PredictionRequest | None = None
    prediction: PredictionView | None = None
    returned: bool = False  # handed back (shutdown): never publish, never ack
    task: asyncio.Task[None] | None = None
    # Set once the message no longer waits to be handed to the manager (submitted, settled
    # or given up): until then it is about to take a slot the manager still shows free.
    admitted: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    # While it waits in line: resolved when it may go (or must look at itself again).
    turn: asyncio.Future[None] | None = None

    @property
    def held(self) -> bool:
        """Delivered, not (yet) a prediction in the manager."""
        return self.prediction is None


def _by_seq(job: Job) -> int:
    return job.seq


class Driver(Protocol):
    """What the core needs from a broker. Every method settles or inspects one delivery."""

    source: str  # the prediction's source ("redis", "amqp")
    max_deliveries: int
    max_message_bytes: int

    def valid(self, delivery: Delivery) -> bool:
        """False once the delivery can no longer be acked (its connection is gone)."""
        ...

    async def count_delivery(self, delivery: Delivery, prediction_id: str) -> int: ...
    async def check_reply_to(self, delivery: Delivery, request: PredictionRequest) -> None:
        """Raise Poison when the message's reply_to may not or cannot be answered."""
        ...

    async def recorded(self, prediction_id: str) -> ResultValue | None: ...
    async def publish(
        self,
        delivery: Delivery,
        request: PredictionRequest,
        value: ResultValue,
        *,
        republish: bool,
    ) -> None:
        """Publish the terminal result at most once per id, record it, ack the delivery.
        Poison when the reply target refuses it (nothing published then)."""
        ...

    async def dead_letter(self, delivery: Delivery, reason: str) -> None: ...
    async def give_back(self, delivery: Delivery) -> None: ...
    def submitted(self, job: Job) -> None:
        """The job's prediction exists now (progress publishing hooks in here)."""
        ...


ResultValue = str | bytes
"""A recorded or published result: the terminal prediction's JSON text (UTF-8 bytes when it
was built off the loop)."""

_COMPACT = (",", ":")
OFF_LOOP_PARSE_BYTES = 256 * 1024
"""A message body larger than this is parsed in a worker thread."""
OFF_LOOP_RESULT_CHARS = 1 << 20
"""A result whose strings add up to more than this is built in a worker thread."""


def _default(value: Any) -> Any:
    return value.text() if isinstance(value, LargeValue) else str(value)


def result_json(prediction: PredictionView) -> str:
    """The prediction's JSON text, at once (a small one)."""
    return json.dumps(prediction.to_dict(), separators=_COMPACT, default=_default)


async def result_value(prediction: PredictionView) -> ResultValue:
    """The prediction's JSON text; a large one (a 100 MB output, a file output kept on disk)
    is built once, as UTF-8 bytes, in a worker thread, a slice at a time
    (:func:`pool.jsonstream.dumps_bytes`): the broker takes one whole body, but the loop
    never runs one C call over it, and no str copy of it is made beside the bytes."""
    body = prediction.to_dict()
    if not is_large(body, OFF_LOOP_RESULT_CHARS):
        return json.dumps(body, separators=_COMPACT, default=_default)
    return await asyncio.to_thread(dumps_bytes, body, separators=_COMPACT)


class DeliveryCore:
    """Runs each delivered message to exactly one settle, for one driver and one manager."""

    def __init__(
        self,
        driver: Driver,
        manager: Manager,
        stats: ConsumerStats,
        log: logging.Logger,
        *,
        store_retry_max_s: float = 5.0,
    ) -> None:
        self.driver = driver
        self.manager = manager
        self.stats = stats
        self.log = log
        self.jobs: dict[str, Job] = {}
        self.stopping = False
        self._stop_event = asyncio.Event()
        self._admitting = 0  # submits in progress: slots about to be taken
        # Held messages waiting for a slot, in delivery order: a slot that frees goes to the
        # oldest (waiters would otherwise race for it, and a later message could overtake).
        self._waiting: list[Job] = []
        # The manager tells the core (synchronously) when slots may have changed, and the
        # core wakes only the jobs that may go: each waiting job watching the slots for
        # itself cost every held job a wake-up per freed slot, and a few loop turns between
        # a freed slot and the next message taking it.
        self._listening = False
        self._delivered = 0
        self._admitted_changed = asyncio.Event()
        self._store_retry_max_s = store_retry_max_s

    # --- intake --------------------------------------------------------------------------------
    def draining(self) -> bool:
        return self.stopping or self.manager.shutting_down

    def free_slots(self) -> int:
        """Slots free for new messages: the manager's, less those being submitted to now."""
        return self.manager.free_slots() - self._admitting

    def deliver(self, delivery: Delivery) -> Job:
        """Take one message; it is settled by a task of its own."""
        self._delivered += 1
        job = Job(delivery, seq=self._delivered)
        self.jobs[delivery.key] = job
        self.stats.received += 1
        job.task = asyncio.create_task(self._run(job), name=f"{self.driver.source}-{delivery.key}")
        return job

    def slot_capacity(self) -> int:
        """The pool's runner slots in all (its concurrency), at least 1."""
        return max(self.manager.capacity(), self.manager.free_slots(), 1)

    def held_count(self) -> int:
        """Messages delivered and not handed to the manager yet (read ahead, downloading
        inputs, waiting for a slot)."""
        return sum(1 for j in self.jobs.values() if j.held and not j.returned)

    async def wait_room_or_stop(self) -> None:
        """Return when a slot may have freed or a held message was admitted or settled, or the
        consumer stops: the moments when a driver reading ahead may read again."""
        self._admitted_changed.clear()
        waits: list[Awaitable[Any]] = [self._stop_event.wait(), self._admitted_changed.wait()]
        if self.manager.free_slots() <= 0:
            waits.append(self.manager.wait_for_free_slot())
        await wait_first(*waits)

    async def wait_slot_or_stop(self) -> None:
        """Return when a slot may be free, or the consumer stops, or the pool drains."""
        waits: list[Awaitable[Any]] = [self._stop_event.wait()]
        if self.manager.free_slots() <= 0:
            waits.append(self.manager.wait_for_free_slot())
        else:  # free in the manager but being taken by submits in progress
            self._admitted_changed.clear()
            waits.append(self._admitted_changed.wait())
        # ShuttingDown from the manager: draining() says so now; nothing else to do.
        await wait_first(*waits)

    # --- one message ---------------------------------------------------------------------------
    async def _run(self, job: Job) -> None:
        d = job.delivery
        try:
            await self._handle(job)
        except Poison as p:
            await self._dead_letter(job, p.reason)
        except BrokerLost as e:
            self.log.info("%s_delivery_lost message=%s error=%r", self.driver.source, d.key, str(e))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # A bug must neither stop intake nor loop: the message goes to the dead letters
            # with what happened, and the traceback to the log.
            self.stats.bugs += 1
            self.stats.last_error = f"{type(e).__name__}: {e}"
            self.log.exception("%s_job_crashed message=%s", self.driver.source, d.key)
            try:
                await self._dead_letter(job, f"{names.REASON_INTERNAL}: {type(e).__name__}: {e}")
            except Exception:
                self.log.exception("%s_dead_letter_failed message=%s", self.driver.source, d.key)
        finally:
            job.admitted.set()
            self.jobs.pop(d.key, None)
            self._admitted_changed.set()

    async def _handle(self, job: Job) -> None:
        d, driver = job.delivery, self.driver
        if d.poison is not None:
            raise Poison(d.poison)
        parse = functools.partial(
            parse_request, d.body, max_bytes=driver.max_message_bytes, fallback_id=d.fallback_id
        )
        # A large message is parsed in a worker thread (pool.jsonbody keeps each C call short).
        big = d.body is not None and len(d.body) > OFF_LOOP_PARSE_BYTES
        request = await asyncio.to_thread(parse) if big else parse()
        job.request = request
        prediction_id = request.id
        assert prediction_id is not None  # parse_request always sets one
        deliveries = await self._store(job, lambda: driver.count_delivery(d, prediction_id))
        if deliveries is None:
            return
        d.deliveries = deliveries
        if deliveries > 1:
            self.stats.redeliveries += 1
        too_many = over_delivered(deliveries, driver.max_deliveries)
        if too_many is not None:
            raise Poison(too_many)
        await driver.check_reply_to(d, request)
        recorded = await self._store(job, lambda: driver.recorded(prediction_id))
        if job.returned:
            return
        if recorded is not None:
            self.log.info(
                "%s_result_republished message=%s prediction=%s",
                driver.source,
                d.key,
                prediction_id,
            )
            await self._store(job, lambda: driver.publish(d, request, recorded, republish=True))
            self.stats.republished += 1
            return
        prediction = await self._submit(job, request)
        if prediction is None:
            return
        prediction.hold_output()  # its kept output files stay until its result is published
        try:
            await prediction.wait()
            await self._settle(job, request, prediction)
        finally:
            prediction.release_output()

    async def _submit(self, job: Job, request: PredictionRequest) -> PredictionView | None:
        """Hand the request to the manager once a slot is free; None when handed back."""
        assert request.id is not None
        d = job.delivery
        existing = self.manager.get(request.id)
        if existing is not None and not existing.done:
            # A redelivery of a message this pool still runs (its first delivery died with
            # the connection): re-attach, it publishes once the prediction ends.
            prediction: PredictionView = existing
        else:
            bisect.insort(self._waiting, job, key=_by_seq)
            try:
                prediction_or_none = await self._submit_in_turn(job, request)
            finally:
                if job in self._waiting:
                    self._waiting.remove(job)
                    self._line_moved()  # the next in line may go
            if prediction_or_none is None:
                return None
            prediction = prediction_or_none
            if job.returned or not self.driver.valid(d):
                # Handed back while submit() ran (e.g. an input download): another pool runs
                # the message, so this copy must not run here with nobody to publish it.
                self.log.info(
                    "%s_submit_undone message=%s prediction=%s",
                    self.driver.source,
                    d.key,
                    prediction.id,
                )
                await self.manager.cancel(prediction.id)
                return None
        job.prediction = prediction
        job.admitted.set()
        self.driver.submitted(job)
        self.log.debug(
            "%s_prediction_submitted message=%s prediction=%s deliveries=%d",
            self.driver.source,
            d.key,
            prediction.id,
            d.deliveries,
        )
        return prediction

    async def _submit_in_turn(self, job: Job, request: PredictionRequest) -> PredictionView | None:
        """Submit once a slot is free for this job: the oldest waiting job goes first."""
        d = job.delivery
        while True:
            if job.returned or not self.driver.valid(d):
                return None
            if self.draining():
                await self._give_back(job)
                return None
            room = self.manager.free_slots() - self._admitting
            if room <= 0 or self._waiting.index(job) >= room:
                await self._wait_turn(job)
                continue
            self._waiting.remove(job)
            self._admitting += 1
            try:
                prediction: PredictionView = await self.manager.submit(
                    request, source=self.driver.source
                )
                return prediction
            except InvalidRequest as e:
                raise Poison(f"{names.REASON_INVALID_REQUEST}: {e}") from None
            except RETRY_LATER as e:
                self.log.info(
                    "%s_submit_deferred message=%s error=%r", self.driver.source, d.key, str(e)
                )
            finally:
                self._admitting -= 1
                self._line_moved()
            bisect.insort(self._waiting, job, key=_by_seq)  # deferred: in line again
            await self._wait_turn(job)

    async def _wait_turn(self, job: Job) -> None:
        """Wait in line until the job may take a slot, or must look at itself again (handed
        back, its connection gone, the consumer stopping or the pool draining)."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        job.turn = turn
        if not self._listening:
            self.manager.add_slot_listener(self._wake_turns)
            self._listening = True
        self._wake_turns()  # the line may have moved since this job last looked
        try:
            await turn
        finally:
            job.turn = None

    def _line_moved(self) -> None:
        """An admission ended or a job left the line: a reader may read, the next may go."""
        self._admitted_changed.set()
        self._wake_turns()

    def _wake_turns(self) -> None:
        """Wake the jobs at the head of the line that fit the room, and any that must look
        at themselves again (the manager calls this whenever slots may have changed; the
        core whenever the line or its admissions change)."""
        if not self._waiting:
            return
        everyone = self.draining()
        room = self.manager.free_slots() - self._admitting
        for place, job in enumerate(self._waiting):
            turn = job.turn
            if turn is None or turn.done():
                continue
            if everyone or place < room or job.returned or not self.driver.valid(job.delivery):
                turn.set_result(None)

    async def _settle(
        self, job: Job, request: PredictionRequest, prediction: PredictionView
    ) -> None:
        d = job.delivery
        if job.returned:
            return
        end = end_of(prediction)
        if end is End.SHUTDOWN or (end is End.RUNTIME_LOST and self.draining()):
            await self._give_back(job)  # ended by this pool's drain, not by the model
            return
        if end is End.RUNTIME_LOST:
            reason = after_runner_died(
                prediction, deliveries=d.deliveries, max_deliveries=self.driver.max_deliveries
            )
            if reason is not None:
                raise Poison(reason)
            self.log.warning(
                "%s_message_redelivered message=%s prediction=%s error=%r",
                self.driver.source,
                d.key,
                prediction.id,
                prediction.error,
            )
            await self.driver.give_back(d)
            return
        value = await result_value(prediction)
        await self._store(job, lambda: self.driver.publish(d, request, value, republish=False))
        self.stats.completed += 1
        self.log.debug(
            "%s_prediction_completed message=%s prediction=%s status=%s",
            self.driver.source,
            d.key,
            prediction.id,
            prediction.status,
        )

    async def _store(self, job: Job, op: Callable[[], Awaitable[T]]) -> T | None:
        """Run ``op``; while the store is out of reach, retry with backoff (store-transient).
        None when the job was handed back meanwhile."""
        try:
            return await op()
        except StoreUnavailable as e:
            self._store_error(job, e)

        async def attempt() -> T | None:
            if job.returned or self.stopping:
                return None
            return await op()

        return await retry_forever(
            attempt,
            errors=(StoreUnavailable,),
            on_error=lambda e: self._store_error(job, e),
            max_s=self._store_retry_max_s,
        )

    def _store_error(self, job: Job, exc: BaseException) -> None:
        self.stats.store_errors += 1
        self.stats.last_error = str(exc) or type(exc).__name__
        self.log.warning(
            "%s_store_unavailable message=%s error=%r",
            self.driver.source,
            job.delivery.key,
            self.stats.last_error,
        )

    async def _dead_letter(self, job: Job, reason: str) -> None:
        if job.returned:
            return
        await self.driver.dead_letter(job.delivery, reason)
        self.stats.dead_lettered += 1
        self.log.warning(
            "%s_dead_lettered message=%s reason=%r", self.driver.source, job.delivery.key, reason
        )

    async def _give_back(self, job: Job) -> None:
        if job.returned:
            return
        job.returned = True
        self.stats.returned += 1
        self.log.info(
            "%s_message_returned message=%s prediction=%s",
            self.driver.source,
            job.delivery.key,
            job.request.id if job.request else None,
        )
        await self.driver.give_back(job.delivery)

    # --- cancels and shutdown ------------------------------------------------------------------
    async def cancel_local(self, prediction_id: str) -> None:
        """A cancel broadcast by another pool: act only on ids held here (cancel() forwards
        unknown ids, which would echo forever)."""
        if self.manager.get(prediction_id) is not None:
            self.log.info("%s_cancel_received prediction=%s", self.driver.source, prediction_id)
            await self.manager.cancel(prediction_id)

    async def stop(self, grace_s: float) -> int:
        """Hand back what no runner has started; let the rest finish within grace_s.

        Returns how many jobs were abandoned (still running after the grace): their messages
        stay unacked and go to another pool.
        """
        self.stopping = True
        self._stop_event.set()
        self._wake_turns()  # everyone in line: each hands itself back
        for job in list(self.jobs.values()):
            prediction = job.prediction
            if prediction is None or prediction.started_at is None:
                if prediction is not None and not prediction.done:
                    await self.manager.cancel(prediction.id)
                try:
                    await self._give_back(job)
                except BrokerLost:
                    pass
        running = [j.task for j in self.jobs.values() if j.task is not None]
        if running:
            await asyncio.wait(running, timeout=max(0.0, grace_s))
        abandoned = [j.task for j in self.jobs.values() if j.task and not j.task.done()]
        for task in abandoned:
            task.cancel()
        await asyncio.gather(*abandoned, return_exceptions=True)
        if self._listening:
            self.manager.remove_slot_listener(self._wake_turns)
            self._listening = False
        return len(abandoned)

    def counts(self) -> dict[str, int]:
        held = sum(1 for j in self.jobs.values() if j.held)
        return {"in_flight": len(self.jobs) - held, "held": held}
