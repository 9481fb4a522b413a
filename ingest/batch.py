"""``cog-pool submit --file inputs.jsonl --out results.jsonl``: a whole file through a queue.

Each non-blank line of the file is one input object. Its prediction id is derived from the
file and the line (``<hash of the file's absolute path>-<line number>-<hash of the line>``),
so a re-run of the same command skips every id already in ``--out`` and the queues' own
idempotency by id keeps a line from running twice. Results are appended to ``--out`` as they
arrive (one JSON object per line: the prediction plus its ``line``), a progress bar (done,
failed, rate, ETA) goes to stderr, and a summary at the end.

Replies come back on a reply channel named after the file (a Redis stream
``<stream>:batch:<key>``, an AMQP queue ``<queue>.batch.<key>``) that outlives an interrupted
run for ``--reply-ttl-s``: a re-run first collects the results that arrived after Ctrl-C.
Lines the pool dead-letters (e.g. inputs the model's schema refuses) are seen on the
dead-letter stream / exchange and recorded as failed.

Exit status: 0 every line succeeded; 1 some failed; 2 usage; 3 no result for --timeout-s;
130 interrupted (Ctrl-C): submitted work keeps running and a re-run collects it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TextIO, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from ingest import names
from pool.config import AmqpConfig

__all__ = [
    "BatchLine",
    "add_batch_arguments",
    "batch_key",
    "batch_main",
    "line_id",
    "read_lines",
    "recorded",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
REDIS_READ_COUNT = 200
SEND_CHUNK = 64  # lines sent in one Redis pipeline / one round of concurrent AMQP publishes
REDIS_BLOCK_MS = 500  # how soon a finished run's reader notices it should stop
READER_STOP_S = 3.0  # then the reader is cancelled (AMQP's iterator ends only that way)
AMQP_REPLY_PREFETCH = 200


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--file`` options of ``cog-pool submit``."""
    g = p.add_argument_group("batch from a file (--file)")
    g.add_argument("--file", help="JSON Lines file: one input object per line")
    g.add_argument("--out", help="append each result here as one JSON line (with --file)")
    g.add_argument(
        "--max-in-flight", type=int, default=256,
        help="lines submitted and not yet answered at most (default 256)",
    )  # fmt: skip
    g.add_argument(
        "--reply-ttl-s", type=float, default=86_400.0,
        help="an interrupted run's reply stream/queue is kept this long for a re-run",
    )  # fmt: skip
    g.add_argument(
        "--retry-s", type=float, default=60.0,
        help="retry a broker operation this long (reconnecting) before giving up (default 60)",
    )  # fmt: skip
    g.add_argument("--dead-stream", help="Redis dead-letter stream (default <stream>:dead)")
    g.add_argument(
        "--dead-letter-exchange", default=AmqpConfig.dead_letter_exchange,
        help="AMQP dead-letter exchange of the queue",
    )  # fmt: skip


# --- the file --------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchLine:
    """One non-blank line: its id and input, or why it cannot be submitted."""

    lineno: int
    id: str
    input: dict[str, Any] | None
    error: str | None = None


def _digest(text: str | bytes, size: int) -> str:
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()[:size]


def batch_key(path: str) -> str:
    """The file's key: a hash of its absolute path (stable across re-runs and appends)."""
    return _digest(os.path.realpath(path), 16)


def line_id(key: str, lineno: int, text: str) -> str:
    """The prediction id of one line; an edited line gets a new id (and runs again)."""
    return f"b{key}-{lineno}-{_digest(text.strip(), 8)}"


