"""AMQP (RabbitMQ) consumer: durable quorum queue, manual ack, results with publisher confirms.

Delivery rules (DESIGN §5):
- prefetch: the channel's ``basic.qos`` prefetch is the pool's total slot capacity, and a
  delivered message is handed to the manager only while it has a free slot; the others are
  *held unstarted* (HTTP may be using slots) and are nacked back to the queue on shutdown.
  (RabbitMQ applies a new ``basic.qos`` only to consumers started after it, so following free
  slots with ``set_qos`` would not bound an existing consumer.)
- the terminal result is recorded in the result store, then published to the message's
  ``reply_to`` (with its ``correlation_id``) and/or the results exchange, and confirmed by the
  broker, then the message is acked;
- if the connection drops while a prediction runs, the prediction keeps running; the broker
  requeues the message, and its redelivery re-attaches to the running prediction (the manager
  is idempotent by id) or finds the recorded result: published once the broker is back;
- poison and over-delivered messages (``x-delivery-count``, quorum queues) are published to the
  dead-letter exchange with the reason in the ``x-cog-dead-reason`` header, then acked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aiormq.exceptions import AMQPError, ChannelInvalidStateError, ChannelPreconditionFailed

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
from ingest.results import ResultStore
from pool.config import AmqpConfig
from pool.errors import InvalidRequest
from pool.prediction import Prediction, PredictionRequest

__all__ = ["AmqpConsumer"]

log = logging.getLogger(__name__)

BROKER_ERRORS: tuple[type[BaseException], ...] = (
    AMQPError,
    ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)
JSON = "application/json"


@dataclass
class _Job:
    message: AbstractIncomingMessage
    generation: int  # the connection the message came on; acks on another one are invalid
    deliveries: int = 1
    request: PredictionRequest | None = None
    prediction: Prediction | None = None
    held: bool = True  # delivered, not yet handed to the manager
    returned: bool = False
    task: asyncio.Task[None] | None = None


@dataclass
class AmqpStats(ConsumerStats):
    requeued: int = 0
    queue_depth: int | None = None


class AmqpConsumer:
    """Feeds one durable AMQP queue into the pool manager and publishes terminal results."""

    def __init__(self, config: AmqpConfig, manager: Any, *, store: ResultStore) -> None:
        if not config.url:
            raise ValueError("queues.amqp.url is not set")
        self.config = config
        self.manager = manager
        self.store = store
        self.state = "starting"
        self.stats = AmqpStats()
        self._url: str = config.url
        self._generation = 0
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._results_exchange: AbstractExchange | None = None
        self._dead_exchange: AbstractExchange | None = None
        self._cancel_exchange: AbstractExchange | None = None
        self._count_in_store = False  # classic queue (no x-delivery-count): count in the store
        self._jobs: dict[int, _Job] = {}
        self._job_seq = 0
        self._gate = asyncio.Lock()  # hand held messages to the manager one at a time, in order
        self._stop_event = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = watch_task(asyncio.create_task(self._run_forever(), name="amqp-consume"), log)
        self._monitor = watch_task(
            asyncio.create_task(self._monitor_forever(), name="amqp-monitor"), log
        )
        log.info("amqp_consumer_started queue=%s", self.config.queue)

    async def stop(self, grace_s: float) -> None:
        """Stop consuming, nack unstarted messages back, let running ones finish in grace_s."""
        self._stopping = True
        self._stop_event.set()
        await self._cancel_consumer()
        await self._return_unstarted()
        running = [j.task for j in self._jobs.values() if j.task is not None]
        if running:
            await asyncio.wait(running, timeout=max(0.0, grace_s))
        abandoned = [j.task for j in self._jobs.values() if j.task and not j.task.done()]
        owned = [t for t in (self._task, self._monitor) if t is not None]
        for task in [*abandoned, *owned]:
            task.cancel()
        await asyncio.gather(*abandoned, *owned, return_exceptions=True)
        if self._connection is not None:
            # Unacked messages of abandoned jobs go back to the queue when the channel closes.
            await self._connection.close()
        self.state = "stopped"
        await self.store.close()
        log.info("amqp_consumer_stopped queue=%s abandoned=%d", self.config.queue, len(abandoned))

    async def _cancel_consumer(self) -> None:
        if self._queue is not None and self._consumer_tag is not None:
            try:
                await self._queue.cancel(self._consumer_tag)
            except BROKER_ERRORS as e:
                log.info("amqp_cancel_consumer_failed error=%r", str(e))
            self._consumer_tag = None

    async def _return_unstarted(self) -> None:
        for job in list(self._jobs.values()):
            prediction = job.prediction
            if job.held or prediction is None or prediction.started_at is None:
                job.returned = True
                if prediction is not None and not prediction.done:
                    await self.manager.cancel(prediction.id)
                await self._settle(job, requeue=True)

    def health(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "queue": self.config.queue,
            "in_flight": sum(1 for j in self._jobs.values() if not j.held),
            "held": sum(1 for j in self._jobs.values() if j.held),
            **self.stats.as_dict(),
        }

    async def forward_cancel(self, prediction_id: str) -> None:
        """Broadcast a cancel for an id this pool does not hold (manager's cancel forwarder)."""
        if self._cancel_exchange is None:
            raise ConnectionError("AMQP is not connected; cancel not broadcast")
        await self._cancel_exchange.publish(
            aio_pika.Message(body=prediction_id.encode()), routing_key=""
        )

    # --- connection ----------------------------------------------------------------------------
    def _broker_error(self, exc: BaseException) -> None:
        self.stats.last_error = str(exc) or type(exc).__name__
        if self.state != "reconnecting":
            self.stats.reconnects += 1
            log.warning(
                "amqp_disconnected queue=%s error=%r", self.config.queue, self.stats.last_error
            )
        self.state = "reconnecting"

    async def _run_forever(self) -> None:
        while not self._stopping:
            await retry_forever(self._session, errors=BROKER_ERRORS, on_error=self._broker_error)

    async def _session(self) -> None:
        """Connect, declare, consume; return or raise when the connection or channel is gone.

        The broker may close only the channel (a consumer_timeout, a deleted results exchange
        or queue): consuming stops while the connection lives on, so a closed channel ends
        the session too, and the reconnect loop builds a new connection and channel. Acks
        of the old channel's deliveries are skipped by the generation counter.
        """
        closed = asyncio.Event()
        connection = await aio_pika.connect(self._url, timeout=10)
        connection.close_callbacks.add(lambda *_: closed.set())
        try:
            self._generation += 1
            self._connection = connection
            await self._wait_capacity()
            await self._declare(connection)
            assert self._queue is not None and self._channel is not None
            # Watched only once declared: _declare_main_queue may replace a channel that the
            # broker closed on purpose (a classic queue refusing the quorum arguments).
            channel = self._channel
            channel.close_callbacks.add(lambda *_: closed.set())
            if channel.is_closed:
                closed.set()
            self._consumer_tag = await self._queue.consume(self._on_message, no_ack=False)
            self.state = "connected"
            log.info(
                "amqp_connected queue=%s generation=%d prefetch=%d",
                self.config.queue,
                self._generation,
                self._prefetch(),
            )
            await closed.wait()
        finally:
            if not connection.is_closed:
                await connection.close()
        if not self._stopping:
            raise ConnectionError("AMQP connection or channel closed")

    async def _wait_capacity(self) -> None:
        """Consume only once a runner is ready: the prefetch is the pool's slot capacity."""
        while self.manager.free_slots() <= 0 and not self._draining():
            await self._wait_slot_or_stop()

    def _draining(self) -> bool:
        return self._stopping or self.manager.shutting_down

    def _prefetch(self) -> int:
        """The channel's prefetch: queues.amqp.prefetch, else the pool's slot capacity."""
        return self.config.prefetch or self._capacity()

    def _capacity(self) -> int:
        try:
            capacity = int(self.manager.health().get("concurrency", {}).get("max") or 0)
        except (AttributeError, TypeError, ValueError):
            capacity = 0
        return max(capacity, self.manager.free_slots(), 1)

    async def _declare(self, connection: AbstractConnection) -> None:
        cfg = self.config
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=self._prefetch())
        self._dead_exchange = await channel.declare_exchange(
            cfg.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        dead_queue = await channel.declare_queue(cfg.dead_letter_queue, durable=True)
        await dead_queue.bind(self._dead_exchange, routing_key=cfg.queue)
        self._channel = channel
        self._queue = await self._declare_main_queue(connection)
        if cfg.results_exchange:
            self._results_exchange = await self._channel.declare_exchange(
                cfg.results_exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
        await self._declare_cancels(self._channel)

    async def _declare_main_queue(self, connection: AbstractConnection) -> AbstractQueue:
        """A quorum queue (it counts deliveries); an existing classic queue is used as is."""
        cfg = self.config
        assert self._channel is not None
        arguments: dict[str, Any] = {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": cfg.dead_letter_exchange,
            "x-delivery-limit": cfg.max_deliveries + names.AMQP_DELIVERY_LIMIT_HEADROOM,
        }
        try:
            return await self._channel.declare_queue(cfg.queue, durable=True, arguments=arguments)
        except ChannelPreconditionFailed as e:
            # The queue exists with other arguments (e.g. a classic queue made by an operator):
            # the broker closed the channel; reopen it and count deliveries in the result store.
            log.warning("amqp_queue_not_quorum queue=%s error=%r", cfg.queue, str(e))
            self._count_in_store = True
            self._channel = await connection.channel(publisher_confirms=True)
            await self._channel.set_qos(prefetch_count=self._prefetch())
            self._dead_exchange = await self._channel.get_exchange(cfg.dead_letter_exchange)
            return await self._channel.declare_queue(cfg.queue, passive=True)

    async def _declare_cancels(self, channel: AbstractChannel) -> None:
        self._cancel_exchange = await channel.declare_exchange(
            self.config.cancel_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        listener = await channel.declare_queue(
            f"{self.config.cancel_exchange}.{uuid.uuid4().hex}", exclusive=True, auto_delete=True
        )
        await listener.bind(self._cancel_exchange)
        await listener.consume(self._on_cancel, no_ack=True)

    async def _on_cancel(self, message: AbstractIncomingMessage) -> None:
        prediction_id = message.body.decode(errors="replace")
        # Only ids held here: cancel() forwards unknown ids, which would echo forever.
        if self.manager.get(prediction_id) is not None:
            log.info("amqp_cancel_received prediction=%s", prediction_id)
            await self.manager.cancel(prediction_id)

    async def _monitor_forever(self) -> None:
        """Keep the queue depth in health fresh (a passive declare reports it)."""
        while True:
            await asyncio.sleep(2.0)
            channel = self._channel
            if channel is None or channel.is_closed or self.state != "connected":
                continue
            try:
                queue = await channel.declare_queue(self.config.queue, passive=True)
                result = queue.declaration_result
                self.stats.queue_depth = int(result.message_count or 0)
            except BROKER_ERRORS as e:
                log.info("amqp_monitor_failed error=%r", str(e))

    # --- one message ---------------------------------------------------------------------------
    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._job_seq += 1
        key = self._job_seq
        job = _Job(message=message, generation=self._generation)
        self._jobs[key] = job
        self.stats.received += 1
        job.task = asyncio.create_task(self._run_job(key, job), name=f"amqp-job-{key}")

    async def _run_job(self, key: int, job: _Job) -> None:
        try:
            await self._handle(job)
        except asyncio.CancelledError:
            raise
        except BROKER_ERRORS as e:
            # The channel went away: the broker requeues the message; its redelivery finds
            # the recorded result or re-attaches to the running prediction.
            self._broker_error(e)
        except Exception:
            log.exception("amqp_job_crashed delivery_tag=%s", job.message.delivery_tag)
            await self._settle(job, requeue=True)
        finally:
            self._jobs.pop(key, None)

    def _fallback_id(self, message: AbstractIncomingMessage) -> str:
        # A stable id keeps a redelivery idempotent; without one, each delivery is new work.
        return message.message_id or message.correlation_id or uuid.uuid4().hex

    async def _handle(self, job: _Job) -> None:
        message = job.message
        try:
            request = parse_request(
                message.body,
                max_bytes=self.config.max_message_bytes,
                fallback_id=self._fallback_id(message),
            )
        except Poison as p:
            await self._dead_letter(job, p.reason)
            return
        job.request = request
        assert request.id is not None
        job.deliveries = await self._deliveries(job, request.id)
        if job.deliveries > 1:
            self.stats.redeliveries += 1
        too_many = over_delivered(job.deliveries, self.config.max_deliveries)
        if too_many is not None:
            await self._dead_letter(job, too_many)
            return
        recorded = await self.store.get(request.id)
        if recorded is not None:
            log.info("amqp_result_republished prediction=%s", request.id)
            self.stats.republished += 1
            await self._publish_and_ack(job, request, recorded)
            return
        prediction = await self._submit(job, request)
        if prediction is None:
            return
        await prediction.wait()
        await self._finished(job, request, prediction)

    async def _deliveries(self, job: _Job, prediction_id: str) -> int:
        if self._count_in_store:
            return await self.store.count_delivery(prediction_id)
        headers = job.message.headers or {}
        count = headers.get(names.AMQP_DELIVERY_COUNT_HEADER)
        return int(count) + 1 if isinstance(count, int) else 1

    async def _wait_slot_or_stop(self) -> None:
        slot = asyncio.ensure_future(self.manager.wait_for_free_slot())
        stop = asyncio.ensure_future(self._stop_event.wait())
        try:
            await asyncio.wait({slot, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (slot, stop):
                fut.cancel()
            # ShuttingDown from the manager: _draining() now says so; nothing else to do.
            await asyncio.gather(slot, stop, return_exceptions=True)

    async def _submit(self, job: _Job, request: PredictionRequest) -> Prediction | None:
        """Hand the message to the manager once it has a free slot (held until then)."""
        assert request.id is not None
        existing = self.manager.get(request.id)
        if existing is not None and not existing.done:
            job.held = False  # a redelivery of a message we are running: re-attach to it
            job.prediction = existing
            return existing
        async with self._gate:
            while True:
                while self.manager.free_slots() <= 0 and not self._draining():
                    await self._wait_slot_or_stop()
                if job.generation != self._generation:
                    return None  # its connection died: the broker requeued it already
                if self._draining() or job.returned:
                    if not job.returned:
                        job.returned = True
                        await self._settle(job, requeue=True)
                    return None
                try:
                    prediction: Prediction = await self.manager.submit(request, source="amqp")
                    break
                except InvalidRequest as e:
                    await self._dead_letter(job, f"{names.REASON_INVALID_REQUEST}: {e}")
                    return None
                except RETRY_LATER as e:
                    log.info("amqp_submit_deferred prediction=%s error=%r", request.id, str(e))
                    await self._wait_slot_or_stop()
        if job.returned:
            # Nacked back by shutdown while submit() ran (e.g. a file download): another pool
            # runs the message, so this copy must not run here with nobody to publish it.
            log.info("amqp_submit_undone prediction=%s", prediction.id)
            await self.manager.cancel(prediction.id)
            return None
        job.held = False
        job.prediction = prediction
        log.debug(
            "amqp_prediction_submitted prediction=%s deliveries=%d", prediction.id, job.deliveries
        )
        return prediction

    async def _finished(
        self, job: _Job, request: PredictionRequest, prediction: Prediction
    ) -> None:
        if job.returned:
            return
        if self._draining() and shutdown_casualty(prediction):
            # Ended by this pool's shutdown, not by the model: back to the queue.
            job.returned = True
            await self._settle(job, requeue=True)
            return
        if runner_died(prediction):
            reason = after_runner_died(
                prediction, deliveries=job.deliveries, max_deliveries=self.config.max_deliveries
            )
            if reason is not None:
                await self._dead_letter(job, reason)
            else:
                log.warning(
                    "amqp_message_requeued prediction=%s error=%r", prediction.id, prediction.error
                )
                await self._settle(job, requeue=True)
            return
        result = prediction.to_dict()
        await self.store.put(prediction.id, result)
        if job.generation != self._generation:
            # Our delivery died with its connection; the broker redelivers the message and
            # the redelivery publishes the recorded result. Publishing here would double it.
            log.info("amqp_result_recorded_for_redelivery prediction=%s", prediction.id)
            return
        await self._publish_and_ack(job, request, result)
        self.stats.completed += 1
        log.debug(
            "amqp_prediction_completed prediction=%s status=%s", prediction.id, prediction.status
        )

    # --- publishing and settling ---------------------------------------------------------------
    async def _publish_and_ack(
        self, job: _Job, request: PredictionRequest, result: dict[str, Any]
    ) -> None:
        """Publish the result (broker-confirmed) to reply_to and the results exchange, then ack."""
        channel = self._channel
        if channel is None or job.generation != self._generation:
            return
        message = job.message
        body = json.dumps(result, separators=(",", ":"), default=str).encode()
        out = aio_pika.Message(
            body=body,
            content_type=JSON,
            correlation_id=message.correlation_id,
            message_id=request.id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={"prediction-id": request.id, "status": str(result.get("status"))},
        )
        if message.reply_to:
            await channel.default_exchange.publish(out, routing_key=message.reply_to)
        if self._results_exchange is not None:
            await self._results_exchange.publish(out, routing_key=self.config.results_routing_key)
        if not message.reply_to and self._results_exchange is None:
            log.info(
                "amqp_result_unrouted prediction=%s (no reply_to, no results_exchange)", request.id
            )
        await message.ack()

    async def _dead_letter(self, job: _Job, reason: str) -> None:
        """Publish a copy with the reason to the dead-letter exchange (confirmed), then ack."""
        message = job.message
        if self._dead_exchange is None or job.generation != self._generation:
            return
        headers = dict(message.headers or {})
        headers[names.AMQP_DEAD_REASON_HEADER] = reason
        await self._dead_exchange.publish(
            aio_pika.Message(
                body=message.body,
                headers=headers,
                content_type=message.content_type,
                correlation_id=message.correlation_id,
                reply_to=message.reply_to,
                message_id=message.message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=self.config.queue,
        )
        await message.ack()
        self.stats.dead_lettered += 1
        log.warning("amqp_dead_lettered queue=%s reason=%r", self.config.queue, reason)

    async def _settle(self, job: _Job, *, requeue: bool) -> None:
        """Give the message back to the queue (nack requeue); a no-op on a dead connection."""
        if job.generation != self._generation:
            return
        try:
            await job.message.nack(requeue=requeue)
            self.stats.requeued += 1
            if job.returned:
                self.stats.returned += 1
        except BROKER_ERRORS as e:
            log.info("amqp_nack_failed error=%r", str(e))
