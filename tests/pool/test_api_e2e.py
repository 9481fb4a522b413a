"""The HTTP API end to end: real socket, real PoolManager, real coglet runner processes.

Each scenario serves a fixture model from tests/models/api with one CPU runner, the way the
CLI serves it (web.AppRunner with aiohttp's default handler_cancellation=False).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import sys
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pool_helpers
from aiohttp import web

from pool.api import create_app
from pool.config import load_config
from pool.manager import PoolManager
from pool.metrics import Metrics
from pool.server import start_http

MODELS = Path(__file__).resolve().parent.parent / "models" / "api"
PROJECT = MODELS.parent.parent.parent
DEADLINE_S = 60.0  # runner start-up on a shared 2-core machine can be slow
FAST = {
    "runners.count": 1,
    "runners.backoff_initial_s": 0.05,
    "runners.backoff_max_s": 0.5,
    "runners.cancel_grace_s": 5.0,
    "shutdown.grace_s": 10.0,
    "webhooks.retry_initial_s": 0.01,
    "webhooks.retry_max_s": 0.05,
    "webhooks.throttle_s": 0.2,
    # The receivers below listen on loopback, which the default network policy refuses:
    # allow it, as an operator with a local file server or webhook receiver would.
    "network.allow_cidrs": ["127.0.0.1/32"],
}


async def wait_until(check: Callable[[], Any], what: str, timeout_s: float = DEADLINE_S) -> Any:
    """Poll ``check`` until truthy; fail after the deadline."""
    return await pool_helpers.wait_until(check, timeout_s=timeout_s, what=what)


class Api:
    def __init__(self, port: int, session: aiohttp.ClientSession, manager: PoolManager) -> None:
        self.port = port
        self.session = session
        self.manager = manager

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.session.request(method, self.url(path), **kw) as resp:
            text = await resp.text()
            if resp.content_type == "application/json":
                return resp.status, json.loads(text)
            return resp.status, text

    async def status_of(self, prediction_id: str) -> str:
        status, body = await self.call("GET", f"/predictions/{prediction_id}")
        assert status == 200, body
        return str(body["status"])


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, model: str = "echo", **overrides: Any) -> AsyncIterator[Api]:
    """Serve ``model``; yield once /health-check says READY; drain and stop after."""
    values = {
        "model.path": str(MODELS / model),
        "state_dir": str(tmp_path / "state"),
        **FAST,
        **{k.replace("__", "."): v for k, v in overrides.items()},
    }
    config = load_config(None, env={}, overrides=values)
    metrics = Metrics()
    manager = PoolManager(config, metrics=metrics)
    runner = web.AppRunner(create_app(config, manager, metrics=metrics))
    await runner.setup()
    try:
        await start_http(runner, config.http, host="127.0.0.1", port=0)  # as the CLI serves
        async with aiohttp.ClientSession() as session:
            api = Api(runner.addresses[0][1], session, manager)
            await wait_until(lambda: manager.status == "READY", "pool READY")
            status, health = await api.call("GET", "/health-check")
            assert status == 200 and health["status"] == "READY", health
            yield api
    finally:
        await runner.cleanup()


class Receiver:
    """A local HTTP server: records webhooks, serves input files, takes uploads."""

    def __init__(self) -> None:
        self.hooks: dict[str, list[dict[str, Any]]] = {}
        self.hold = asyncio.Event()
        self.files: dict[str, bytes] = {}
        self.uploads: dict[str, bytes] = {}
        self.port = 0
        app = web.Application(client_max_size=64 << 20)  # webhooks of large outputs
        app.router.add_post("/hook/{name}", self.hook)
        app.router.add_get("/files/{name}", self.file)
        app.router.add_put("/upload/{name}", self.upload)
        self.runner = web.AppRunner(app)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def hook(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.hooks.setdefault(name, []).append(await request.json())
        if name == "slow":
            await self.hold.wait()
        return web.Response()

    async def file(self, request: web.Request) -> web.Response:
        if request.match_info["name"] == "slow.txt":
            await self.hold.wait()
        data = self.files.get(request.match_info["name"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data)

    async def upload(self, request: web.Request) -> web.Response:
        self.uploads[request.match_info["name"]] = await request.read()
        return web.Response(status=201)

    def terminal(self, name: str) -> list[dict[str, Any]]:
        return [
            h
            for h in self.hooks.get(name, [])
            if h["status"] in ("succeeded", "failed", "canceled")
        ]


@contextlib.asynccontextmanager
async def listening_receiver() -> AsyncIterator[Receiver]:
    """A webhook receiver on a free loopback port (the ``receiver`` fixture, conftest.py)."""
    rec = Receiver()
    await rec.runner.setup()
    site = web.TCPSite(rec.runner, "127.0.0.1", 0)
    await site.start()
    rec.port = rec.runner.addresses[0][1]
    try:
        yield rec
    finally:
        rec.hold.set()
        await rec.runner.cleanup()


def closed_port_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}/hook"


# --- scenarios -----------------------------------------------------------------------------------
async def test_sync_prediction_schema_health_and_metrics(tmp_path: Path) -> None:
    async with serving(tmp_path) as api:
        status, body = await api.call("POST", "/predictions", json={"input": {"text": "world"}})
        assert status == 200, body
        assert body["status"] == "succeeded" and body["output"] == "hello world"
        assert "echoing world" in body["logs"]
        assert body["metrics"]["predict_time"] >= 0
        status, again = await api.call("GET", f"/predictions/{body['id']}")
        assert status == 200 and again["output"] == "hello world"

        status, schema = await api.call("GET", "/openapi.json")
        assert status == 200
        assert set(schema["components"]["schemas"]["Input"]["properties"]) == {
            "text",
            "sleep_s",
            "fail",
        }
        assert "/predictions" in schema["paths"]
        # Every component the paths refer to comes with the runner's schema.
        assert {"PredictionRequest", "PredictionResponse", "HTTPValidationError"} <= set(
            schema["components"]["schemas"]
        )

        status, health = await api.call("GET", "/health-check")
        assert health["runners"][0]["status"] == "READY"

        status, text = await api.call("GET", "/metrics")
        assert status == 200
        lines = text.splitlines()
        assert 'cog_pool_predictions_total{source="http",status="succeeded"} 1.0' in lines
        assert 'cog_pool_runners{state="READY"} 1.0' in lines
        assert "cog_pool_predict_seconds_count 1.0" in lines
        assert 'cog_pool_runner_predictions_total{runner="0"} 1.0' in lines
        rss = [x for x in lines if x.startswith("cog_pool_runner_resident_memory_bytes{")]
        assert rss and rss[0].startswith('cog_pool_runner_resident_memory_bytes{gpu="",runner="0"')
        assert float(rss[0].split()[-1]) > 1_000_000  # a Python process is megabytes
        assert any(x.startswith("process_resident_memory_bytes ") for x in lines)


async def test_failed_prediction_answers_200_and_invalid_input_422(tmp_path: Path) -> None:
    async with serving(tmp_path) as api:
        status, body = await api.call(
            "POST", "/predictions", json={"input": {"text": "x", "fail": True}}
        )
        assert status == 200 and body["status"] == "failed"
        assert "asked to fail on x" in body["error"]
        status, body = await api.call("POST", "/predictions", json={"input": {"sleep_s": 1}})
        assert status == 422
        assert body["detail"][0]["loc"] == ["body", "input", "text"]
        assert body["detail"][0]["msg"] == "missing required input field: text"
        status, body = await api.call("POST", "/predictions", json={"input": {"text": ""}})
        assert status == 422 and "len() >= 1" in body["detail"][0]["msg"]
        status, text = await api.call("GET", "/metrics")
        assert 'cog_pool_predictions_total{source="http",status="failed"} 1' in text


async def test_async_prediction_with_webhooks_and_cancel(
    tmp_path: Path, receiver: Receiver
) -> None:
    async with serving(tmp_path) as api:
        # Steps: an async prediction that would run for minutes, with every webhook event.
        status, body = await api.call(
            "PUT",
            "/predictions/long1",
            json={"input": {"text": "x", "sleep_s": 300}, "webhook": receiver.url("/hook/all")},
            headers={"Prefer": "respond-async"},
        )
        assert status == 202 and body["id"] == "long1"
        await wait_until(lambda: receiver.hooks.get("all"), "the start webhook")
        # The same PUT again is idempotent: the running prediction, not a second one.
        status, again = await api.call(
            "PUT",
            "/predictions/long1",
            json={"input": {"text": "x", "sleep_s": 300}},
            headers={"Prefer": "respond-async"},
        )
        assert status == 202 and again["created_at"] == body["created_at"]
        status, _ = await api.call("POST", "/predictions/long1/cancel")
        assert status == 200
        await wait_until(lambda: receiver.terminal("all"), "the terminal webhook")
        # Result: start first, then exactly one terminal saying canceled.
        hooks = receiver.hooks["all"]
        assert hooks[0]["status"] == "processing"
        assert [h["status"] for h in receiver.terminal("all")] == ["canceled"]
        assert await api.status_of("long1") == "canceled"
        status, _ = await api.call("POST", "/predictions/never-seen/cancel")
        assert status == 404


async def test_stream_webhooks_are_throttled_and_the_final_state_is_complete(
    tmp_path: Path, receiver: Receiver
) -> None:
    async with serving(tmp_path, model="stream") as api:
        status, body = await api.call(
            "POST",
            "/predictions",
            json={
                "input": {"n": 40, "pause_s": 0.02},
                "webhook": receiver.url("/hook/stream"),
                "webhook_events_filter": ["output", "completed"],
            },
        )
        assert status == 200 and body["output"] == [f"t{i}" for i in range(40)]
        await wait_until(lambda: receiver.terminal("stream"), "the terminal webhook")
        hooks = receiver.hooks["stream"]
        # 40 outputs over ~0.8 s with a 0.2 s throttle: far fewer webhooks than outputs.
        assert len(hooks) < 40
        assert len(receiver.terminal("stream")) == 1
        assert hooks[-1]["output"] == body["output"]
        lengths = [len(h["output"] or []) for h in hooks]
        assert lengths == sorted(lengths)  # in order: each shows at least what came before


async def test_dead_and_slow_webhooks_do_not_hold_the_runner(
    tmp_path: Path, receiver: Receiver
) -> None:
    async with serving(tmp_path, webhooks__max_attempts=1000, webhooks__timeout_s=2.0) as api:
        # Steps: one prediction whose webhook refuses connections (retried ~forever), one
        # whose webhook never answers; then a plain sync prediction on the single runner.
        for name, hook in (("dead", closed_port_url()), ("slow", receiver.url("/hook/slow"))):
            status, body = await api.call(
                "POST",
                "/predictions",
                json={"id": name, "input": {"text": name}, "webhook": hook},
            )
            assert status == 200 and body["status"] == "succeeded"
        await wait_until(lambda: receiver.terminal("slow"), "the slow terminal webhook")
        status, body = await api.call("POST", "/predictions", json={"input": {"text": "next"}})
        # Result: it runs while both webhooks are still pending.
        assert status == 200 and body["output"] == "hello next"
        assert not receiver.hold.is_set()


async def test_sync_client_disconnect_cancels_the_prediction(tmp_path: Path) -> None:
    async with serving(tmp_path) as api:
        request = asyncio.ensure_future(
            api.call(
                "POST", "/predictions", json={"id": "bye", "input": {"text": "x", "sleep_s": 300}}
            )
        )
        await wait_until(lambda: api.manager.get("bye"), "the prediction to exist")
        await wait_until(lambda: api.manager.get("bye").status == "processing", "it to run")
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
        await wait_until(lambda: api.manager.get("bye").status == "canceled", "the cancel")
        # The runner is free again.
        status, body = await api.call("POST", "/predictions", json={"input": {"text": "y"}})
        assert status == 200 and body["output"] == "hello y"


async def test_file_inputs_from_urls_and_data_uris_output_as_data_uri(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.files["doc.txt"] = b"from a url"
    data_uri = "data:text/plain," + urllib.parse.quote("from data")
    b64_uri = "data:text/plain;base64," + base64.b64encode(b"b64 too").decode()
    async with serving(tmp_path, model="files") as api:
        status, body = await api.call(
            "POST",
            "/predictions",
            json={"input": {"doc": receiver.url("/files/doc.txt"), "extra": [data_uri, b64_uri]}},
        )
        assert status == 200 and body["status"] == "succeeded", body
        assert body["input"]["doc"] == receiver.url("/files/doc.txt")  # as the client sent it
        prefix = "data:text/plain;base64,"
        assert body["output"].startswith(prefix)
        assert base64.b64decode(body["output"][len(prefix) :]) == b"FROM A URL|FROM DATA|B64 TOO"
        assert "read doc.txt" in body["logs"]

        status, body = await api.call(
            "POST", "/predictions", json={"input": {"doc": receiver.url("/files/missing.txt")}}
        )
        assert status == 200 and body["status"] == "failed"
        assert "/files/missing.txt" in body["error"] and "404" in body["error"]

        status, body = await api.call(
            "POST", "/predictions", json={"input": {"doc": "/etc/passwd"}}
        )
        assert status == 422 and body["detail"][0]["loc"] == ["body", "input", "doc"]


async def test_failed_download_is_recorded_and_cancel_during_download_works(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.files["slow.txt"] = b"late"
    async with serving(tmp_path, model="files") as api:
        # A download that fails: the prediction is kept, so GET and PUT see it as failed.
        status, body = await api.call(
            "PUT",
            "/predictions/dl-missing",
            json={"input": {"doc": receiver.url("/files/missing.txt")}},
            headers={"Prefer": "respond-async"},
        )
        assert status == 202
        await wait_until(lambda: api.manager.get("dl-missing"), "the failed prediction")
        status, body = await api.call("GET", "/predictions/dl-missing")
        assert status == 200 and body["status"] == "failed" and "404" in body["error"]

        # Cancel while the input is still downloading: it ends canceled, never runs.
        submit = asyncio.ensure_future(
            api.call(
                "PUT",
                "/predictions/dl-slow",
                json={"input": {"doc": receiver.url("/files/slow.txt")}},
                headers={"Prefer": "respond-async"},
            )
        )
        await wait_until(lambda: api.manager.get("dl-slow"), "the download to begin")
        status, _ = await api.call("POST", "/predictions/dl-slow/cancel")
        assert status == 200
        receiver.hold.set()
        status, body = await submit
        await wait_until(
            lambda: api.manager.get("dl-slow").status == "canceled", "the canceled prediction"
        )
        status, body = await api.call("GET", "/predictions/dl-slow")
        assert body["status"] == "canceled" and body["output"] is None


async def test_put_reruns_an_id_whose_runner_died(tmp_path: Path) -> None:
    async with serving(tmp_path) as api:
        # Steps: PUT a long prediction; kill its runner; PUT the same id again.
        body = {"input": {"text": "x", "sleep_s": 60}}
        hdrs = {"Prefer": "respond-async"}
        status, _ = await api.call("PUT", "/predictions/lost", json=body, headers=hdrs)
        assert status == 202
        await wait_until(lambda: api.manager.get("lost").status == "processing", "it to run")
        pid = api.manager.health()["runners"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: api.manager.get("lost").status == "failed", "the death")
        status, failed = await api.call("GET", "/predictions/lost")
        assert failed["error"].startswith("runner 0 (cpu) died: killed by SIGKILL")
        await wait_until(lambda: api.manager.status == "READY", "the restart")
        status, again = await api.call("PUT", "/predictions/lost", json=body, headers=hdrs)
        # Result: a new run under the same id, not the recorded failure.
        assert status == 202 and again["status"] in ("starting", "processing")
        await wait_until(lambda: api.manager.get("lost").status == "processing", "the rerun")
        status, _ = await api.call("POST", "/predictions/lost/cancel")
        assert status == 200


async def test_path_output_is_uploaded(tmp_path: Path, receiver: Receiver) -> None:
    async with serving(tmp_path, model="files", files__upload_url=receiver.url("/upload/")) as api:
        status, body = await api.call(
            "POST", "/predictions", json={"input": {"doc": "data:,up%20load"}}
        )
        assert status == 200 and body["status"] == "succeeded", body
        assert body["output"] == receiver.url("/upload/result.txt")
        assert receiver.uploads["result.txt"] == b"UP LOAD"


async def test_post_shutdown_drains_and_the_served_process_exits_0(tmp_path: Path) -> None:
    # Steps: serve the echo model with the real CLI on a free port; run one prediction, start
    # a long async one, then POST /shutdown with a short grace.
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT),
        "COG_POOL_SHUTDOWN_GRACE_S": "1",
        "COG_POOL_HTTP_ALLOW_SHUTDOWN": "true",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cogpool", "serve", str(MODELS / "echo"), "--port", "0",
        "--state-dir", str(tmp_path / "state"), "--log-level", "info",
        cwd=str(tmp_path), env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        port = await asyncio.wait_for(_listening_port(proc.stderr), DEADLINE_S)
        async with aiohttp.ClientSession() as session:
            api = Api(port, session, manager=None)  # type: ignore[arg-type]
            await wait_until_ready(api)
            status, body = await api.call("POST", "/predictions", json={"input": {"text": "a"}})
            assert status == 200 and body["output"] == "hello a"
            status, body = await api.call(
                "POST",
                "/predictions",
                json={"id": "cut", "input": {"text": "b", "sleep_s": 300}},
                headers={"Prefer": "respond-async"},
            )
            assert status == 202
            status, _ = await api.call("POST", "/shutdown")
            assert status == 200
        # Result: the process drains (canceling the long prediction) and exits 0.
        rc = await asyncio.wait_for(_drain_and_wait(proc), DEADLINE_S)
        assert rc == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _listening_port(stream: asyncio.StreamReader) -> int:
    while line := await stream.readline():
        m = re.search(rb"http_listening host=\S+ port=(\d+)", line)
        if m:
            return int(m.group(1))
    raise AssertionError("the server exited before it listened")


async def _drain_and_wait(proc: asyncio.subprocess.Process) -> int:
    assert proc.stderr is not None
    while await proc.stderr.readline():  # keep the pipe from filling while it drains
        pass
    return await proc.wait()


async def wait_until_ready(api: Api) -> None:
    async def ready() -> bool:
        status, body = await api.call("GET", "/health-check")
        return status == 200 and body.get("status") == "READY"

    await wait_until(ready, "READY")


async def test_large_outputs_stream_out_as_the_exact_json(tmp_path: Path) -> None:
    """Strings and files of 3 MiB come back chunked (streamed a slice at a time) and equal."""
    # The model's own generator gives the expected value (loaded by path: other tests' models
    # are also called "predict").
    spec = importlib.util.spec_from_file_location("large_model", MODELS / "large" / "predict.py")
    assert spec is not None and spec.loader is not None
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)
    text = model.text
    size_kb = 3072
    blob = bytes(range(256)) * ((size_kb << 10) // 256 + 1)
    file_uri = "data:text/plain;base64," + base64.b64encode(blob).decode()
    expected = {
        "string": text(size_kb, "s"),
        "file": file_uri,
        "nested": {
            "big": text(size_kb, "n"),
            "parts": [text(size_kb, "p"), "small", 1, 2.5, None, True, {"k": text(8, "k")}],
            "file": file_uri,
        },
    }
    async with serving(tmp_path, model="large") as api:
        for kind, output in expected.items():
            async with api.session.post(
                api.url("/predictions"), json={"input": {"kind": kind, "size_kb": size_kb}}
            ) as resp:
                raw = await resp.read()
                assert resp.status == 200, raw[:500]
                assert resp.headers.get("Transfer-Encoding") == "chunked", kind  # streamed
            body = json.loads(raw)
            assert body["status"] == "succeeded", body.get("error")
            assert body["output"] == output, kind


async def test_an_endless_stream_fails_at_the_output_cap_and_the_pool_serves_on(
    tmp_path: Path,
) -> None:
    cap = 256 * 1024
    async with serving(tmp_path, "endless", predictions__streamed_output_max_bytes=cap) as api:
        # Steps: a model that yields 16 KiB items without end; then a bounded one.
        status, body = await api.call("POST", "/predictions", json={"input": {"item_kb": 16}})
        # Result: the prediction failed naming the cap and the setting; what it holds of the
        # output stays under the cap; the runner let go of it and serves the next one.
        assert status == 200 and body["status"] == "failed", body["error"]
        assert body["error"].startswith(
            f"the output exceeded {cap} bytes (predictions.streamed_output_max_bytes)"
        )
        assert sum(len(item) for item in body["output"] or []) <= cap
        await wait_until(lambda: api.manager.health()["concurrency"]["current"] == 0, "slot")
        status, after = await api.call("POST", "/predictions", json={"input": {"n": 3}})
        assert status == 200 and after["status"] == "succeeded", after["error"]
        assert after["output"] == ["x" * 1024] * 3
        assert api.manager.health()["runners"][0]["restarts"] == 0


async def test_an_input_url_that_cannot_be_fetched_fails_the_prediction_as_cog_does(
    tmp_path: Path, receiver: Receiver
) -> None:
    # Cog 0.23.1, side by side (a Path input, sync POST): HTTP 200, {"status": "failed",
    # "error": "Input validation error: 404 Client Error: File not found for url: <url>"};
    # an unreachable or unresolvable host alike. Refused by the network policy is one more
    # such case here.
    missing = receiver.url("/files/missing.txt")
    refused = receiver.url("/files/doc.txt?sig=TOPSECRET").replace("127.0.0.1", "127.0.0.2")
    unresolvable = "http://no-such-host.invalid/doc.txt"
    async with serving(tmp_path, model="files") as api:
        answers = {}
        for url in (missing, refused, unresolvable):
            answers[url] = await api.call("POST", "/predictions", json={"input": {"doc": url}})
        # The async form: 202 at once; the recorded prediction failed the same way.
        status, _ = await api.call(
            "PUT",
            "/predictions/refused-async",
            json={"input": {"doc": refused}},
            headers={"Prefer": "respond-async"},
        )
        assert status == 202
        await wait_until(lambda: api.manager.get("refused-async").done, "the failure")
        answers["async"] = await api.call("GET", "/predictions/refused-async")
        status, fine = await api.call("POST", "/predictions", json={"input": {"doc": "data:,ok"}})
        assert status == 200 and fine["status"] == "succeeded", fine
    # Result: each is a failed prediction with Cog's prefix, naming the input, the URL
    # (without its query) and why; no runner was used.
    shown = refused.split("?")[0]
    why = {
        missing: f"from {missing}: HTTP 404 Not Found",
        refused: f"from {shown}: refused by the network policy: 127.0.0.2 is a loopback address",
        unresolvable: f"from {unresolvable}: ClientConnectorDNSError",
        "async": f"from {shown}: refused by the network policy: 127.0.0.2 is a loopback address",
    }
    for key, (code, body) in answers.items():
        assert code == 200 and body["status"] == "failed", body
        expected = f"Input validation error: failed to fetch input 'doc' {why[key]}"
        assert body["error"].startswith(expected), body["error"]
        assert "TOPSECRET" not in body["error"] and body["started_at"] is None