def read_lines(path: str, key: str) -> Iterator[BatchLine]:
    """The file's non-blank lines, parsed; a bad line carries its error, not an exception."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            pid = line_id(key, lineno, text)
            try:
                value = json.loads(text)
            except ValueError as e:
                yield BatchLine(lineno, pid, None, f"{path}:{lineno}: not valid JSON: {e}")
                continue
            if not isinstance(value, dict):
                kind = type(value).__name__
                error = f"{path}:{lineno}: expected an object, got {kind}"
                yield BatchLine(lineno, pid, None, error)
                continue
            yield BatchLine(lineno, pid, value)


def recorded(out_path: str) -> dict[str, str]:
    """Ids already in ``out_path`` with their status; a torn last line is not counted."""
    found: dict[str, str] = {}
    if not os.path.exists(out_path):
        return found
    with open(out_path, encoding="utf-8", errors="replace") as f:
        for text in f:
            if not text.endswith("\n"):
                break  # written partly when a run was killed: that line runs again
            try:
                record = json.loads(text)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                found[record["id"]] = str(record.get("status"))
    return found


# --- progress ----------------------------------------------------------------------------------
class Progress:
    """A one-line bar on a terminal; on anything else a line every few seconds."""

    WIDTH = 24
    TTY_EVERY_S = 0.1
    PLAIN_EVERY_S = 5.0

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self.succeeded = 0
        self.failed = 0
        self.skipped = 0
        self._drawn_at = 0.0

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.skipped

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        ran = self.succeeded + self.failed
        rate = ran / elapsed
        left = self.total - self.done
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        filled = int(self.WIDTH * self.done / self.total) if self.total else self.WIDTH
        bar = "#" * filled + "." * (self.WIDTH - filled)
        return (
            f"[{bar}] {self.done}/{self.total}  ok {self.succeeded}  failed {self.failed}  "
            f"skipped {self.skipped}  {rate:.1f}/s  ETA {eta}"
        )

    def draw(self, *, force: bool = False) -> None:
        now = time.monotonic()
        every = self.TTY_EVERY_S if self.tty else self.PLAIN_EVERY_S
        if not force and now - self._drawn_at < every:
            return
        self._drawn_at = now
        text = f"\r\x1b[K{self.line()}" if self.tty else f"{self.line()}\n"
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        self.draw(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --- transports --------------------------------------------------------------------------------
Reply = tuple[str, dict[str, Any]]
T = TypeVar("T")


def _broker_errors() -> tuple[type[BaseException], ...]:
    from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    # ChannelInvalidStateError (a RuntimeError): a robust channel that is reconnecting.
    return (
        AMQPError,
        ChannelInvalidStateError,
        RedisConnectionError,
        RedisTimeoutError,
        ConnectionError,
        TimeoutError,
    )


async def with_retry(op: Callable[[], Awaitable[T]], *, limit_s: float, what: str) -> T:
    """Run ``op``, retrying broker errors with capped backoff for up to ``limit_s`` seconds.

    Safe for sends: the queues are idempotent by prediction id, so a publish that did reach
    the broker before the error costs a duplicate answer, which the run ignores.
    """

    def report(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        print(f"cog-pool submit: {what} failed ({error!r}); retrying", file=sys.stderr)

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(_broker_errors()),
        stop=stop_after_delay(limit_s),
        wait=wait_exponential_jitter(initial=0.1, max=5.0, jitter=0.1),
        before_sleep=report,
        reraise=True,
    )

    async def call() -> T:
        return await op()

    return await retrying(call)


class Transport(Protocol):
    async def open(self) -> None: ...
    async def send(self, lines: list[tuple[str, dict[str, Any]]]) -> None: ...
    def replies(self) -> AsyncIterator[Reply]: ...
    def stop_reading(self) -> None: ...
    async def close(self, *, complete: bool) -> None: ...


def _dead_result(prediction_id: str, reason: str) -> dict[str, Any]:
    return {"id": prediction_id, "status": "failed", "error": f"dead-lettered: {reason}"}


class RedisBatch:
    """XADD to the request stream; results from the file's reply stream and the dead stream."""

    def __init__(self, args: argparse.Namespace, key: str) -> None:
        self.url = args.redis_url
        self.stream = args.stream
        # Under the pools' default reply_to prefix (queues.redis.reply_to_prefix).
        self.reply = f"{names.default_reply_prefix(args.stream)}batch:{key}"
        self.dead = names.dead_stream_name(args.stream, args.dead_stream)
        self.ttl_ms = int(args.reply_ttl_s * 1000)
        self.retry_s = args.retry_s
        self.client: Any = None
        self._dead_from = "0-0"
        self._stopping = False

    async def open(self) -> None:
        import redis.asyncio as aioredis

        self.client = aioredis.from_url(self.url, decode_responses=True)
        # Dead letters from before this run are not this run's answers.
        last = await with_retry(
            lambda: self.client.xrevrange(self.dead, count=1),
            limit_s=self.retry_s,
            what="XREVRANGE",
        )
        self._dead_from = last[0][0] if last else "0-0"

    async def send(self, lines: list[tuple[str, dict[str, Any]]]) -> None:
        values = [
            json.dumps({"id": prediction_id, "input": inputs, "reply_to": self.reply})
            for prediction_id, inputs in lines
        ]

        async def attempt() -> None:
            async with self.client.pipeline(transaction=False) as pipe:  # one round trip
                for value in values:
                    pipe.xadd(self.stream, {names.FIELD_VALUE: value})
                await pipe.execute()

        await with_retry(attempt, limit_s=self.retry_s, what="XADD")

    async def replies(self) -> AsyncIterator[Reply]:
        positions = {self.reply: "0-0", self.dead: self._dead_from}
        # Ends on a flag, not a cancel: a cancel that lands inside a blocking XREAD can leave
        # redis-py's connection waiting forever (seen with redis-py 8.1).
        while not self._stopping:
            got: Any = await with_retry(
                lambda: self.client.xread(positions, block=REDIS_BLOCK_MS, count=REDIS_READ_COUNT),
                limit_s=self.retry_s,
                what="XREAD",
            )
            for stream, entries in got or []:
                for entry_id, fields in entries:
                    positions[stream] = entry_id
                    reply = self._decode(stream, fields)
                    if reply is not None:
                        yield reply
            # Kept only as long as a re-run may want it, whatever happens to this run.
            await with_retry(
                lambda: self.client.pexpire(self.reply, self.ttl_ms),
                limit_s=self.retry_s,
                what="PEXPIRE",
            )

    def stop_reading(self) -> None:
        self._stopping = True

    def _decode(self, stream: str, fields: dict[str, str]) -> Reply | None:
        try:
            value = json.loads(fields.get(names.FIELD_VALUE) or "null")
        except ValueError:
            return None
        if not isinstance(value, dict):
            return None
        if stream == self.reply:
            if fields.get(names.FIELD_EVENT, "completed") != "completed":
                return None
            return str(fields.get(names.FIELD_ID) or value.get("id")), value
        if value.get("reply_to") != self.reply or not isinstance(value.get("id"), str):
            return None  # another client's dead letter
        return value["id"], _dead_result(value["id"], fields.get(names.FIELD_REASON, "?"))

    async def close(self, *, complete: bool) -> None:
        if self.client is None:
            return
        if complete:
            await self.client.delete(self.reply)
        await self.client.aclose()


