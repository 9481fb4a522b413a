"""pool/server.py: what a connection may cost, over real sockets (issue 7, findings 7 and 16).

The API is served the way the CLI serves it (``start_http``), against the in-test manager of
test_api.py; clients are raw sockets, so they can be as slow or as broken as an attacker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pool_helpers import wait_until
from test_api import FakeManager

from pool.api import create_app
from pool.config import HttpConfig, PoolConfig
from pool.server import FD_RESERVE, GuardedSite, effective_max_connections, start_http

DEADLINE_S = 20.0


class Served:
    def __init__(self, site: GuardedSite, port: int) -> None:
        self.site = site
        self.port = port

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def health(self) -> int:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{self.port}/health-check") as r:
                await r.read()
                return r.status


@contextlib.asynccontextmanager
async def served(**http: Any) -> AsyncIterator[Served]:
    config = PoolConfig(http=HttpConfig(**http))
    runner = web.AppRunner(create_app(config, FakeManager()))
    await runner.setup()
    try:
        site = await start_http(runner, config.http, host="127.0.0.1", port=0)
        yield Served(site, runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (bounded by a deadline)."""
    chunks = []
    async with asyncio.timeout(DEADLINE_S):
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def parse(response: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body) if body else None


# --- finding 7: idle and slow connections --------------------------------------------------------
async def test_a_connection_that_sends_nothing_is_closed() -> None:
    async with served(header_timeout_s=0.3, keepalive_timeout_s=600) as s:
        reader, writer = await s.connect()
        # Result: the server closes it (EOF) within the deadline, without an answer.
        assert await read_until_closed(reader) == b""
        writer.close()
        assert await s.health() == 200


