"""pool/webhooks.py against a real local HTTP receiver that records every call."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from pool.config import NetworkConfig, WebhooksConfig
from pool.files import FileOutput
from pool.jsonstream import TextSlices
from pool.metrics import Metrics
from pool.prediction import Prediction, PredictionRequest
from pool.webhooks import WebhookSender

DEADLINE_S = 20.0


@dataclass
class Receiver:
    """A webhook endpoint: records calls per path; statuses and holds are set per path."""

    server: TestServer | None = None
    calls: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    statuses: dict[str, list[int]] = field(default_factory=dict)  # popped per call, then 200
    holds: dict[str, asyncio.Event] = field(default_factory=dict)  # answer only once set
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path
        self.calls.setdefault(path, []).append(await request.json())
        self.changed.set()
        hold = self.holds.get(path)
        if hold is not None:
            await hold.wait()
        statuses = self.statuses.get(path)
        return web.Response(status=statuses.pop(0) if statuses else 200)

    async def wait_for(self, check: Callable[[], bool]) -> None:
        async def loop() -> None:
            while not check():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(loop(), DEADLINE_S)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/{name}", rec.handle)
    rec.server = TestServer(app)
    await rec.server.start_server()
    yield rec
    for hold in rec.holds.values():
        hold.set()
    await rec.server.close()


def make_sender(**overrides: Any) -> tuple[WebhookSender, Metrics]:
    options: dict[str, Any] = {"throttle_s": 0.2, "retry_initial_s": 0.01, "retry_max_s": 0.05}
    options.update(overrides)
    metrics = Metrics()
    # The receivers listen on loopback, which the default network policy refuses.
    network = NetworkConfig(allow_cidrs=("127.0.0.1/32",))
    return WebhookSender(WebhooksConfig(**options), network=network, metrics=metrics), metrics


def prediction_for(url: str, events: tuple[str, ...] | None = None, pid: str = "p1") -> Prediction:
    body: dict[str, Any] = {"id": pid, "input": {"text": "hi"}, "webhook": url}
    if events is not None:
        body["webhook_events_filter"] = list(events)
    return Prediction(PredictionRequest.from_body(body))


def terminal(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in calls if c["status"] in ("succeeded", "failed", "canceled")]


async def test_all_events_arrive_in_order_with_one_terminal(receiver: Receiver) -> None:
    # Steps: start, one log line, one output, success; then close the sender.
    sender, metrics = make_sender()
    p = prediction_for(receiver.url("/all"))
    sender.watch(p)
    p.mark_started(0)
    await receiver.wait_for(lambda: len(receiver.calls.get("/all", [])) >= 1)
    p.apply_delta({"status": "processing", "logs_append": "line 1\n"})
    await receiver.wait_for(lambda: len(receiver.calls["/all"]) >= 2)
    p.apply_delta({"status": "succeeded", "output": "done"})
    await sender.close(DEADLINE_S)
    # Result: start (processing), the logs progress, then exactly one terminal with everything.
    calls = receiver.calls["/all"]
    assert [c["status"] for c in calls] == ["processing", "processing", "succeeded"]
    assert calls[0]["logs"] == ""
    assert calls[1]["logs"] == "line 1\n"
    assert calls[2]["output"] == "done" and calls[2]["logs"] == "line 1\n"
    assert calls[2]["webhook_events_filter"] == ["start", "output", "logs", "completed"]
    assert metrics.render().count("cog_pool_webhook_failures_total 0") == 1


async def test_filter_completed_only_sends_just_the_terminal(receiver: Receiver) -> None:
    sender, _ = make_sender()
    p = prediction_for(receiver.url("/done"), ("completed",))
    sender.watch(p)
    p.mark_started(0)
    p.apply_delta({"status": "processing", "logs_append": "a\n", "output_append": [1]})
    await asyncio.sleep(0)  # let the sender's task observe the (filtered-out) changes
    p.apply_delta({"status": "succeeded", "output_append": [2]})
    await sender.close(DEADLINE_S)
    calls = receiver.calls["/done"]
    assert len(calls) == 1
    assert calls[0]["status"] == "succeeded" and calls[0]["output"] == [1, 2]


async def test_filter_start_only_never_sends_the_terminal(receiver: Receiver) -> None:
    sender, _ = make_sender()
    p = prediction_for(receiver.url("/start"), ("start",))
    sender.watch(p)
    p.mark_started(0)
    await receiver.wait_for(lambda: len(receiver.calls.get("/start", [])) == 1)
    p.apply_delta({"status": "succeeded", "output": "x"})
    await sender.close(DEADLINE_S)
    assert [c["status"] for c in receiver.calls["/start"]] == ["processing"]


async def test_throttle_coalesces_logs_and_latest_state_wins(receiver: Receiver) -> None:
    # Steps: one log line is sent at once; nine more arrive inside the throttle window.
    sender, _ = make_sender(throttle_s=0.3)
    p = prediction_for(receiver.url("/logs"), ("logs", "completed"))
    sender.watch(p)
    p.mark_started(0)
    p.apply_delta({"status": "processing", "logs_append": "line 0\n"})
    await receiver.wait_for(lambda: len(receiver.calls.get("/logs", [])) == 1)
    for i in range(1, 10):
        p.apply_delta({"status": "processing", "logs_append": f"line {i}\n"})
    await receiver.wait_for(lambda: len(receiver.calls["/logs"]) == 2)
    p.apply_delta({"status": "succeeded", "output": "ok"})
    await sender.close(DEADLINE_S)
    # Result: the nine coalesce into one webhook holding all ten lines; then the terminal.
    calls = receiver.calls["/logs"]
    assert len(calls) == 3
    assert calls[0]["logs"] == "line 0\n"
    assert calls[1]["logs"] == "".join(f"line {i}\n" for i in range(10))
    assert calls[1]["status"] == "processing"
    assert calls[2]["status"] == "succeeded"


async def test_final_state_is_not_dropped_without_completed_in_filter(
    receiver: Receiver,
) -> None:
    sender, _ = make_sender(throttle_s=5.0)
    p = prediction_for(receiver.url("/out"), ("output",))
    sender.watch(p)
    p.mark_started(0)
    p.apply_delta({"status": "processing", "output_append": ["a"]})
    await receiver.wait_for(lambda: len(receiver.calls.get("/out", [])) == 1)
    # Inside the (long) throttle window: one more output, then the end.
    p.apply_delta({"status": "processing", "output_append": ["b"]})
    p.apply_delta({"status": "succeeded"})
    await sender.close(DEADLINE_S)
    calls = receiver.calls["/out"]
    assert [c["output"] for c in calls] == [["a"], ["a", "b"]]


@pytest.mark.parametrize("first_status", [500, 503, 429])
async def test_terminal_is_retried_after_a_retryable_status(
    receiver: Receiver, first_status: int
) -> None:
    receiver.statuses["/flaky"] = [first_status]
    sender, metrics = make_sender()
    p = prediction_for(receiver.url("/flaky"), ("completed",))
    sender.watch(p)
    p.mark_started(0)
    p.apply_delta({"status": "failed", "error": "boom"})
    await sender.close(DEADLINE_S)
    calls = receiver.calls["/flaky"]
    assert len(calls) == 2
    assert all(c["status"] == "failed" and c["error"] == "boom" for c in calls)
    assert "cog_pool_webhook_failures_total 0" in metrics.render()


async def test_terminal_is_not_retried_after_a_client_error(receiver: Receiver) -> None:
    receiver.statuses["/gone"] = [410]
    sender, metrics = make_sender()
    p = prediction_for(receiver.url("/gone"), ("completed",))
    sender.watch(p)
    p.apply_delta({"status": "succeeded", "output": 1})
    await sender.close(DEADLINE_S)
    assert len(receiver.calls["/gone"]) == 1
    assert "cog_pool_webhook_failures_total 1" in metrics.render()


def closed_port_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there any more: connections are refused
    return f"http://127.0.0.1:{port}/hook"


async def test_dead_webhook_gives_up_after_max_attempts_and_counts_a_failure() -> None:
    sender, metrics = make_sender(max_attempts=3)
    p = prediction_for(closed_port_url())
    sender.watch(p)
    p.mark_started(0)
    p.apply_delta({"status": "succeeded", "output": "x"})
    await sender.close(DEADLINE_S)
    assert "cog_pool_webhook_failures_total 1" in metrics.render()


async def test_slow_webhook_does_not_delay_another_prediction(receiver: Receiver) -> None:
    # Steps: prediction A's receiver hangs; prediction B finishes after A.
    receiver.holds["/slow"] = asyncio.Event()
    sender, _ = make_sender()
    a = prediction_for(receiver.url("/slow"), ("completed",), pid="a")
    b = prediction_for(receiver.url("/fast"), ("completed",), pid="b")
    sender.watch(a)
    sender.watch(b)
    a.apply_delta({"status": "succeeded", "output": "a"})
    await receiver.wait_for(lambda: len(receiver.calls.get("/slow", [])) == 1)
    b.apply_delta({"status": "succeeded", "output": "b"})
    # Result: B's terminal arrives while A's is still unanswered.
    await receiver.wait_for(lambda: len(receiver.calls.get("/fast", [])) == 1)
    assert not receiver.holds["/slow"].is_set()
    receiver.holds["/slow"].set()
    await sender.close(DEADLINE_S)
    assert len(receiver.calls["/slow"]) == 1


async def test_close_cancels_a_webhook_that_never_answers(receiver: Receiver) -> None:
    receiver.holds["/never"] = asyncio.Event()
    sender, _ = make_sender(timeout_s=DEADLINE_S * 3)
    p = prediction_for(receiver.url("/never"), ("completed",))
    sender.watch(p)
    p.apply_delta({"status": "succeeded", "output": 1})
    await receiver.wait_for(lambda: len(receiver.calls.get("/never", [])) == 1)
    await asyncio.wait_for(sender.close(0.1), DEADLINE_S)
    assert not sender._tasks


async def test_watch_without_webhook_is_a_no_op() -> None:
    sender, _ = make_sender()
    p = Prediction(PredictionRequest.from_body({"input": {}}))
    sender.watch(p)
    assert not sender._tasks
    await sender.close(1.0)


async def test_webhook_urls_are_logged_without_credentials_or_query(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    # Steps: the receiver refuses the terminal webhook for good (503 then 410), and a second
    # prediction's webhook points at a closed port; both URLs carry secrets.
    caplog.set_level(logging.DEBUG)
    receiver.statuses["/hook"] = [503, 410]
    url = receiver.url("/hook").replace("http://", "http://user:PASSWORD@") + "?token=TOPSECRET"
    sender, _ = make_sender(max_attempts=2)
    first = prediction_for(url, pid="r1")
    second = prediction_for(closed_port_url() + "?token=TOPSECRET", pid="r2")
    for p in (first, second):
        sender.watch(p)
        p.mark_started(0)
        p.apply_delta({"status": "succeeded", "output": "x"})
    await sender.close(DEADLINE_S)
    # Result: the failures are logged with the URL's host and path, never its secrets.
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("pool"))
    assert "webhook_failed prediction=r1" in ours and "webhook_failed prediction=r2" in ours
    assert receiver.url("/hook") in ours
    assert "TOPSECRET" not in ours and "PASSWORD" not in ours


async def test_a_large_terminal_webhook_is_streamed_and_retried_whole(tmp_path: Path) -> None:
    seen: list[tuple[str, bytes]] = []
    statuses = [503, 200]

    async def handle(request: web.Request) -> web.Response:
        seen.append((request.headers.get("Transfer-Encoding", ""), await request.read()))
        return web.Response(status=statuses.pop(0))

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/big", handle)
    server = TestServer(app)
    await server.start_server()
    try:
        # Steps: a prediction ends with a 3 MiB string (as slices) and a 2 MiB file kept on
        # disk; the receiver answers 503 once.
        data = bytes(range(256)) * (2 << 12)
        path = tmp_path / "out.bin"
        path.write_bytes(data)
        text = "t" * (3 << 20)
        output = {"text": TextSlices([text[: 1 << 20], text[1 << 20 :]]), "file": None}
        output["file"] = FileOutput(str(path), "application/octet-stream", len(data))
        sender, _ = make_sender()
        p = prediction_for(str(server.make_url("/big")), ("completed",))
        sender.watch(p)
        p.mark_started(0)
        p.apply_delta({"status": "succeeded", "output": output})
        await sender.close(DEADLINE_S)
    finally:
        await server.close()
    # Result: two attempts, each a chunked stream of the whole JSON.
    assert [encoding for encoding, _ in seen] == ["chunked", "chunked"]
    for _, body in seen:
        sent = json.loads(body)
        assert sent["output"]["text"] == text
        uri = "data:application/octet-stream;base64," + base64.b64encode(data).decode()
        assert sent["output"]["file"] == uri
