"""pool/api.py through a real socket, against a small in-test manager.

The fake implements the manager methods the API uses, so every error translation (503, 409,
422, ...) can be produced on demand; tests/pool/test_api_e2e.py runs the same API over the
real PoolManager and real coglet runners.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import platform
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pool.api import SHUTDOWN_KEY, create_app
from pool.config import HttpConfig, PoolConfig
from pool.errors import InvalidInput, NotReady, PoolBusy, PoolFull, ShuttingDown
from pool.files import FileFetchError
from pool.metrics import Metrics, Sample
from pool.prediction import Prediction, PredictionRequest

DEADLINE_S = 20.0
MAX_BODY = 4096
SCHEMA: dict[str, Any] = {
    "openapi": "3.0.2",
    "info": {"title": "Cog", "version": "0.1.0"},
    "components": {
        "schemas": {
            "Input": {
                "type": "object",
                "required": ["text"],
                "properties": {"text": {"type": "string", "title": "Text", "x-order": 0}},
            },
            "Output": {"type": "string", "title": "Output"},
        }
    },
}


class FakeManager:
    """Runs predictions in memory: ``{"text": t}`` succeeds with "hello t" unless ``hold``."""

    def __init__(self) -> None:
        self.status = "READY"
        self.schema: dict[str, Any] | None = SCHEMA
        self.metrics = Metrics()
        self.predictions: dict[str, Prediction] = {}
        self.submits = 0
        self.canceled: list[str] = []
        self.fail_with: Exception | None = None
        self.started = False
        self.stopped = False
        self.changed = asyncio.Event()  # set on every submit and cancel
        self.fail_prediction_with: str | None = None
        self.shutting_down = False
        self.last_tick_at: float | None = time.monotonic()
        self.user_health_error: str | None = None
        self.streaming = False

    async def start(self) -> None:
        self.started = True

    async def shutdown(self, grace_s: float | None = None) -> None:
        self.stopped = True

    def health(self) -> dict[str, Any]:
        return {"status": self.status, "setup": {"status": "succeeded"}, "runners": []}

    async def submit(self, request: PredictionRequest, *, source: str = "http") -> Prediction:
        self.submits += 1
        if self.fail_with is not None:
            raise self.fail_with
        if request.id in self.predictions:
            return self.predictions[request.id]
        if self.fail_prediction_with is not None:  # e.g. an input download failed
            failed = Prediction(request, source=source)
            failed.fail(self.fail_prediction_with)
            self.predictions[failed.id] = failed
            return failed
        if not isinstance(request.input.get("text"), str):
            raise InvalidInput(
                [
                    {
                        "loc": ["body", "input", "text"],
                        "msg": "missing required input field: text",
                        "type": "value_error.missing",
                    }
                ]
            )
        prediction = Prediction(request, source=source)
        self.predictions[prediction.id] = prediction
        self.changed.set()
        prediction.mark_started(0)
        if not request.input.get("hold"):
            text = request.input["text"]
            prediction.apply_delta({"status": "succeeded", "output": f"hello {text}"})
        return prediction

    def get(self, prediction_id: str) -> Prediction | None:
        return self.predictions.get(prediction_id)

    async def cancel(self, prediction_id: str) -> bool:
        prediction = self.predictions.get(prediction_id)
        if prediction is None or prediction.done:
            return False
        self.canceled.append(prediction_id)
        prediction.finish("canceled")
        self.changed.set()
        return True


class Server:
    """The app served the way the CLI serves it: web.AppRunner + TCPSite on a free port."""

    def __init__(self, app: web.Application, *, handler_cancellation: bool) -> None:
        self.app = app
        self.runner = web.AppRunner(app, handler_cancellation=handler_cancellation)
        self.port = 0

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    def make_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def close(self) -> None:
        await self.runner.cleanup()


class Api:
    def __init__(self, server: Server, session: aiohttp.ClientSession, fake: FakeManager):
        self.server = server
        self.session = session
        self.fake = fake
        self.app = server.app

    def url(self, path: str) -> str:
        return self.server.make_url(path)

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any, Any]:
        async with self.session.request(method, self.url(path), **kw) as resp:
            text = await resp.text()
            body = json.loads(text) if resp.content_type == "application/json" else text
            return resp.status, body, resp.headers


async def _serve(
    *, handler_cancellation: bool = False, allow_shutdown: bool = False
) -> tuple[Server, FakeManager]:
    fake = FakeManager()
    config = PoolConfig(
        http=HttpConfig(max_body_bytes=MAX_BODY, retry_after_s=7, allow_shutdown=allow_shutdown)
    )
    server = Server(create_app(config, fake), handler_cancellation=handler_cancellation)
    await server.start()
    return server, fake


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    server, fake = await _serve()
    async with aiohttp.ClientSession() as session:
        yield Api(server, session, fake)
    await server.close()


async def wait_until(check: Callable[[], bool], event: asyncio.Event) -> None:
    async def loop() -> None:
        while not check():
            event.clear()
            await event.wait()

    await asyncio.wait_for(loop(), DEADLINE_S)


# --- discovery, health, schema, metrics ---------------------------------------------------------
async def test_index_lists_the_routes(api: Api) -> None:
    status, body, _ = await api.call("GET", "/")
    assert status == 200
    assert body["predictions_url"] == "/predictions"
    assert body["openapi_url"] == "/openapi.json"
    assert body["healthcheck_url"] == "/health-check"


async def test_manager_is_started_with_the_server_and_stopped_on_close() -> None:
    server, fake = await _serve()
    assert fake.started and not fake.stopped
    await server.close()
    assert fake.stopped
    assert server.app[SHUTDOWN_KEY].is_set()


async def test_health_check_is_the_managers_health(api: Api) -> None:
    api.fake.status = "BUSY"
    status, body, _ = await api.call("GET", "/health-check")
    assert status == 200
    assert body["status"] == "BUSY" and body["setup"] == {"status": "succeeded"}


async def test_openapi_is_503_until_the_schema_is_known(api: Api) -> None:
    api.fake.schema = None
    status, body, headers = await api.call("GET", "/openapi.json")
    assert status == 503 and "detail" in body and headers["Retry-After"] == "7"
    api.fake.schema = SCHEMA
    status, body, _ = await api.call("GET", "/openapi.json")
    assert status == 200
    assert body["components"]["schemas"]["Input"] == SCHEMA["components"]["schemas"]["Input"]
    # The runner's components, as they are, plus the pool's error body.
    schemas = body["components"]["schemas"]
    assert {k: schemas[k] for k in SCHEMA["components"]["schemas"]} == SCHEMA["components"][
        "schemas"
    ]
    assert schemas["PoolErrorDetail"]["required"] == ["detail"]
    post = body["paths"]["/predictions"]["post"]
    assert "422" in post["responses"]
    assert set(body["paths"]) >= {
        "/",
        "/health-check",
        "/predictions",
        "/predictions/{prediction_id}",
        "/predictions/{prediction_id}/cancel",
        "/shutdown",
    }
    assert "paths" not in SCHEMA  # the manager's schema is not modified


async def test_metrics_are_prometheus_text_with_collectors(api: Api) -> None:
    api.fake.metrics.prediction_finished(
        status="succeeded", source="http", queue_wait_s=0.1, predict_time_s=0.2
    )
    api.fake.metrics.add_collector(lambda: [Sample("cog_pool_queue_depth", 3)])
    status, text, headers = await api.call("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert 'cog_pool_predictions_total{source="http",status="succeeded"} 1' in text
    assert "cog_pool_queue_depth 3.0" in text.splitlines()


# --- predictions ---------------------------------------------------------------------------------
async def test_sync_prediction_answers_200_with_the_result(api: Api) -> None:
    status, body, _ = await api.call("POST", "/predictions", json={"input": {"text": "world"}})
    assert status == 200
    assert body["status"] == "succeeded" and body["output"] == "hello world"
    assert body["input"] == {"text": "world"} and body["completed_at"]


async def test_respond_async_is_matched_exactly(api: Api) -> None:
    status, body, _ = await api.call(
        "POST",
        "/predictions",
        json={"input": {"text": "a", "hold": True}},
        headers={"Prefer": "respond-async"},
    )
    assert status == 202 and body["status"] == "starting"  # Cog's word for an accepted create
    status, body, _ = await api.call(
        "POST", "/predictions", json={"input": {"text": "b"}}, headers={"Prefer": "respond-sync"}
    )
    assert status == 200 and body["status"] == "succeeded"


async def test_put_is_idempotent(api: Api) -> None:
    status, first, _ = await api.call("PUT", "/predictions/abc", json={"input": {"text": "x"}})
    assert status == 200 and first["id"] == "abc" and first["status"] == "succeeded"
    status, again, _ = await api.call("PUT", "/predictions/abc", json={"input": {"text": "y"}})
    assert status == 200 and again == first
    assert list(api.fake.predictions) == ["abc"]  # one prediction: it ran once
    status, again, _ = await api.call(
        "PUT", "/predictions/abc", json={"input": {}}, headers={"Prefer": "respond-async"}
    )
    assert status == 202 and again["output"] == "hello x"


async def test_put_sync_for_a_running_id_waits_for_it(api: Api) -> None:
    await api.call(
        "PUT",
        "/predictions/run1",
        json={"input": {"text": "x", "hold": True}},
        headers={"Prefer": "respond-async"},
    )
    waiting = asyncio.ensure_future(api.call("PUT", "/predictions/run1", json={"input": {}}))
    await asyncio.sleep(0)  # let the second PUT reach its wait (no timing is asserted)
    assert not waiting.done()
    api.fake.predictions["run1"].apply_delta({"status": "succeeded", "output": "late"})
    status, body, _ = await asyncio.wait_for(waiting, DEADLINE_S)
    assert status == 200 and body["output"] == "late"


async def test_get_prediction_and_404(api: Api) -> None:
    await api.call("PUT", "/predictions/known", json={"input": {"text": "x"}})
    status, body, _ = await api.call("GET", "/predictions/known")
    assert status == 200 and body["output"] == "hello x"
    status, body, _ = await api.call("GET", "/predictions/unknown")
    assert status == 404 and body == {"detail": "prediction not found"}


async def test_cancel_known_is_200_unknown_is_404(api: Api) -> None:
    await api.call(
        "PUT",
        "/predictions/c1",
        json={"input": {"text": "x", "hold": True}},
        headers={"Prefer": "respond-async"},
    )
    status, body, _ = await api.call("POST", "/predictions/c1/cancel")
    assert status == 200 and body["status"] == "canceled"
    # As Cog: while the prediction is known, a repeat cancel is 200 too (not 404).
    status, body, _ = await api.call("POST", "/predictions/c1/cancel")
    assert status == 200 and body["status"] == "canceled" and body["id"] == "c1"
    # A finished prediction that is still known: 200 with its state.
    await api.call("PUT", "/predictions/done1", json={"input": {"text": "x"}})
    status, body, _ = await api.call("POST", "/predictions/done1/cancel")
    assert status == 200 and body["status"] == "succeeded"
    status, body, _ = await api.call("POST", "/predictions/nope/cancel")
    assert status == 404 and "detail" in body


async def test_failed_prediction_still_answers_200(api: Api) -> None:
    api.fake.fail_prediction_with = str(
        FileFetchError("image", "http://x/y.png", "HTTP 404 Not Found", status=404)
    )
    status, body, _ = await api.call("POST", "/predictions", json={"input": {"text": "x"}})
    assert status == 200 and body["status"] == "failed"
    assert "http://x/y.png" in body["error"] and "404" in body["error"]


# --- errors --------------------------------------------------------------------------------------
async def test_invalid_input_is_422_with_detail(api: Api) -> None:
    status, body, _ = await api.call("POST", "/predictions", json={"input": {}})
    assert status == 422
    assert body["detail"][0]["loc"] == ["body", "input", "text"]
    assert body["detail"][0]["msg"] == "missing required input field: text"


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"input": "text"}, ["body", "input"]),
        ({"input": {}, "id": "../etc"}, ["body", "id"]),
        ({"input": {}, "webhook": "ftp://x"}, ["body", "webhook"]),
        ({"input": {}, "webhook_events_filter": ["everything"]}, ["body", "webhook_events_filter"]),
        ([1, 2], ["body"]),
    ],
)
async def test_bad_request_fields_are_422(api: Api, body: Any, loc: list[str]) -> None:
    status, answer, _ = await api.call("POST", "/predictions", json=body)
    assert status == 422
    assert answer["detail"][0]["loc"] == loc
    assert api.fake.submits == 0


async def test_put_id_mismatch_and_bad_path_id_are_422(api: Api) -> None:
    status, body, _ = await api.call("PUT", "/predictions/abc", json={"id": "xyz", "input": {}})
    assert status == 422 and body["detail"][0]["type"] == "value_error.id_mismatch"
    status, body, _ = await api.call("PUT", "/predictions/-bad", json={"input": {}})
    assert status == 422 and body["detail"][0]["loc"] == ["path", "prediction_id"]


async def test_malformed_json_is_400(api: Api) -> None:
    status, body, _ = await api.call(
        "POST", "/predictions", data=b'{"input": ', headers={"Content-Type": "application/json"}
    )
    assert status == 400 and "malformed JSON" in body["detail"]


async def test_body_over_the_limit_is_413_json(api: Api) -> None:
    big = json.dumps({"input": {"text": "x" * (MAX_BODY * 2)}})
    status, body, _ = await api.call("POST", "/predictions", data=big)
    assert status == 413 and "detail" in body
    assert api.fake.submits == 0


async def test_unknown_route_and_method_answer_json(api: Api) -> None:
    status, body, _ = await api.call("GET", "/nope")
    assert status == 404 and "detail" in body
    status, body, headers = await api.call("DELETE", "/predictions")
    assert status == 405 and "detail" in body and "POST" in headers["Allow"]


@pytest.mark.parametrize(
    ("error", "code", "retry_after"),
    [
        (NotReady("the model is not ready"), 503, True),
        (PoolFull("queue full"), 503, True),
        (ShuttingDown("shutting down"), 503, True),
        (PoolBusy("busy"), 409, False),
    ],
)
async def test_manager_refusals_are_translated(
    api: Api, error: Exception, code: int, retry_after: bool
) -> None:
    api.fake.fail_with = error
    status, body, headers = await api.call("POST", "/predictions", json={"input": {"text": "x"}})
    assert status == code and str(error) in body["detail"]
    assert (headers.get("Retry-After") == "7") is retry_after


async def test_not_ready_answers_cogs_setup_body(api: Api) -> None:
    api.fake.fail_with = NotReady("no runner can serve (status SETUP_FAILED); see /health-check")
    status, body, _ = await api.call("POST", "/predictions", json={"input": {"text": "x"}})
    assert status == 503
    assert body["status"] == "failed"
    assert body["error"] == (
        "Setup has not finished yet. Wait until it has finished, or GET /health-check for status."
    )


async def test_health_check_carries_a_version_object(api: Api) -> None:
    status, body, _ = await api.call("GET", "/health-check")
    assert status == 200
    version = body["version"]
    assert version["runtime"] == "cog-pool"
    assert version["python_sdk"] == version["cog_pool"] == importlib.metadata.version("cog-pool")
    assert version["python"] == platform.python_version()


async def test_an_unexpected_error_is_500_json_and_the_server_keeps_serving(api: Api) -> None:
    api.fake.fail_with = RuntimeError("bug")
    status, body, _ = await api.call("POST", "/predictions", json={"input": {"text": "x"}})
    assert status == 500 and body == {"detail": "internal server error"}
    api.fake.fail_with = None
    status, body, _ = await api.call("POST", "/predictions", json={"input": {"text": "x"}})
    assert status == 200 and body["status"] == "succeeded"


# --- shutdown and disconnects --------------------------------------------------------------------
async def test_shutdown_is_refused_by_default_naming_the_setting(api: Api) -> None:
    status, body, _ = await api.call("POST", "/shutdown")
    assert status == 403 and "http.allow_shutdown" in body["detail"]
    assert not api.app[SHUTDOWN_KEY].is_set()
    status, body, _ = await api.call("POST", "/predictions", json={"input": {"text": "x"}})
    assert status == 200 and body["status"] == "succeeded"


async def test_shutdown_sets_the_event_and_stops_intake() -> None:
    server, fake = await _serve(allow_shutdown=True)
    async with aiohttp.ClientSession() as session:
        api = Api(server, session, fake)
        try:
            await _shutdown_stops_intake(api)
        finally:
            await server.close()


async def _shutdown_stops_intake(api: Api) -> None:
    status, body, _ = await api.call("POST", "/shutdown")
    assert status == 200
    assert api.app[SHUTDOWN_KEY].is_set()
    status, body, headers = await api.call("POST", "/predictions", json={"input": {"text": "x"}})
    assert status == 503 and headers["Retry-After"] == "7"
    status, body, _ = await api.call("GET", "/health-check")
    assert status == 200 and body["shutting_down"] is True
    assert api.fake.submits == 0


async def _disconnect_cancels(server: Server, fake: FakeManager) -> None:
    # Steps: a sync client starts a prediction that holds, then goes away.
    async with aiohttp.ClientSession() as session:
        request: Awaitable[Any] = session.post(
            server.make_url("/predictions"),
            json={"id": "gone", "input": {"text": "x", "hold": True}},
        )
        task = asyncio.ensure_future(request)
        await wait_until(lambda: "gone" in fake.predictions, fake.changed)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # Result: the API cancels the prediction it created.
    await wait_until(lambda: "gone" in fake.canceled, fake.changed)
    assert fake.predictions["gone"].status == "canceled"


async def test_sync_client_disconnect_cancels_its_prediction() -> None:
    # aiohttp's default (the CLI's AppRunner): handlers are not cancelled on disconnect.
    server, fake = await _serve()
    try:
        await _disconnect_cancels(server, fake)
    finally:
        await server.close()


async def test_sync_client_disconnect_cancels_with_handler_cancellation() -> None:
    server, fake = await _serve(handler_cancellation=True)
    try:
        await _disconnect_cancels(server, fake)
    finally:
        await server.close()


async def test_large_bodies_are_parsed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # Parsing a 93 MB body on the loop held every other request for over a second.
    import threading

    import pool.api

    threads: list[int] = []
    parse = pool.api._parse_json

    def recording(raw: bytes) -> Any:
        threads.append(threading.get_ident())
        return parse(raw)

    monkeypatch.setattr(pool.api, "_parse_json", recording)
    fake = FakeManager()
    config = PoolConfig(http=HttpConfig(max_body_bytes=4 * pool.api.PARSE_INLINE_MAX_BYTES))
    server = Server(create_app(config, fake), handler_cancellation=False)
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(server, session, fake)
            text = "x" * (2 * pool.api.PARSE_INLINE_MAX_BYTES)
            for body in ({"input": {"text": text}}, {"input": {"text": "small"}}):
                status, answer, _ = await api.call("POST", "/predictions", json=body)
                assert status == 200 and answer["output"] == "hello " + body["input"]["text"]
    finally:
        await server.close()
    loop_thread = threading.get_ident()
    assert threads[0] != loop_thread and threads[1] == loop_thread


async def test_large_finished_predictions_are_streamed_a_slice_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pool.api
    import pool.jsonstream

    dumped: list[Any] = []  # what each json.dumps call was given
    dumps = json.dumps

    def recording(value: Any, *args: Any, **kwargs: Any) -> str:
        dumped.append(value)
        return dumps(value, *args, **kwargs)

    monkeypatch.setattr(pool.api.json, "dumps", recording)
    server, fake = await _serve()
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(server, session, fake)
            fake_text = 'y"\u00e9\n' * pool.api.STREAM_RESPONSE_MIN_CHARS  # 4 slices' worth
            # A finished prediction with a large output, then a small one.
            prediction = Prediction(PredictionRequest.from_body({"id": "big", "input": {}}))
            prediction.mark_started(0)
            prediction.apply_delta({"status": "succeeded", "output": [fake_text, 1]})
            fake.predictions["big"] = prediction
            async with session.get(api.url("/predictions/big")) as resp:
                assert resp.status == 200
                assert resp.headers.get("Transfer-Encoding") == "chunked"
                body = json.loads(await resp.read())
            assert body == json.loads(dumps(prediction.to_dict()))
            # An HTTP/1.0 client (no chunked encoding) gets the body up to the connection close.
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /predictions/big HTTP/1.0\r\nHost: x\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            head, _, payload = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
            assert json.loads(payload) == json.loads(dumps(prediction.to_dict()))
            status, body, _ = await api.call("POST", "/predictions", json={"input": {"text": "s"}})
            assert status == 200 and body["output"] == "hello s"
    finally:
        await server.close()
    # Neither the whole prediction nor its whole output went through one json.dumps call.
    assert not any(isinstance(v, dict) and v.get("id") == "big" for v in dumped)
    assert not any(isinstance(v, str) and len(v) > pool.jsonstream.SLICE_CHARS for v in dumped)


async def test_a_streamed_response_yields_to_the_loop_between_slices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fast reader never makes ``write`` wait for the drain; the loop still gets each turn."""
    import pool.api

    ticks = 0
    seen: list[int] = []  # the ticker's count at each piece the stream produced

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    real_pieces = pool.api.json_pieces

    def recording(value: Any) -> Any:
        for piece in real_pieces(value):
            seen.append(ticks)
            yield piece

    monkeypatch.setattr(pool.api, "json_pieces", recording)
    server, fake = await _serve()
    tick_task = asyncio.create_task(ticker())
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(server, session, fake)
            slices = 6
            prediction = Prediction(PredictionRequest.from_body({"id": "big", "input": {}}))
            prediction.mark_started(0)
            output = "z" * (slices * pool.api.STREAM_RESPONSE_MIN_CHARS)
            prediction.apply_delta({"status": "succeeded", "output": output})
            fake.predictions["big"] = prediction
            status, body, _ = await api.call("GET", "/predictions/big")
            assert status == 200 and body["output"] == output
    finally:
        tick_task.cancel()
        await server.close()
    # The ticker ran between the slices: at least once per ~1 MiB written.
    assert len(set(seen)) >= slices
