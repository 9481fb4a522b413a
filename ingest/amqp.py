"""AMQP (RabbitMQ) driver: durable quorum queue, manual ack, results with publisher confirms.

It only fetches, acks, hands back (nack requeue), dead-letters and publishes; the delivery
core (``ingest/core.py``) decides what happens to each message. Delivery rules (DESIGN §5):

- prefetch: the channel's ``basic.qos`` prefetch is ``queues.amqp.prefetch``, by default twice
  the pool's slot capacity (at most one extra message waits per slot); a delivered message is
  handed to the manager only while it has a free slot; the others are *held unstarted* and
  nacked back to the queue on shutdown. (RabbitMQ applies a new ``basic.qos`` only to
  consumers started after it, so following free slots with ``set_qos`` would not bound an
  existing consumer.)
- the terminal result is recorded in the result store, published ``mandatory`` with the
  prediction id as ``message_id`` to the message's ``reply_to`` (with its ``correlation_id``)
  and/or the results exchange, confirmed by the broker, the confirm recorded, then the
  message is acked. A result the broker returns (``reply_to`` names no queue) is logged,
  counted (``unroutable``) and the message dead-lettered with the reason;
- a redelivery whose result is recorded *and* confirmed is acked without publishing again;
  the one remaining duplicate window is a pool dying between the broker's confirm and the
  store recording it (consumers deduplicate by ``message_id``);
- if the connection drops while a prediction runs, the prediction keeps running; the broker
  requeues the message, and its redelivery re-attaches to the running prediction (the manager
  is idempotent by id) or finds the recorded result;
- poison and over-delivered messages (``x-delivery-count``, quorum queues) are published to the
  dead-letter exchange with the reason in the ``x-cog-dead-reason`` header, then acked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
import uuid
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aiormq.exceptions import AMQPError, ChannelInvalidStateError, ChannelPreconditionFailed

from ingest import amqp_wire, names
from ingest.amqp_wire import AmqpWire
from ingest.backoff import retry_forever, watch_task
from ingest.core import (
    BrokerLost,
    ConsumerStats,
    Delivery,
    DeliveryCore,
    Job,
    ResultValue,
    StoreUnavailable,
)
from ingest.messages import Poison
from ingest.port import Manager
from ingest.prefetch import PrefetchTuner
from ingest.results import ResultStore
from pool.config import AmqpConfig
from pool.prediction import PredictionRequest

__all__ = ["AmqpConsumer"]

log = logging.getLogger(__name__)

BROKER_ERRORS: tuple[type[BaseException], ...] = (
    AMQPError,
    ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)
# A give-back finds the channel gone (BrokerLost) as often as failing on the wire.
NACK_ERRORS: tuple[type[BaseException], ...] = (BrokerLost, *BROKER_ERRORS)
JSON = "application/json"


@dataclasses.dataclass
class AmqpStats(ConsumerStats):
    requeued: int = 0
    unroutable: int = 0
    queue_depth: int | None = None


class _Incoming:
    """One delivered message, read straight from aiormq's frames: the few properties the
    driver uses, without building aio-pika's IncomingMessage (a few dozen attribute
    assignments per message, on the consumer's hot path)."""

    __slots__ = ("_properties", "body", "delivery_tag", "redelivered")

    def __init__(self, raw: aiormq.abc.DeliveredMessage | amqp_wire.Delivered) -> None:
        self.body: bytes = raw.body
        self.delivery_tag = int(raw.delivery.delivery_tag or 0)  # type: ignore[union-attr]
        self.redelivered = bool(getattr(raw.delivery, "redelivered", False))
        self._properties = raw.header.properties

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self._properties.headers or {})

    @property
    def reply_to(self) -> str | None:
        return self._properties.reply_to

    @property
    def correlation_id(self) -> str | None:
        return self._properties.correlation_id

    @property
    def message_id(self) -> str | None:
        return self._properties.message_id

    @property
    def content_type(self) -> str | None:
        return self._properties.content_type


@dataclasses.dataclass
class _Meta:
    message: _Incoming
    generation: int  # the connection the message came on; acks on another one are invalid
    submitted_at: float | None = None  # its prediction exists (monotonic): the run begins


