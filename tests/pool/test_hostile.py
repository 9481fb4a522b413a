"""Hostile request bodies against the real pool: each gets a clear 4xx, the pool keeps serving."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_api_e2e import MODELS, PROJECT, Api, Receiver, serving, wait_until


async def still_serving(api: Api) -> None:
    status, health = await api.call("GET", "/health-check")
    assert status == 200 and health["status"] == "READY"
    status, body = await api.call("POST", "/predictions", json={"input": {"text": "ok"}})
    assert status == 200 and body["output"] == "hello ok"


def raw(data: bytes | str) -> dict[str, Any]:
    return {"data": data, "headers": {"Content-Type": "application/json"}}


async def test_deep_nesting_is_400_never_a_crash(tmp_path: Path) -> None:
    async with serving(tmp_path) as api:
        for depth in (100, 10_000, 1_000_000):
            body = '{"input": {"text": ' + "[" * depth + "]" * depth + "}}"
            status, answer = await api.call("POST", "/predictions", **raw(body))
            assert status == 400, (depth, answer)
            assert "nested deeper" in answer["detail"]
        # Within the depth limit, a nested value of the wrong type is a plain 422.
        nested = '{"input": {"text": ' + "[" * 30 + "]" * 30 + "}}"
        status, answer = await api.call("POST", "/predictions", **raw(nested))
        assert status == 422 and answer["detail"][0]["loc"] == ["body", "input", "text"]
        await still_serving(api)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b'{"input": {"text": "\xff\xfe"}}', "not UTF-8"),
        ('{"input": {"text": "x"}, "n": NaN}', "NaN"),
        ('{"input": {"sleep_s": Infinity, "text": "x"}}', "Infinity"),
        ('{"input": {"text": "x"}, "n": ' + "9" * 5000 + "}", "a 5000-digit integer"),
        ("input=text", "a form body"),
        ('{"input": {"text": "x"}', "a truncated body"),
    ],
)
async def test_undecodable_bodies_are_400(tmp_path: Path, data: bytes | str, why: str) -> None:
    async with serving(tmp_path) as api:
        status, answer = await api.call("POST", "/predictions", **raw(data))
        assert status == 400, why
        assert isinstance(answer["detail"], str)
        await still_serving(api)


async def test_wrong_types_are_422_naming_the_field(tmp_path: Path) -> None:
    cases: list[tuple[Any, list[Any]]] = [
        ("just a string", ["body"]),
        (None, ["body"]),
        ({"input": ["text"]}, ["body", "input"]),
        ({"input": {"text": 123}}, ["body", "input", "text"]),
        ({"input": {"text": {"$gt": ""}}}, ["body", "input", "text"]),
        ({"input": {"text": "x", "sleep_s": "soon"}}, ["body", "input", "sleep_s"]),
        ({"input": {"text": "x"}, "id": 7}, ["body", "id"]),
        ({"input": {"text": "x"}, "id": "a/../../b"}, ["body", "id"]),
        ({"input": {"text": "x"}, "id": "x" * 500}, ["body", "id"]),
        (
            {"input": {"text": "x"}, "webhook_events_filter": "start"},
            ["body", "webhook_events_filter"],
        ),
        ({"input": {"text": "x"}, "context": {"k": 1}}, ["body", "context"]),
        ({"input": {"text": "x"}, "webhook": "file:///etc/passwd"}, ["body", "webhook"]),
    ]
    async with serving(tmp_path) as api:
        for body, loc in cases:
            status, answer = await api.call("POST", "/predictions", **raw(json.dumps(body)))
            assert status == 422, (body, answer)
            assert answer["detail"][0]["loc"] == loc, (body, answer)
        # A valid JSON number that overflows a float is out of range, not a crash.
        status, answer = await api.call(
            "POST", "/predictions", **raw('{"input": {"text": "x", "sleep_s": 1e999}}')
        )
        assert status == 422 and answer["detail"][0]["loc"] == ["body", "input", "sleep_s"]
        await still_serving(api)


async def test_traversal_ids_in_the_path_are_refused(tmp_path: Path) -> None:
    async with serving(tmp_path) as api:
        status, answer = await api.call("PUT", "/predictions/..%2F..%2Fetc", json={"input": {}})
        assert status == 422 and answer["detail"][0]["loc"] == ["path", "prediction_id"]
        status, answer = await api.call("GET", "/predictions/..%2F..%2Fetc")
        assert status == 404
        status, answer = await api.call("POST", "/predictions/..%2F..%2Fetc/cancel")
        assert status == 404
        await still_serving(api)


async def test_huge_strings_are_carried_through(tmp_path: Path) -> None:
    text = "x" * (4 * 1024 * 1024)
    async with serving(tmp_path) as api:
        status, body = await api.call(
            "POST", "/predictions", json={"input": {"text": text, "unknown": "y" * 1_000_000}}
        )
        assert status == 200 and body["output"] == "hello " + text
        await still_serving(api)


async def test_body_over_the_limit_is_413_json(tmp_path: Path) -> None:
    async with serving(tmp_path, http__max_body_bytes=64 * 1024) as api:
        status, answer = await api.call(
            "POST", "/predictions", json={"input": {"text": "x" * 100_000}}
        )
        assert status == 413 and "detail" in answer
        await still_serving(api)


# --- SSRF and the pool's own /shutdown (issue 7, finding 4) ---------------------------------------
async def test_a_webhook_the_network_policy_refuses_is_422_at_submission(
    tmp_path: Path, receiver: Receiver
) -> None:
    async with serving(tmp_path, network__allow_cidrs=[]) as api:
        # Steps: a client sends webhooks to a loopback receiver (a literal address, and a name
        # that resolves to it) and to a host that does not resolve; by POST and by PUT.
        cases = {
            receiver.url("/hook/a?token=TOPSECRET"): "127.0.0.1 is a loopback address",
            receiver.url("/hook/a").replace("127.0.0.1", "localhost"): (
                "localhost resolves only to refused addresses"
            ),
            "http://no-such-host.invalid/hook": "its host no-such-host.invalid did not resolve",
        }
        answers = []
        for hook, why in cases.items():
            body = {"input": {"text": "x"}, "webhook": hook}
            answers.append((why, await api.call("POST", "/predictions", json=body)))
            answers.append((why, await api.call("PUT", "/predictions/hooked", json=body)))
        status, _ = await api.call("GET", "/predictions/hooked")
        # Result: each is a 422 naming the field, the URL (no query) and why; nothing was
        # created or sent, and the pool serves on.
        assert status == 404
        for why, (code, answer) in answers:
            assert code == 422, answer
            (detail,) = answer["detail"]
            assert detail["loc"] == ["body", "webhook"] and why in detail["msg"], detail
            assert "/hook" in detail["msg"] and "TOPSECRET" not in detail["msg"]
        assert "network.allow_cidrs" in answers[0][1][1]["detail"][0]["msg"]
        assert receiver.hooks == {}
        await still_serving(api)


async def test_a_webhook_allowed_at_submission_is_still_checked_when_sent(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    # Steps: the receiver's name resolves to a public address when the prediction is
    # submitted, and to loopback by the time the webhook is sent (DNS rebinding).
    caplog.set_level(logging.INFO)
    async with serving(tmp_path, network__allow_cidrs=[]) as api:
        answers = iter([["93.184.216.34"]])
        checker = api.manager._webhooks._checker  # the submission-time check's resolver
        checker._resolve = lambda host, port: next(answers)
        hook = receiver.url("/hook/a").replace("127.0.0.1", "localhost")
        status, body = await api.call(
            "POST", "/predictions", json={"input": {"text": "x"}, "webhook": hook}
        )
        assert status == 200 and body["status"] == "succeeded", body
        await wait_until(lambda: "webhook_refused" in caplog.text, "webhook_refused logged")
    # Result: accepted, but the send found loopback and refused it; nothing arrived.
    assert receiver.hooks == {}



async def test_urls_to_internal_addresses_are_refused_and_cannot_stop_the_pool(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    # Steps: with the default network policy, one prediction names an input file on a loopback
    # server and another sends its webhook to the pool's own POST /shutdown.
    receiver.files["doc.txt"] = b"internal"
    caplog.set_level(logging.INFO)
    async with serving(tmp_path, model="files", network__allow_cidrs=[]) as api:
        url = receiver.url("/files/doc.txt?X-Amz-Signature=TOPSECRET")
        status, body = await api.call("POST", "/predictions", json={"input": {"doc": url}})
        # Result: the prediction fails naming the field, the URL and why; nothing was fetched.
        assert status == 200 and body["status"] == "failed", body
        assert "'doc'" in body["error"] and receiver.url("/files/doc.txt") in body["error"]
        assert "loopback" in body["error"] and "network.allow_cidrs" in body["error"]
        assert "TOPSECRET" not in body["error"]

        # The webhook is refused at submission (422), before anything runs or is sent.
        hook = api.url("/shutdown?token=TOPSECRET")
        status, body = await api.call(
            "POST", "/predictions", json={"input": {"doc": "data:,x"}, "webhook": hook}
        )
        assert status == 422, body
        (detail,) = body["detail"]
        assert detail["loc"] == ["body", "webhook"] and api.url("/shutdown") in detail["msg"]
        assert "loopback" in detail["msg"] and "TOPSECRET" not in detail["msg"]
        status, health = await api.call("GET", "/health-check")
        assert status == 200 and health["status"] == "READY" and "shutting_down" not in health
        status, body = await api.call("POST", "/predictions", json={"input": {"doc": "data:,y"}})
        assert status == 200 and body["status"] == "succeeded", body
    assert "TOPSECRET" not in caplog.text


async def test_a_queue_message_cannot_stop_the_pool_through_its_webhook(tmp_path: Path) -> None:
    # Steps: a served pool (the real CLI) consumes a Redis stream and, as an operator with a
    # local receiver might, allows loopback; a message's webhook is the pool's own /shutdown.
    import redis.asyncio as aioredis

    stream = f"test-hostile-{uuid.uuid4().hex[:12]}"
    log_path = tmp_path / "serve.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("COG_POOL_")},
        "PYTHONPATH": str(PROJECT),
        "COG_POOL_QUEUES_REDIS_URL": "redis://127.0.0.1:6379/0",
        "COG_POOL_QUEUES_REDIS_STREAM": stream,
        "COG_POOL_QUEUES_REDIS_GROUP": f"{stream}:group",
        "COG_POOL_QUEUES_REDIS_RESULTS_STREAM": f"{stream}:results",
        "COG_POOL_QUEUES_REDIS_CANCEL_CHANNEL": f"{stream}:cancel",
        "COG_POOL_QUEUES_REDIS_BLOCK_MS": "200",
        "COG_POOL_NETWORK_ALLOW_CIDRS": "127.0.0.1/32",
    }
    client = aioredis.from_url("redis://127.0.0.1:6379/0")
    with open(log_path, "wb") as log:  # noqa: ASYNC230 -- before the pool starts
        proc = subprocess.Popen(  # noqa: ASYNC220 -- its log goes to a file, read by polling
            [sys.executable, "-m", "cogpool", "serve", str(MODELS / "echo"), "--port", "0",
             "--state-dir", str(tmp_path / "state")],
            cwd=str(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        port = int((await wait_until(lambda: _listening(log_path), "http_listening")).group(1))
        await wait_until(lambda: "pool_ready" in log_path.read_text(), "pool ready")
        message = {
            "id": "hook-shutdown",
            "input": {"text": "q"},
            "webhook": f"http://127.0.0.1:{port}/shutdown",
            "webhook_events_filter": ["completed"],
        }
        await client.xadd(stream, {"value": json.dumps(message)})
        text = await wait_until(
            lambda: re.search(r"http_shutdown_refused|serve_stopping", log_path.read_text()),
            "the webhook reaches /shutdown",
        )
        assert text.group(0) == "http_shutdown_refused", log_path.read_text()
        # Result: the pool refused to stop; it still answers and runs predictions.
        assert proc.poll() is None, log_path.read_text()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/health-check") as r:
                assert r.status == 200 and (await r.json())["status"] == "READY"
            async with session.post(
                f"http://127.0.0.1:{port}/predictions", json={"input": {"text": "after"}}
            ) as r:
                assert r.status == 200 and (await r.json())["output"] == "hello after"
        assert "serve_stopping" not in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        await client.delete(stream, f"{stream}:results", f"{stream}:dead")
        await client.aclose()


def _listening(log_path: Path) -> re.Match[str] | None:
    return re.search(r"http_listening host=\S+ port=(\d+)", log_path.read_text())