async def test_headers_sent_a_byte_at_a_time_are_cut_off() -> None:
    async with served(header_timeout_s=0.5, keepalive_timeout_s=600) as s:
        reader, writer = await s.connect()
        writer.write(b"GET /health-check HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        await writer.drain()
        assert await read_until_closed(reader) == b""
        writer.close()


async def test_a_body_shorter_than_its_content_length_gets_408_and_is_closed() -> None:
    async with served(body_timeout_s=0.5, header_timeout_s=600, keepalive_timeout_s=600) as s:
        reader, writer = await s.connect()
        writer.write(
            b"POST /predictions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"input": {"text": "'
        )
        await writer.drain()
        status, headers, body = parse(await read_until_closed(reader))
        assert status == 408 and headers["content-type"].startswith("application/json")
        assert "http.body_timeout_s=0.5" in body["detail"]
        writer.close()
        assert await s.health() == 200


async def test_a_large_body_shorter_than_its_content_length_gets_408_too() -> None:
    # Over 1 MiB the body is read by server._read_into (kept as one bytearray): same deadline.
    async with served(body_timeout_s=0.5, header_timeout_s=600, keepalive_timeout_s=600) as s:
        reader, writer = await s.connect()
        writer.write(
            b"POST /predictions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 4194304\r\n\r\n" + b'{"input": {"text": "' + b"a" * (2 << 20)
        )
        await writer.drain()
        status, _headers, body = parse(await read_until_closed(reader))
        assert status == 408 and "http.body_timeout_s=0.5" in body["detail"]
        writer.close()
        assert await s.health() == 200


async def test_a_large_body_is_read_into_one_kept_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    import pool.api

    seen: list[Any] = []
    parse_json = pool.api._parse_json

    def recording(raw: Any) -> Any:
        seen.append(raw)
        return parse_json(raw)

    monkeypatch.setattr(pool.api, "_parse_json", recording)
    raw = json.dumps({"input": {"text": "b" * (3 << 20)}}).encode()
    async with served(max_body_bytes=8 << 20) as s, aiohttp.ClientSession() as session:
        async with session.post(
            f"http://127.0.0.1:{s.port}/predictions",
            data=raw,
            headers={"Content-Type": "application/json"},
        ) as resp:
            await resp.read()
    # The body arrived whole, in the buffer the parser keeps slices of (not a bytes copy).
    assert len(seen) == 1 and isinstance(seen[0], bytearray) and seen[0] == raw


async def test_a_kept_alive_connection_is_closed_after_the_keepalive_timeout() -> None:
    async with served(keepalive_timeout_s=0.3, header_timeout_s=600) as s:
        reader, writer = await s.connect()
        writer.write(b"GET /health-check HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        response = await read_until_closed(reader)
        assert response.startswith(b"HTTP/1.1 200")
        writer.close()


async def ask_health_and_stay(s: Served) -> tuple[int, asyncio.StreamWriter]:
    """One kept-alive /health-check on a fresh connection, left open afterwards."""
    reader, writer = await s.connect()
    writer.write(b"GET /health-check HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(DEADLINE_S):
        head = await reader.readuntil(b"\r\n\r\n")
        status, headers, _ = parse(head)
        if "content-length" in headers:
            await reader.readexactly(int(headers["content-length"]))
    return status, writer


async def test_at_the_cap_a_newcomer_takes_the_place_of_an_idle_connection() -> None:
    async with served(max_connections=4, header_timeout_s=600, keepalive_timeout_s=600) as s:
        # Steps: four connections that never send a request fill the pool; then four clients
        # come, each asking /health-check and staying connected; then one more.
        idle = [await s.connect() for _ in range(4)]
        await wait_until(lambda: s.site.gate.open == 4, what="four connections open")
        asked = [await ask_health_and_stay(s) for _ in range(4)]
        # Result: every newcomer is answered, each in the place of an idle connection...
        assert [status for status, _ in asked] == [200] * 4
        for reader, writer in idle:
            assert await read_until_closed(reader) == b""
            writer.close()
        assert s.site.gate.evicted == 4 and s.site.gate.refused == 0
        # ...but a connection that has made a request is never closed for a newcomer.
        reader, writer = await s.connect()
        status, _, _ = parse(await read_until_closed(reader))
        assert status == 503 and s.site.gate.refused == 1
        for _, kept in asked:
            kept.close()
        writer.close()


async def test_past_the_cap_of_busy_connections_newcomers_get_503_and_the_pool_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pool.server")
    async with served(max_connections=4, error_log_interval_s=60) as s:
        # Steps: four clients each wait for a prediction that holds; then 30 more clients come.
        busy = []
        for i in range(4):
            reader, writer = await s.connect()
            body = json.dumps({"id": f"hold-{i}", "input": {"text": "x", "hold": True}})
            writer.write(
                b"POST /predictions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
            )
            await writer.drain()
            busy.append((reader, writer))
        await wait_until(lambda: not s.site.gate.waiting and s.site.gate.open == 4, what="busy")
        answers = []
        for _ in range(30):
            reader, writer = await s.connect()
            answers.append(await read_until_closed(reader))
            writer.close()
        # Result: each is answered 503 (JSON naming the setting) and closed at once...
        for answer in answers:
            status, headers, body = parse(answer)
            assert status == 503 and "http.max_connections=4" in body["detail"]
            assert headers["connection"] == "close"
        assert s.site.gate.refused == 30
        # ...and once the busy clients go, the pool answers again.
        for _, writer in busy:
            writer.close()
        await wait_until(lambda: s.site.gate.open == 0, what="busy connections closed")
        assert await s.health() == 200
        s.site.errors.close()
        lines = [
            r.getMessage() for r in caplog.records if "http_connection_refused" in r.getMessage()
        ]
        # One line per interval, carrying the count: 30 refusals, at most two lines.
        assert 1 <= len(lines) <= 2
        assert sum(int(line.split("count=")[1].split()[0]) for line in lines) == 30


async def test_accept_failures_are_logged_once_per_interval_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pool.server")
    async with served(error_log_interval_s=60) as s:
        loop = asyncio.get_running_loop()
        error = OSError(24, "Too many open files")
        # The context asyncio passes to the loop's exception handler for each failed accept().
        for _ in range(1000):
            loop.call_exception_handler(
                {"message": "socket.accept() out of system resource", "exception": error}
            )
        s.site.errors.close()
    lines = [r.getMessage() for r in caplog.records if "http_accept_failed" in r.getMessage()]
    assert [line.split()[1] for line in lines] == ["count=1", "count=999"]


def test_the_cap_fits_under_the_open_file_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert effective_max_connections(10) == 10
    if soft != resource.RLIM_INFINITY:
        assert effective_max_connections(soft * 2) == max(1, soft - FD_RESERVE)


# --- finding 16: aiohttp's own 400s --------------------------------------------------------------
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /health-check HTTP/1.1\r\nBad Header Line\r\n\r\n",
        b"GET /health-check HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n",
    ],
)
async def test_protocol_errors_are_json_and_one_log_line(
    request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with served() as s:
        reader, writer = await s.connect()
        writer.write(request_bytes)
        await writer.drain()
        status, headers, body = parse(await read_until_closed(reader))
        writer.close()
        assert 400 <= status < 500
        assert headers["content-type"].startswith("application/json")
        assert isinstance(body["detail"], str) and body["detail"]
        assert await s.health() == 200
    assert "Traceback" not in caplog.text
    assert not any(r.exc_info for r in caplog.records)
    assert sum("http_bad_request" in r.getMessage() for r in caplog.records) == 1
