"""``cog-pool submit``: push one prediction into Redis or AMQP and print its terminal result.

    cog-pool submit --redis-url redis://127.0.0.1:6379 -i text=world
    cog-pool submit --amqp-url amqp://guest:guest@127.0.0.1/ --queue q --json '{"input": {}}'
    cog-pool submit --redis-url redis://127.0.0.1:6379 --file inputs.jsonl --out results.jsonl

The result (the Cog prediction object) goes to stdout as JSON; progress entries, when the
pool publishes them, go to stderr. Exit status: 0 succeeded, 1 failed or canceled, 2 usage,
3 no result within --timeout-s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Sequence
from typing import Any

from ingest import names
from ingest.batch import add_batch_arguments, batch_main
from pool.config import AmqpConfig, RedisConfig

__all__ = ["build_parser", "submit_main"]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cog-pool submit", description=__doc__.split("\n")[0])
    broker = p.add_mutually_exclusive_group(required=True)
    broker.add_argument("--redis-url", help="push to this Redis (XADD to --stream)")
    broker.add_argument("--amqp-url", help="publish to this AMQP broker (to --queue)")
    p.add_argument("--stream", default=RedisConfig.stream, help="Redis request stream")
    p.add_argument("--queue", default=AmqpConfig.queue, help="AMQP request queue")
    p.add_argument(
        "--reply-prefix",
        help="the pools' queues.redis.reply_to_prefix (default: <stream>:reply:)",
    )
    p.add_argument(
        "-i",
        "--input",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an input; VALUE is parsed as JSON when it can be (5, true, [1]), else a string",
    )
    p.add_argument("--json", help="the whole request body (POST /predictions shape)")
    p.add_argument("--id", help="prediction id (default: generated)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="give up after this long")
    add_batch_arguments(p)
    return p


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def build_body(args: argparse.Namespace) -> dict[str, Any]:
    """The request body from --json and -i (inputs given with -i win)."""
    body: dict[str, Any] = json.loads(args.json) if args.json else {}
    if not isinstance(body, dict):
        raise ValueError("--json must be a JSON object")
    inputs = dict(body.get("input") or {})
    for item in args.input:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"-i {item!r}: expected KEY=VALUE")
        inputs[key] = _value(value)
    body["input"] = inputs
    body["id"] = args.id or body.get("id") or uuid.uuid4().hex
    return body


def submit_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cog-pool submit`` (hook it into the CLI's subcommands)."""
    args = build_parser().parse_args(argv)
    if args.file:
        return batch_main(args)
    try:
        body = build_body(args)
    except ValueError as e:
        print(f"cog-pool submit: {e}", file=sys.stderr)
        return EXIT_USAGE
    run = _submit_redis(args, body) if args.redis_url else _submit_amqp(args, body)
    try:
        result = asyncio.run(asyncio.wait_for(run, args.timeout_s))
    except TimeoutError:
        print(f"cog-pool submit: no result within {args.timeout_s}s", file=sys.stderr)
        return EXIT_TIMEOUT
    print(json.dumps(result))
    return 0 if result.get("status") == "succeeded" else EXIT_FAILED


async def _submit_redis(args: argparse.Namespace, body: dict[str, Any]) -> dict[str, Any]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(args.redis_url, decode_responses=True)
    prefix = args.reply_prefix or names.default_reply_prefix(args.stream)
    reply_to = f"{prefix}{body['id']}"
    body["reply_to"] = reply_to  # a private stream: only this prediction's entries
    try:
        await client.xadd(args.stream, {names.FIELD_VALUE: json.dumps(body)})
        last = "0-0"
        while True:
            reply: Any = await client.xread({reply_to: last}, block=1000, count=10)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    result: dict[str, Any] = json.loads(fields[names.FIELD_VALUE])
                    if fields.get(names.FIELD_EVENT, "completed") == "completed":
                        return result
                    print(json.dumps(result), file=sys.stderr)
    finally:
        await client.delete(reply_to)
        await client.aclose()


async def _submit_amqp(args: argparse.Namespace, body: dict[str, Any]) -> dict[str, Any]:
    import aio_pika

    connection = await aio_pika.connect(args.amqp_url)
    try:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True, auto_delete=True)
        correlation_id = uuid.uuid4().hex
        await channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps(body).encode(),
                content_type="application/json",
                reply_to=replies.name,
                correlation_id=correlation_id,
                message_id=body["id"],
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=args.queue,
        )
        async with replies.iterator() as messages:
            async for message in messages:
                await message.ack()
                if message.correlation_id == correlation_id:
                    result: dict[str, Any] = json.loads(message.body)
                    return result
        raise ConnectionError("the reply queue closed before a result arrived")
    finally:
        await connection.close()
