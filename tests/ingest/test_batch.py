"""``cog-pool submit --file``: ids from the file, results appended, Ctrl-C and re-run.

The broker tests run the real command (``python -m cogpool submit``) against a real pool on the
real Redis and RabbitMQ; the echo model records every run in a file, so "each line ran once"
is counted, not assumed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ingest_helpers import redis_up, wait_until
from ingest_pool import (
    AMQP_URL,
    REDIS_URL,
    ROOT,
    amqp_overrides,
    count_runs,
    delete_amqp_names,
    pool_config,
    redis_overrides,
    running_pool,
    unique,
)

from ingest.batch import _run, batch_key, line_id, read_lines, recorded
from ingest.submit import build_parser

LINES = 1000


# --- the file ----------------------------------------------------------------------------------
def test_ids_come_from_the_file_path_the_line_number_and_the_line(tmp_path: Path) -> None:
    a = tmp_path / "a.jsonl"
    a.write_text('{"n": 1}\n\n{"n": 2}\n[1]\nnot json\n')
    key = batch_key(str(a))
    lines = list(read_lines(str(a), key))
    assert [x.lineno for x in lines] == [1, 3, 4, 5]  # blank lines are not lines
    assert lines[0].input == {"n": 1} and lines[0].id == line_id(key, 1, '{"n": 1}')
    assert lines[2].input is None and "expected an object, got list" in (lines[2].error or "")
    assert lines[3].input is None and f"{a}:5: not valid JSON" in (lines[3].error or "")
    assert len({x.id for x in lines}) == 4
    # Stable for the same file; another file, or an edited line, gets other ids.
    assert [x.id for x in read_lines(str(a), batch_key(str(a)))] == [x.id for x in lines]
    b = tmp_path / "b.jsonl"
    b.write_text(a.read_text())
    assert batch_key(str(b)) != key
    assert line_id(key, 1, '{"n": 9}') != lines[0].id
    # Every id is a valid prediction id (DESIGN §4 alphabet, at most 128 characters).
    assert all(len(x.id) <= 128 and x.id.replace("-", "").isalnum() for x in lines)


def test_recorded_ignores_a_torn_last_line(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "status": "succeeded"}\nnot json\n{"id": "b", "status": "fai')
    assert recorded(str(out)) == {"a": "succeeded"}


# --- through the real command and real pools ---------------------------------------------
def broker_setup(broker: str) -> tuple[str, dict[str, Any], list[str]]:
    name = unique("batch")
    if broker == "redis":
        return name, redis_overrides(name), ["--redis-url", REDIS_URL, "--stream", name]
    overrides = amqp_overrides(name)
    flags = ["--amqp-url", AMQP_URL, "--queue", name, "--dead-letter-exchange", f"{name}.dlx"]
    return name, overrides, flags


async def cleanup(broker: str, name: str, inputs: Path) -> None:
    if broker == "redis":
        import redis.asyncio as aioredis

        client = aioredis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(match=f"{name}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    else:
        reply = f".batch.{batch_key(str(inputs))}"
        await delete_amqp_names(name, queue_suffixes=("", ".dead", reply))


async def reply_channel_ttl_ms(broker: str, name: str, inputs: Path) -> int | None:
    """The batch's reply stream's TTL (Redis) or 1 if its reply queue exists (AMQP); None
    when it is gone."""
    key = batch_key(str(inputs))
    if broker == "redis":
        import redis.asyncio as aioredis

        client = aioredis.from_url(REDIS_URL)
        ttl_ms = int(await client.pttl(f"{name}:reply:batch:{key}"))
        await client.aclose()
        assert ttl_ms != -1, "the reply stream has no TTL"
        if ttl_ms == -2:
            return None
        assert 0 < ttl_ms <= 86_400_000
        return ttl_ms
    import aio_pika
    from aio_pika.exceptions import ChannelClosed

    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        try:
            await channel.declare_queue(f"{name}.batch.{key}", passive=True)
        except ChannelClosed:  # 404 NOT_FOUND
            return None
        return 1
    finally:
        await connection.close()


async def start_submit(*flags: str) -> asyncio.subprocess.Process:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cogpool", "submit", *flags,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


def out_records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


@pytest.mark.broker
@pytest.mark.parametrize("broker", ["redis", "amqp"])
async def test_a_thousand_lines_interrupted_then_finished_by_a_rerun(
    tmp_path: Path, broker: str
) -> None:
    name, overrides, flags = broker_setup(broker)
    runs = tmp_path / "runs"
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(
        "".join(json.dumps({"n": i, "runs_file": str(runs), "sleep_s": 0.002}) + "\n"
                for i in range(LINES))
    )  # fmt: skip
    out = tmp_path / "results.jsonl"
    command = [*flags, "--file", str(inputs), "--out", str(out), "--max-in-flight", "16"]
    config = pool_config(str(tmp_path / "state"), overrides, runners=2)
    try:
        async with running_pool(config):
            # Steps: the batch runs; Ctrl-C once 200 results are in.
            first = await start_submit(*command)
            await wait_until(
                lambda: out.exists() and out.read_text().count("\n") >= 200,
                timeout_s=120, what="200 results",
            )  # fmt: skip
            first.send_signal(signal.SIGINT)
            _, err1 = await asyncio.wait_for(first.communicate(), 60)
            # Result: it stops cleanly, says so, and what it wrote is whole lines.
            assert first.returncode == 130, err1.decode()
            assert b"interrupted with" in err1 and b"Traceback" not in err1
            done_first = len(out_records(out))
            assert 200 <= done_first < LINES
            # The reply channel outlives the interrupted run, bounded by --reply-ttl-s.
            assert await reply_channel_ttl_ms(broker, name, inputs) is not None
            # Steps: the same command again. Result: only the rest is submitted (the results
            # of lines in flight at Ctrl-C are collected from the reply channel, not re-run).
            second = await start_submit(*command)
            _, err2 = await asyncio.wait_for(second.communicate(), 180)
            assert second.returncode == 0, err2.decode()
            # Every line has a result: the reply channel is removed.
            assert await reply_channel_ttl_ms(broker, name, inputs) is None
    finally:
        await cleanup(broker, name, inputs)
    summary = err2.decode().strip().splitlines()[-1]
    assert f"{done_first} skipped" in summary, summary
    submitted = int(summary.split(" submitted")[0].rsplit(" ", 1)[1])
    collected = int(summary.split(" collected")[0].rsplit(" ", 1)[1])
    assert submitted + collected == LINES - done_first, summary
    assert collected <= 16  # at most the window was in flight at Ctrl-C
    records = out_records(out)
    assert len(records) == LINES  # every line once, none twice
    assert sorted(r["line"] for r in records) == list(range(1, LINES + 1))
    assert all(r["status"] == "succeeded" for r in records)
    assert all(r["output"] == f"echo {r['line'] - 1}" for r in records)
    counts = count_runs(str(runs))
    assert sorted(counts) == list(range(LINES))
    assert set(counts.values()) == {1}, {n: c for n, c in counts.items() if c != 1}
    # A third run has nothing left to do and says so.
    third = await start_submit(*command)
    _, err3 = await asyncio.wait_for(third.communicate(), 60)
    assert third.returncode == 0 and f"{LINES} skipped" in err3.decode()


@pytest.mark.broker
@pytest.mark.parametrize("broker", ["redis", "amqp"])
async def test_bad_lines_and_dead_letters_fail_with_a_nonzero_exit(
    tmp_path: Path, broker: str
) -> None:
    name, overrides, flags = broker_setup(broker)
    inputs = tmp_path / "inputs.jsonl"
    # a good line, a line that is not JSON, a line the model's schema refuses (dead letter)
    inputs.write_text('{"n": 1}\n{oops\n{"n": "not a number"}\n')
    out = tmp_path / "results.jsonl"
    command = [*flags, "--file", str(inputs), "--out", str(out), "--timeout-s", "60"]
    config = pool_config(str(tmp_path / "state"), overrides, runners=1)
    try:
        async with running_pool(config):
            proc = await start_submit(*command)
            _, err = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        await cleanup(broker, name, inputs)
    assert proc.returncode == 1, err.decode()
    by_line = {r["line"]: r for r in out_records(out)}
    assert by_line[1]["status"] == "succeeded" and by_line[1]["output"] == "echo 1"
    assert by_line[2]["status"] == "failed" and "not valid JSON" in by_line[2]["error"]
    assert by_line[3]["status"] == "failed"
    assert by_line[3]["error"].startswith("dead-lettered: invalid request"), by_line[3]
    assert "1 succeeded, 2 failed, 2 submitted, 0 collected" in err.decode()
    # The progress line (not a terminal: whole lines) ends at 3/3 with the counts and rate.
    assert re.search(r"\] 3/3  ok 1  failed 2  skipped 0  [\d.]+/s  ETA \d+s\n", err.decode())
    # A re-run skips all three and still exits non-zero: the file has failed lines.
    again = await start_submit(*command)
    _, err2 = await asyncio.wait_for(again.communicate(), 60)
    assert again.returncode == 1 and "3 skipped" in err2.decode()
    assert "2 lines failed in an earlier run" in err2.decode()


def close_amqp_connection(name_part: str) -> None:
    """Force-close the one broker connection whose name holds ``name_part`` (only that one:
    other tests share this broker)."""
    listed = subprocess.run(
        ["rabbitmqctl", "list_connections", "pid", "client_properties", "--quiet"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    pids = [line.split("\t")[0] for line in listed.splitlines() if name_part in line]
    assert len(pids) == 1, listed
    subprocess.run(
        ["rabbitmqctl", "close_connection", pids[0], "batch test"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip


@pytest.mark.broker
async def test_a_broker_connection_lost_mid_run_is_reconnected(tmp_path: Path) -> None:
    name, overrides, flags = broker_setup("amqp")
    runs = tmp_path / "runs"
    inputs = tmp_path / "inputs.jsonl"
    count = 300
    inputs.write_text(
        "".join(json.dumps({"n": i, "runs_file": str(runs), "sleep_s": 0.005}) + "\n"
                for i in range(count))
    )  # fmt: skip
    out = tmp_path / "results.jsonl"
    config = pool_config(str(tmp_path / "state"), overrides, runners=2)
    try:
        async with running_pool(config):
            proc = await start_submit(
                *flags, "--file", str(inputs), "--out", str(out), "--max-in-flight", "16"
            )
            await wait_until(
                lambda: out.exists() and out.read_text().count("\n") >= 50,
                timeout_s=120, what="50 results",
            )  # fmt: skip
            # Steps: the broker drops the batch's connection. Result: it reconnects, its reply
            # queue and consumer come back, and the run finishes with every line once.
            reply = f"{name}.batch.{batch_key(str(inputs))}"
            await asyncio.to_thread(close_amqp_connection, f"cog-pool submit {reply}")
            _, err = await asyncio.wait_for(proc.communicate(), 180)
    finally:
        await cleanup("amqp", name, inputs)
    assert proc.returncode == 0, err.decode()
    assert f"reconnected to {name}'s broker" in err.decode()  # it did lose the link
    records = out_records(out)
    assert sorted(r["line"] for r in records) == list(range(1, count + 1))
    assert set(count_runs(str(runs)).values()) == {1}


@pytest.mark.broker
async def test_a_redis_restart_mid_run_is_retried(
    tmp_path: Path,
    private_redis: Any,  # the conftest.py fixture
) -> None:
    url, start, stop = private_redis
    name = unique("batch")
    overrides = redis_overrides(name, **{"queues.redis.url": url})
    runs = tmp_path / "runs"
    inputs = tmp_path / "inputs.jsonl"
    count = 300
    inputs.write_text(
        "".join(json.dumps({"n": i, "runs_file": str(runs), "sleep_s": 0.005}) + "\n"
                for i in range(count))
    )  # fmt: skip
    out = tmp_path / "results.jsonl"
    await wait_until(lambda: redis_up(url), timeout_s=30, what="private redis up")
    config = pool_config(str(tmp_path / "state"), overrides, runners=2)
    async with running_pool(config):
        proc = await start_submit(
            "--redis-url", url, "--stream", name, "--file", str(inputs), "--out", str(out),
            "--max-in-flight", "16",
        )  # fmt: skip
        await wait_until(
            lambda: out.exists() and out.read_text().count("\n") >= 50,
            timeout_s=120, what="50 results",
        )  # fmt: skip
        # Steps: Redis restarts (its data kept in the AOF). Result: the batch retries, then
        # finishes with every line once.
        await asyncio.to_thread(stop)
        start()
        await wait_until(lambda: redis_up(url), timeout_s=30, what="private redis back")
        _, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, err.decode()
    assert "retrying" in err.decode()  # it did see the outage
    records = out_records(out)
    assert sorted(r["line"] for r in records) == list(range(1, count + 1))
    assert set(count_runs(str(runs)).values()) == {1}


async def test_usage_errors_name_the_problem(tmp_path: Path) -> None:
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("{}\n")
    cases = [
        (["--file", str(inputs)], "--file needs --out"),
        (["--file", str(inputs), "--out", str(inputs)], "--out must not be the input file"),
        (["--file", str(tmp_path / "nope"), "--out", "o"], "no such file"),
        (["--file", str(inputs), "--out", "o", "-i", "n=1"], "drop -i/--json/--id"),
    ]
    for extra, message in cases:
        proc = await start_submit("--redis-url", "redis://127.0.0.1:1", *extra)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 2 and message in err.decode(), (extra, err.decode())


# --- the window, with a stand-in transport ---------------------------------------------------
class HeldTransport:
    """Records what is sent; answers only what the test releases."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.answers: asyncio.Queue[str] = asyncio.Queue()
        self.most_unanswered = 0
        self.answered = 0
        self.closed_complete: bool | None = None

    async def open(self) -> None:
        pass

    async def send(self, lines: list[tuple[str, dict[str, Any]]]) -> None:
        self.sent.extend(pid for pid, _ in lines)
        self.most_unanswered = max(self.most_unanswered, len(self.sent) - self.answered)

    async def replies(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        while True:
            pid = await self.answers.get()
            self.answered += 1
            yield pid, {"id": pid, "status": "succeeded", "output": pid}

    def stop_reading(self) -> None:
        pass

    async def close(self, *, complete: bool) -> None:
        self.closed_complete = complete


async def test_at_most_max_in_flight_lines_wait_for_a_result(tmp_path: Path) -> None:
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(50)))
    out = tmp_path / "out.jsonl"
    args = build_parser().parse_args(
        ["--redis-url", "redis://unused", "--file", str(inputs), "--out", str(out),
         "--max-in-flight", "7"]
    )  # fmt: skip
    transport = HeldTransport()

    async def answer_all() -> None:
        # Steps: answer whatever was sent, one at a time, until all 50 are answered.
        while transport.answered < 50:
            await wait_until(lambda: len(transport.sent) > transport.answered, what="a send")
            transport.answers.put_nowait(transport.sent[transport.answered])
            await wait_until(lambda: transport.answers.empty(), what="the answer read")

    answering = asyncio.ensure_future(answer_all())
    f = out.open("a")  # _run's caller opens --out (batch_main does it before the loop)
    try:
        code = await asyncio.wait_for(_run(args, transport, f), 60)
    finally:
        f.close()
    await answering
    # Result: never more than 7 unanswered, every line sent once, the channel closed as done.
    assert code == 0
    assert transport.most_unanswered == 7
    assert sorted(transport.sent) == sorted(set(transport.sent)) and len(transport.sent) == 50
    assert transport.closed_complete is True
    assert len(out_records(out)) == 50