class AmqpConsumer:
    """Feeds one durable AMQP queue into the pool manager and publishes terminal results."""

    source = "amqp"

    def __init__(self, config: AmqpConfig, manager: Manager, *, store: ResultStore) -> None:
        if not config.url:
            raise ValueError("queues.amqp.url is not set")
        self.config = config
        self.manager = manager
        self.store = store
        self.max_deliveries = config.max_deliveries
        self.max_message_bytes = config.max_message_bytes
        self.state = "starting"
        self.stats = AmqpStats()
        self.core = DeliveryCore(self, manager, self.stats, log)
        self._url: str = config.url
        # Shown by the broker (rabbitmqctl list_connections client_properties): an operator can
        # tell, and close, this pool's connection.
        self.connection_name = f"cog-pool {socket.gethostname()}-{os.getpid()} {config.queue}"
        self._generation = 0
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None  # declarations, the queue-depth monitor
        # The hot path (consume, publish, ack, nack): a lean connection of its own
        # (ingest/amqp_wire.py), or this channel's aiormq underlay when the URL needs aiormq.
        self._hot: Any = None
        self._wire: AmqpWire | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._results_exchange: AbstractExchange | None = None
        self._cancel_exchange: AbstractExchange | None = None
        self._prefetch_count: int | None = None
        self._tuner: PrefetchTuner | None = None  # None: queues.amqp.prefetch is fixed
        self._retuning: asyncio.Task[None] | None = None
        self._count_in_store = False  # classic queue (no x-delivery-count): count in the store
        self._task: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = watch_task(
            asyncio.create_task(self._run_forever(), name="amqp-consume"),
            log,
            on_crash=self._crashed,
        )
        self._monitor = watch_task(
            asyncio.create_task(self._monitor_forever(), name="amqp-monitor"),
            log,
            on_crash=self._crashed,
        )
        log.info("amqp_consumer_started queue=%s", self.config.queue)

    def _crashed(self, exc: BaseException) -> None:
        self.state = "failed"
        self.stats.last_error = f"{type(exc).__name__}: {exc}"

    async def stop(self, grace_s: float) -> None:
        """Stop consuming, nack unstarted messages back, let running ones finish in grace_s."""
        self.core.stopping = True
        await self._cancel_consumer()
        abandoned = await self.core.stop(grace_s)
        owned = [t for t in (self._task, self._monitor, self._retuning) if t is not None]
        for task in owned:
            task.cancel()
        await asyncio.gather(*owned, return_exceptions=True)
        if self._wire is not None:
            # Unacked messages of abandoned jobs go back to the queue when the channel closes.
            await self._wire.close()
        if self._connection is not None:
            await self._connection.close()
        self.state = "stopped"
        await self.store.close()
        log.info("amqp_consumer_stopped queue=%s abandoned=%d", self.config.queue, abandoned)

    async def _cancel_consumer(self) -> None:
        hot = self._hot
        if hot is not None and not hot.is_closed and self._consumer_tag is not None:
            try:
                await hot.basic_cancel(self._consumer_tag)
            except BROKER_ERRORS as e:
                log.info("amqp_cancel_consumer_failed error=%r", str(e))
            self._consumer_tag = None

    def health(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "queue": self.config.queue,
            "prefetch": self._prefetch_count,  # as set on the channel (None before)
            **self.core.counts(),
            **self.stats.as_dict(),
        }

    async def forward_cancel(self, prediction_id: str) -> None:
        """Broadcast a cancel for an id this pool does not hold (manager's cancel forwarder)."""
        if self._cancel_exchange is None:
            raise ConnectionError("AMQP is not connected; cancel not broadcast")
        await self._cancel_exchange.publish(
            aio_pika.Message(body=prediction_id.encode()), routing_key="", mandatory=False
        )

    # --- connection ----------------------------------------------------------------------------
    def _broker_error(self, exc: BaseException) -> None:
        self.stats.last_error = str(exc) or type(exc).__name__
        self.stats.queue_depth = None  # unknown until connected again
        if self.state == "connected":
            self.stats.reconnects += 1
            log.warning(
                "amqp_disconnected queue=%s error=%r", self.config.queue, self.stats.last_error
            )
        if self.state != "failed":
            self.state = "reconnecting"

    async def _run_forever(self) -> None:
        while not self.core.stopping:
            await retry_forever(self._session, errors=BROKER_ERRORS, on_error=self._broker_error)

    async def _session(self) -> None:
        """Connect, declare, consume; return or raise when the connection or channel is gone.

        The broker may close only the channel (a consumer_timeout, a deleted results exchange
        or queue): consuming stops while the connection lives on, so a closed channel ends
        the session too, and the reconnect loop builds a new connection and channel. Acks
        of the old channel's deliveries are skipped by the generation counter.
        """
        closed = asyncio.Event()
        connection = await aio_pika.connect(
            self._url, timeout=10, client_properties={"connection_name": self.connection_name}
        )
        connection.close_callbacks.add(lambda *_: closed.set())
        wire: AmqpWire | None = None
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
            # Declared through aio-pika; consumed, published and acked on the hot path.
            if amqp_wire.supports(self._url):
                wire = await AmqpWire.connect(self._url, connection_name=self.connection_name)
                wire.closed.add_done_callback(lambda _: closed.set())
                self._wire = self._hot = wire
            else:
                self._wire, self._hot = None, await channel.get_underlay_channel()
            hot = self._hot
            await hot.basic_qos(prefetch_count=self._prefetch_count)
            consume_ok = await hot.basic_consume(self._queue.name, self._consumer(), no_ack=False)
            self._consumer_tag = consume_ok.consumer_tag
            self.state = "connected"
            log.info(
                "amqp_connected queue=%s generation=%d prefetch=%d hot_path=%s",
                self.config.queue,
                self._generation,
                self._prefetch_count,
                "lean" if wire is not None else "aiormq",
            )
            await closed.wait()
        finally:
            if wire is not None:
                await wire.close()
            if not connection.is_closed:
                await connection.close()
        if not self.core.stopping:
            raise ConnectionError("AMQP connection or channel closed")

    async def _wait_capacity(self) -> None:
        """Consume only once a runner is ready: the prefetch follows the slot capacity."""
        while self.manager.free_slots() <= 0 and not self.core.draining():
            await self.core.wait_slot_or_stop()

    def _prefetch(self) -> int:
        """queues.amqp.prefetch, else the tuner's window: twice the pool's slot capacity to
        begin with (computed once per connection; health reports the value set, never
        recomputes it: the manager's health includes this consumer's)."""
        if self.config.prefetch:
            self._tuner = None
            self._prefetch_count = self.config.prefetch
        else:
            self._tuner = PrefetchTuner(
                self._capacity(), max_per_slot=self.config.prefetch_max_per_slot
            )
            self._prefetch_count = self._tuner.current
        return self._prefetch_count

    def _observe_settle(self, delivery: Delivery, published_at: float) -> None:
        """Feed the tuner one settled message; re-consume when it asks for a new window."""
        tuner, meta = self._tuner, delivery.meta
        if tuner is None or meta.submitted_at is None:
            return
        now = time.monotonic()
        tuner.observe(published_at - meta.submitted_at, now - published_at)
        wanted = tuner.due(now)
        if wanted is None or self._retuning is not None:
            return
        tuner.applied(wanted, now)  # also when it fails: retried after the interval
        self._retuning = asyncio.create_task(self._retune(wanted), name="amqp-retune")
        self._retuning.add_done_callback(self._retuned)

    def _retuned(self, task: asyncio.Task[None]) -> None:
        self._retuning = None
        if not task.cancelled() and task.exception() is not None:
            log.warning("amqp_prefetch_change_failed error=%r", str(task.exception()))

    async def _retune(self, prefetch: int) -> None:
        """Consume anew with ``prefetch`` (a new basic.qos binds only later consumers), then
        cancel the old consumer. Its unacked messages stay on this channel and settle as
        usual; deliveries sent before its cancel-ok still reach ``_on_message``."""
        hot, queue, old = self._hot, self._queue, self._consumer_tag
        generation = self._generation
        if hot is None or hot.is_closed or queue is None or self.core.stopping:
            return
        try:
            await hot.basic_qos(prefetch_count=prefetch)
            consume_ok = await hot.basic_consume(queue.name, self._consumer(), no_ack=False)
            if generation != self._generation:
                return  # that channel went with its connection
            if self.core.stopping:  # stop() cancelled the old consumer; this one goes too
                await hot.basic_cancel(consume_ok.consumer_tag)
                return
            self._consumer_tag = consume_ok.consumer_tag
            previous, self._prefetch_count = self._prefetch_count, prefetch
            if old is not None:
                await hot.basic_cancel(old)
        except BROKER_ERRORS as e:
            log.info("amqp_prefetch_change_failed error=%r", str(e))
            return
        tuner = self._tuner
        log.info(
            "amqp_prefetch_changed queue=%s from=%s to=%d run_ms=%.2f settle_ms=%.2f",
            self.config.queue,
            previous,
            prefetch,
            (tuner.run_s or 0) * 1000 if tuner else 0,
            (tuner.settle_s or 0) * 1000 if tuner else 0,
        )

    def _capacity(self) -> int:
        return self.core.slot_capacity()

    async def _declare(self, connection: AbstractConnection) -> None:
        cfg = self.config
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=self._prefetch())
        dead_exchange = await channel.declare_exchange(
            cfg.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        dead_queue = await channel.declare_queue(cfg.dead_letter_queue, durable=True)
        await dead_queue.bind(dead_exchange, routing_key=cfg.queue)
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
        await self.core.cancel_local(message.body.decode(errors="replace"))

    async def _monitor_forever(self) -> None:
        """Keep the queue depth in health fresh (a passive declare reports it)."""
        while not self.core.stopping:
            await asyncio.sleep(1.0)
            channel = self._channel
            if channel is None or channel.is_closed or self.state != "connected":
                continue
            try:
                queue = await channel.declare_queue(self.config.queue, passive=True)
                result = queue.declaration_result
                self.stats.queue_depth = int(result.message_count or 0)
            except BROKER_ERRORS as e:
                log.info("amqp_monitor_failed error=%r", str(e))

    # --- deliveries ----------------------------------------------------------------------------
    def _consumer(self) -> Any:
        """The delivery callback for the hot path: the lean connection calls it, aiormq
        awaits it."""
        if isinstance(self._hot, AmqpWire):
            return self._on_message

        async def on_message(raw: aiormq.abc.DeliveredMessage) -> None:
            self._on_message(raw)

        return on_message

    def _on_message(self, raw: aiormq.abc.DeliveredMessage | amqp_wire.Delivered) -> None:
        message = _Incoming(raw)
        headers = raw.header.properties.headers or {}
        count = headers.get(names.AMQP_DELIVERY_COUNT_HEADER)
        deliveries = int(count) + 1 if isinstance(count, int) else 1
        problem = getattr(raw, "problem", None)  # lean connection: undecodable properties
        self.core.deliver(
            Delivery(
                key=f"{self._generation}:{message.delivery_tag}",
                body=message.body,
                deliveries=deliveries,
                # A stable id keeps a redelivery idempotent; without one, each delivery is new.
                fallback_id=message.message_id or message.correlation_id or uuid.uuid4().hex,
                redelivered=bool(message.redelivered) or deliveries > 1,
                meta=_Meta(message, self._generation),
                poison=f"{names.REASON_INVALID_PROPERTIES}: {problem}" if problem else None,
            )
        )

    # --- the Driver the core calls -------------------------------------------------------------
    def valid(self, delivery: Delivery) -> bool:
        meta: _Meta = delivery.meta
        hot = self._hot
        return meta.generation == self._generation and hot is not None and not hot.is_closed

    def _require_valid(self, delivery: Delivery) -> _Incoming:
        if not self.valid(delivery):
            raise BrokerLost("the message's connection is gone; the broker redelivers it")
        meta: _Meta = delivery.meta
        return meta.message

    async def count_delivery(self, delivery: Delivery, prediction_id: str) -> int:
        if self._count_in_store:
            return await self.store.count_delivery(prediction_id)
        return delivery.deliveries

    async def check_reply_to(self, delivery: Delivery, request: PredictionRequest) -> None:
        return None  # a reply_to naming no queue is told by the broker's return (mandatory)

    async def recorded(self, prediction_id: str) -> ResultValue | None:
        return await self.store.get(prediction_id)

    async def publish(
        self,
        delivery: Delivery,
        request: PredictionRequest,
        value: ResultValue,
        *,
        republish: bool,
    ) -> None:
        assert request.id is not None
        published_at = time.monotonic()
        if republish:
            if delivery.redelivered and await self.store.published(request.id):
                # Confirmed already; only the ack was lost (with its connection): ack now.
                await self._ack(delivery)
                self.stats.deduplicated += 1
                log.info("amqp_result_already_published prediction=%s", request.id)
                return
        else:
            await self.store.put(request.id, value)
        message = self._require_valid(delivery)
        properties = aiormq.spec.Basic.Properties(
            content_type=JSON,
            correlation_id=message.correlation_id,
            message_id=request.id,  # consumers deduplicate by it (the remaining window)
            delivery_mode=int(aio_pika.DeliveryMode.PERSISTENT),
            headers={"prediction-id": request.id},
        )
        body = value if isinstance(value, bytes) else value.encode()
        routed = False
        try:
            if message.reply_to:
                confirm = await self._publish(
                    delivery, body, "", message.reply_to, properties, mandatory=True
                )
                if not isinstance(confirm, aiormq.spec.Basic.Ack):
                    raise self._unroutable(request.id, f"reply_to queue {message.reply_to!r}")
                routed = True
            if self._results_exchange is not None:
                confirm = await self._publish(
                    delivery,
                    body,
                    self._results_exchange.name,
                    self.config.results_routing_key,
                    properties,
                    mandatory=True,
                )
                if isinstance(confirm, aiormq.spec.Basic.Ack):
                    routed = True
                else:
                    self._unroutable(
                        request.id, f"results exchange {self.config.results_exchange!r}"
                    )
        except BROKER_ERRORS as e:
            raise BrokerLost(f"publish failed: {e!r}") from e
        if not routed:
            raise self._unroutable(request.id, "nowhere (no reply_to, no results_exchange)")
        try:
            await self.store.mark_published(request.id)
        except StoreUnavailable as e:
            # The mark only matters if the ack below is lost too; retrying the publish for
            # it would publish the result twice.
            self.stats.store_errors += 1
            log.warning("amqp_publish_mark_failed prediction=%s error=%r", request.id, str(e))
        await self._ack(delivery)
        if not republish:
            self._observe_settle(delivery, published_at)

    def _unroutable(self, prediction_id: str, where: str) -> Poison:
        self.stats.unroutable += 1
        log.warning("amqp_result_unroutable prediction=%s to=%s", prediction_id, where)
        return Poison(
            f"{names.REASON_UNROUTABLE}: the broker could not route the result to {where}"
        )

    def _channel_of(self, delivery: Delivery) -> Any:
        """The hot-path channel the message came on (AmqpWire or aiormq.Channel)."""
        hot = self._hot
        if hot is None or not self.valid(delivery):
            raise BrokerLost("the message's channel is gone")
        return hot

    async def _publish(
        self,
        delivery: Delivery,
        body: bytes,
        exchange: str,
        routing_key: str,
        properties: aiormq.spec.Basic.Properties,
        *,
        mandatory: bool,
    ) -> Any:
        """Publish on the message's own channel and return the broker's confirm (Basic.Ack),
        or the returned message when the broker could not route a mandatory one.

        On the lean connection, or straight to aiormq with ``wait=False`` (its channel lock
        is then held only while the frames are queued, not until the socket write drained):
        results waiting for their confirms do not queue behind one another."""
        return await self._channel_of(delivery).basic_publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=properties,
            mandatory=mandatory,
            wait=False,
        )

    async def _ack(self, delivery: Delivery) -> None:
        message = self._require_valid(delivery)
        try:
            # Queued, not waited for: frames of one channel go out in order, so nothing sent
            # on this channel later can overtake it, and a lost connection requeues anyway.
            await self._channel_of(delivery).basic_ack(message.delivery_tag, wait=False)
        except BROKER_ERRORS as e:
            raise BrokerLost(f"ack failed: {e!r}") from e

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Publish a copy with the reason to the dead-letter exchange (confirmed), then ack."""
        message = self._require_valid(delivery)
        headers = message.headers
        headers[names.AMQP_DEAD_REASON_HEADER] = reason
        properties = aiormq.spec.Basic.Properties(
            headers=headers,
            content_type=message.content_type,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            message_id=message.message_id,
            delivery_mode=int(aio_pika.DeliveryMode.PERSISTENT),
        )
        try:
            confirm = await self._publish(
                delivery,
                message.body,
                self.config.dead_letter_exchange,
                self.config.queue,
                properties,
                mandatory=False,
            )
        except BROKER_ERRORS as e:
            raise BrokerLost(f"dead-letter publish failed: {e!r}") from e
        if not isinstance(confirm, aiormq.spec.Basic.Ack):
            raise BrokerLost(f"the broker did not confirm the dead letter ({confirm!r})")
        await self._ack(delivery)

    async def give_back(self, delivery: Delivery) -> None:
        """Give the message back to the queue (nack requeue); a no-op on a dead connection."""
        if not self.valid(delivery):
            return
        meta: _Meta = delivery.meta
        try:
            await self._channel_of(delivery).basic_nack(meta.message.delivery_tag, requeue=True)
            self.stats.requeued += 1
        except NACK_ERRORS as e:
            log.info("amqp_nack_failed error=%r", str(e))

    def submitted(self, job: Job) -> None:
        meta: _Meta = job.delivery.meta
        meta.submitted_at = time.monotonic()