class AmqpBatch:
    """Publish to the queue; results from the file's reply queue, which also receives the
    queue's dead letters (bound to the dead-letter exchange with the queue's routing key)."""

    def __init__(self, args: argparse.Namespace, key: str) -> None:
        self.url = args.amqp_url
        self.queue = args.queue
        self.reply_name = f"{args.queue}.batch.{key}"
        self.dlx = args.dead_letter_exchange
        self.ttl_ms = int(args.reply_ttl_s * 1000)
        self.retry_s = args.retry_s
        self.connection: Any = None
        self.channel: Any = None
        self.reply_queue: Any = None

    async def open(self) -> None:
        import aio_pika

        # Robust: after a broker restart or a forced close it reconnects and restores the
        # reply queue, its binding and the consumer; sends retry meanwhile (with_retry).
        self.connection = await aio_pika.connect_robust(
            self.url, client_properties={"connection_name": f"cog-pool submit {self.reply_name}"}
        )
        self.connection.reconnect_callbacks.add(self._reconnected)
        self.channel = await self.connection.channel()  # publisher confirms on
        await self.channel.set_qos(prefetch_count=AMQP_REPLY_PREFETCH)
        # Durable and named after the file, so results that arrive after Ctrl-C wait for the
        # re-run; x-expires removes it once nobody has used it for the TTL.
        self.reply_queue = await self.channel.declare_queue(
            self.reply_name, durable=True, arguments={"x-expires": self.ttl_ms}
        )
        dlx = await self.channel.declare_exchange(
            self.dlx, aio_pika.ExchangeType.DIRECT, durable=True
        )
        await self.reply_queue.bind(dlx, routing_key=self.queue)

    def _reconnected(self, *_: Any) -> None:
        print(f"cog-pool submit: reconnected to {self.queue}'s broker", file=sys.stderr)

    async def send(self, lines: list[tuple[str, dict[str, Any]]]) -> None:
        # Concurrent publishes: their broker confirms overlap instead of one round trip each.
        await with_retry(lambda: self._publish(lines), limit_s=self.retry_s, what="publish")

    async def _publish(self, lines: list[tuple[str, dict[str, Any]]]) -> None:
        import aio_pika

        await asyncio.gather(
            *(
                self.channel.default_exchange.publish(
                    aio_pika.Message(
                        json.dumps({"id": prediction_id, "input": inputs}).encode(),
                        content_type="application/json",
                        reply_to=self.reply_name,
                        correlation_id=prediction_id,
                        message_id=prediction_id,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=self.queue,
                )
                for prediction_id, inputs in lines
            )
        )

    async def replies(self) -> AsyncIterator[Reply]:
        # A forced close ends the iterator (quietly, or with an error, or an ack fails on the
        # closed channel): read again once the robust connection is back, within --retry-s.
        # The run cancels this reader when it is done, so every end here is a lost link. An
        # unacked reply is redelivered; the run ignores an id it has already written.
        lost_at: float | None = None
        while True:
            error: BaseException | None = None
            try:
                async with self.reply_queue.iterator() as messages:
                    async for message in messages:
                        lost_at = None
                        reply = self._decode(message)
                        if reply is not None:
                            yield reply  # the caller has written it when this resumes
                        await message.ack()
            except _broker_errors() as e:
                error = e
            now = time.monotonic()
            lost_at = lost_at if lost_at is not None else now
            if now - lost_at > self.retry_s:
                if error is not None:
                    raise error
                raise ConnectionError(f"the reply queue {self.reply_name} stopped delivering")
            why = repr(error) if error is not None else "the consumer was closed"
            print(f"cog-pool submit: reading replies stopped ({why}); retrying", file=sys.stderr)
            await asyncio.sleep(0.5)  # the robust connection reconnects meanwhile

    def stop_reading(self) -> None:
        """The iterator waits for the next message: the run cancels it."""

    def _decode(self, message: Any) -> Reply | None:
        headers = message.headers or {}
        reason = headers.get(names.AMQP_DEAD_REASON_HEADER)
        if message.reply_to == self.reply_name and reason is not None:
            pid = message.message_id or message.correlation_id
            return (pid, _dead_result(pid, str(reason))) if pid else None
        if reason is not None or message.reply_to == self.reply_name:
            return None  # another client's dead letter
        try:
            value = json.loads(message.body)
        except ValueError:
            return None
        pid = message.correlation_id or (value.get("id") if isinstance(value, dict) else None)
        return (pid, value) if pid and isinstance(value, dict) else None

    async def close(self, *, complete: bool) -> None:
        if self.connection is None:
            return
        if complete:
            try:
                await self.channel.queue_delete(self.reply_name)
            except Exception as e:  # the run's results are written; only the cleanup failed
                print(
                    f"cog-pool submit: could not delete the reply queue {self.reply_name} "
                    f"({e!r}); it expires after --reply-ttl-s",
                    file=sys.stderr,
                )
        await self.connection.close()


# --- the run -----------------------------------------------------------------------------------
class _Run:
    def __init__(self, args: argparse.Namespace, transport: Transport, out: TextIO) -> None:
        self.args = args
        self.transport = transport
        self.out = out
        self.key = batch_key(args.file)
        self.before = recorded(args.out)
        self.wanted: dict[str, int] = {}  # ids of this file not in --out yet -> line number
        self.in_flight: set[str] = set()
        self.changed = asyncio.Event()
        self.stop = asyncio.Event()
        self.submitted = 0
        self.collected = 0  # results of an earlier run, found on the reply channel
        self.last_reply_at = time.monotonic()
        lines = list(read_lines(args.file, self.key))
        self.lines = [line for line in lines if line.id not in self.before]
        self.progress = Progress(len(lines), sys.stderr)
        self.progress.skipped = len(lines) - len(self.lines)
        self.failed_before = sum(
            1 for line in lines if self.before.get(line.id, "succeeded") != "succeeded"
        )
        self.wanted = {line.id: line.lineno for line in self.lines}

    def record(self, prediction_id: str, result: dict[str, Any], *, sent: bool = True) -> None:
        """Write one result; ``sent=False``: a line that failed here, never sent."""
        lineno = self.wanted.pop(prediction_id, None)
        if lineno is None:
            return  # not ours, or a duplicate answer (a redelivery's republish)
        # One write per record, flushed: a killed run leaves at most one torn line.
        self.out.write(json.dumps({"line": lineno, **result}) + "\n")
        self.out.flush()
        if prediction_id in self.in_flight:
            self.in_flight.discard(prediction_id)
        elif sent:
            self.collected += 1
        if result.get("status") == "succeeded":
            self.progress.succeeded += 1
        else:
            self.progress.failed += 1
        self.progress.draw()
        self.last_reply_at = time.monotonic()
        self.changed.set()

    async def read_replies(self) -> None:
        async for prediction_id, result in self.transport.replies():
            self.record(prediction_id, result)

    async def send_lines(self) -> None:
        """Send the lines in chunks, keeping at most --max-in-flight without a result."""
        chunk: list[tuple[str, dict[str, Any]]] = []
        for line in self.lines:
            room = self.args.max_in_flight - len(self.in_flight) - len(chunk)
            if chunk and (room <= 0 or len(chunk) >= SEND_CHUNK):
                await self._send(chunk)
                chunk = []
            while len(self.in_flight) >= self.args.max_in_flight and not self.stop.is_set():
                await self._changed()
            if self.stop.is_set():
                return
            if line.id not in self.wanted:
                continue  # its result came in from an earlier run meanwhile
            if line.input is None:
                failure = {"id": line.id, "status": "failed", "error": line.error}
                self.record(line.id, failure, sent=False)
                continue
            chunk.append((line.id, line.input))
        if chunk and not self.stop.is_set():
            await self._send(chunk)

    async def _send(self, chunk: list[tuple[str, dict[str, Any]]]) -> None:
        # In flight before the send: a result can arrive before the send call returns.
        self.in_flight.update(prediction_id for prediction_id, _ in chunk)
        await self.transport.send(chunk)
        self.submitted += len(chunk)

    async def _changed(self) -> None:
        self.changed.clear()
        await self.changed.wait()

    async def wait_done(self, sender: asyncio.Task[None], reader: asyncio.Task[None]) -> str:
        """'done', 'interrupted' or 'timeout'; a broker error from either task is raised."""
        while True:
            if self.stop.is_set():
                return "interrupted"
            for task in (sender, reader):
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            if sender.done() and not self.wanted:
                return "done"
            idle_s = time.monotonic() - self.last_reply_at
            if self.in_flight and idle_s > self.args.timeout_s:
                return "timeout"
            with contextlib.suppress(TimeoutError):
                # Wakes on every result and Ctrl-C; the bound only rechecks the idle timeout.
                await asyncio.wait_for(self._changed(), 1.0)

    def interrupt(self) -> None:
        """Ctrl-C: stop submitting and waiting; the loop acts on the event."""
        self.stop.set()
        self.changed.set()


async def _run(args: argparse.Namespace, transport: Transport, out: TextIO) -> int:
    run = _Run(args, transport, out)
    loop = asyncio.get_running_loop()
    # Ctrl-C only records; the wait loop acts on it (stop submitting, write the summary).
    loop.add_signal_handler(signal.SIGINT, run.interrupt)
    loop.add_signal_handler(signal.SIGTERM, run.interrupt)
    outcome = "interrupted"
    try:
        await transport.open()
        reader = asyncio.create_task(run.read_replies(), name="batch-replies")
        sender = asyncio.create_task(run.send_lines(), name="batch-send")
        try:
            run.progress.draw(force=True)
            outcome = await run.wait_done(sender, reader)
        finally:
            sender.cancel()
            transport.stop_reading()
            await asyncio.wait([sender, reader], timeout=READER_STOP_S)
            reader.cancel()
            await asyncio.gather(sender, reader, return_exceptions=True)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
        run.progress.close()
        await transport.close(complete=not run.wanted)
    return _summary(args, run, outcome)


def _ends_torn(path: str) -> bool:
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _summary(args: argparse.Namespace, run: _Run, outcome: str) -> int:
    p = run.progress
    elapsed = time.monotonic() - p.started
    ran = p.succeeded + p.failed
    print(
        f"cog-pool submit: {args.file}: {p.total} lines; this run: {p.succeeded} succeeded, "
        f"{p.failed} failed, {run.submitted} submitted, {run.collected} collected from an "
        f"earlier run; {p.skipped} skipped (already in {args.out}); "
        f"{elapsed:.1f}s, {ran / max(elapsed, 1e-9):.1f}/s",
        file=sys.stderr,
    )
    if outcome == "interrupted":
        print(
            f"cog-pool submit: interrupted with {len(run.in_flight)} in flight and "
            f"{len(run.wanted)} lines without a result; run the same command again to "
            "collect and finish them",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if outcome == "timeout":
        print(
            f"cog-pool submit: no result for {args.timeout_s}s with {len(run.in_flight)} in "
            "flight (is a pool consuming the queue?); run the same command again to resume",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    if run.failed_before:
        print(
            f"cog-pool submit: {run.failed_before} lines failed in an earlier run",
            file=sys.stderr,
        )
    return EXIT_FAILED if p.failed or run.failed_before else EXIT_OK


def batch_main(args: argparse.Namespace) -> int:
    """``cog-pool submit --file``: returns the exit status."""
    problem = None
    if not args.out:
        problem = "--file needs --out (the results file)"
    elif args.input or args.json or args.id:
        problem = "--file takes its inputs from the file: drop -i/--json/--id"
    elif args.max_in_flight < 1:
        problem = "--max-in-flight must be >= 1"
    elif args.reply_ttl_s <= 0:
        problem = "--reply-ttl-s must be > 0"
    elif args.retry_s < 0:
        problem = "--retry-s must be >= 0"
    elif not os.path.isfile(args.file):
        problem = f"--file {args.file}: no such file"
    elif os.path.realpath(args.file) == os.path.realpath(args.out):
        problem = "--out must not be the input file"
    if problem is not None:
        print(f"cog-pool submit: {problem}", file=sys.stderr)
        return EXIT_USAGE
    from aio_pika.exceptions import AMQPError
    from redis.exceptions import RedisError

    key = batch_key(args.file)
    transport: Transport = RedisBatch(args, key) if args.redis_url else AmqpBatch(args, key)
    out_needs_newline = _ends_torn(args.out)
    with open(args.out, "a", encoding="utf-8") as out:
        if out_needs_newline:
            out.write("\n")  # a torn last line stays on its own line, ignored by re-runs
        try:
            return asyncio.run(_run(args, transport, out))
        except (TimeoutError, OSError, RedisError, AMQPError) as e:
            # Broker errors at the edge of the command: the results so far are in --out.
            print(
                f"cog-pool submit: broker error: {e!r}; run the same command again to resume",
                file=sys.stderr,
            )
            return EXIT_FAILED
