"""The Cog-compatible HTTP API (DESIGN §4), built by one typed factory.

``create_app(config, manager)`` returns the aiohttp application; the CLI and the tests serve the
same object. Domain errors from the manager are translated here, and only here, into status
codes; every error answer, aiohttp's own included (404, 405, 413), has a JSON body.

Lifecycle: by default the app's ``cleanup_ctx`` starts the manager when the server starts and
shuts it down (DESIGN §7 drain) when the server is cleaned up. ``POST /shutdown`` stops intake at
once (503) and sets the ``asyncio.Event`` stored under :data:`SHUTDOWN_KEY`; whoever serves the
app (the CLI) awaits it and then cleans the runner up, which drains the manager.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import importlib.metadata
import json
import logging
import platform
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, Protocol

from aiohttp import web

from coglet import protocol
from coglet.protocol import STATUS_STARTING, TERMINAL_STATUSES
from pool import sse
from pool.config import PoolConfig
from pool.errors import InvalidRequest, NoTrainer, NotReady, PoolBusy, PoolFull, ShuttingDown
from pool.jsonbody import loads_large
from pool.jsonstream import dumps, is_large, json_chunks, json_pieces
from pool.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pool.metrics import Metrics
from pool.prediction import (
    EVENT_COMPLETED,
    MAX_JSON_DEPTH,
    Prediction,
    PredictionRequest,
    nests_deeper_than,
)
from pool.server import read_body

__all__ = [
    "CONFIG_KEY",
    "MANAGER_KEY",
    "METRICS_KEY",
    "SHUTDOWN_KEY",
    "ManagerAPI",
    "create_app",
]

log = logging.getLogger(__name__)

# Deeper JSON than this is refused with 400: no Cog input type nests anywhere near it, and the
# stdlib's recursive encoders/decoders would otherwise hit the interpreter's recursion limit.

# aiohttp >= 3.9 does not cancel a handler when its client goes away unless the server was
# built with handler_cancellation=True, so a waiting sync request also checks its connection.
_DISCONNECT_CHECK_S = 1.0

_PREFER_ASYNC = "respond-async"
# Request bodies larger than this are parsed off the event loop (see _read_json).
PARSE_INLINE_MAX_BYTES = 256 * 1024

# Orchestrator probes: answered without the token (a kubelet or load balancer has none).
LIVE_PATH = "/health/live"
READY_PATH = "/health/ready"
OPEN_PATHS = frozenset({LIVE_PATH, READY_PATH, "/health-check"})
METRICS_PATH = "/metrics"
# Pool statuses in which a runner can take work (BUSY: a request waits in the pool's queue).
_READY_STATUSES = frozenset({"READY", "BUSY"})


class ManagerAPI(Protocol):
    """What the HTTP API uses of :class:`pool.manager.PoolManager`."""

    @property
    def status(self) -> str: ...
    @property
    def schema(self) -> dict[str, Any] | None: ...
    @property
    def user_health_error(self) -> str | None: ...
    @property
    def streaming(self) -> bool: ...
    @property
    def shutting_down(self) -> bool: ...
    @property
    def last_tick_at(self) -> float | None: ...

    async def start(self) -> None: ...
    async def shutdown(self, grace_s: float | None = None) -> None: ...
    def health(self) -> dict[str, Any]: ...
    async def submit(self, request: PredictionRequest, *, source: str = "http") -> Prediction: ...
    def get(self, prediction_id: str) -> Prediction | None: ...
    async def cancel(self, prediction_id: str) -> bool: ...


MANAGER_KEY = web.AppKey("manager", ManagerAPI)
CONFIG_KEY = web.AppKey("config", PoolConfig)
METRICS_KEY = web.AppKey("metrics", Metrics)
SHUTDOWN_KEY = web.AppKey("shutdown", asyncio.Event)


def create_app(
    config: PoolConfig,
    manager: ManagerAPI,
    *,
    metrics: Metrics | None = None,
    manage_lifecycle: bool = True,
) -> web.Application:
    """The HTTP application serving ``manager``.

    ``metrics`` defaults to ``manager.metrics`` when the manager has one. With
    ``manage_lifecycle`` the app starts the manager on server start-up and shuts it down on
    clean-up; pass False when the caller drives ``start``/``shutdown`` itself.
    """
    middlewares: list[Any] = [_json_errors]
    if config.http.auth_token is not None:
        middlewares.append(_bearer_auth(config.http.auth_token, config.http.metrics_public))
    app = web.Application(client_max_size=config.http.max_body_bytes, middlewares=middlewares)
    app[CONFIG_KEY] = config
    app[MANAGER_KEY] = manager
    found = metrics if metrics is not None else getattr(manager, "metrics", None)
    app[METRICS_KEY] = found if isinstance(found, Metrics) else Metrics()
    app[SHUTDOWN_KEY] = asyncio.Event()
    app.add_routes(
        [
            web.get("/", index),
            web.get("/health-check", health_check),
            web.get(LIVE_PATH, health_live),
            web.get(READY_PATH, health_ready),
            web.get("/openapi.json", openapi),
            web.post("/predictions", create_prediction),
            web.put("/predictions/{prediction_id}", put_prediction),
            web.get("/predictions/{prediction_id}", get_prediction),
            web.post("/predictions/{prediction_id}/cancel", cancel_prediction),
            web.post("/trainings", create_training),
            web.put("/trainings/{training_id}", put_training),
            web.get("/trainings/{training_id}", get_training),
            web.post("/trainings/{training_id}/cancel", cancel_training),
            web.post("/shutdown", shutdown),
            web.get(METRICS_PATH, metrics_page),
        ]
    )
    if manage_lifecycle:
        app.cleanup_ctx.append(_manager_lifecycle)
    return app


async def _manager_lifecycle(app: web.Application) -> AsyncIterator[None]:
    manager = app[MANAGER_KEY]
    await manager.start()
    log.info("http_manager_started")
    yield
    app[SHUTDOWN_KEY].set()
    await manager.shutdown(app[CONFIG_KEY].shutdown.grace_s)
    log.info("http_manager_stopped")


# --- errors ----------------------------------------------------------------------------------
def _error(status: int, detail: Any, *, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"detail": detail}, status=status, headers=headers)


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    """Give every error answer a JSON body, aiohttp's own (404, 405, 413) included."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as e:
        if e.status < 400 or e.content_type == "application/json":
            raise
        keep = {k: v for k, v in e.headers.items() if k in ("Allow", "Retry-After")}
        return _error(e.status, e.text or e.reason, headers=keep)
    except Exception:
        # Hostile input must never take the server down; the details go to the log only.
        log.exception("http_internal_error method=%s path=%s", request.method, request.path)
        return _error(500, "internal server error")


def _bearer_auth(token: str, metrics_public: bool) -> Any:
    """Middleware: every route but the probes (and /metrics if public) needs the token."""
    expected = token.encode()
    open_paths = OPEN_PATHS | {METRICS_PATH} if metrics_public else OPEN_PATHS

    @web.middleware
    async def bearer_auth(
        request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        if request.path in open_paths:
            response: web.StreamResponse = await handler(request)
            return response
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # compare_digest takes as long for a wrong token as for a right one of the same length.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            # DEBUG: an unauthenticated client could otherwise fill the log at will.
            log.debug("http_unauthorized method=%s path=%s", request.method, request.path)
            return _error(
                401,
                "missing or wrong token: send Authorization: Bearer <http.auth_token>",
                headers={"WWW-Authenticate": 'Bearer realm="cog-pool"'},
            )
        response = await handler(request)
        return response

    return bearer_auth


def _retry_after(request: web.Request) -> dict[str, str]:
    return {"Retry-After": str(request.app[CONFIG_KEY].http.retry_after_s)}


def _translate(request: web.Request, exc: Exception) -> web.Response:
    """Turn a manager error into its HTTP answer (DESIGN §4 Errors)."""
    if isinstance(exc, NoTrainer):  # before InvalidRequest: a training without train: is 404
        return _error(404, exc.why)
    if isinstance(exc, InvalidRequest):  # InvalidInput included
        return _error(422, exc.detail)
    if isinstance(exc, PoolBusy):
        return _error(409, f"{exc} (all runners are busy; retry later)")
    if isinstance(exc, (PoolFull, ShuttingDown)):
        return _error(503, str(exc) or type(exc).__name__, headers=_retry_after(request))
    if isinstance(exc, NotReady):
        return _setup_not_finished(request, exc)
    raise exc


# Cog 0.23.1's answer to a prediction that setup (not finished, or failed) does not allow.
COG_SETUP_NOT_FINISHED = (
    "Setup has not finished yet. Wait until it has finished, or GET /health-check for status."
)


def _setup_not_finished(request: web.Request, exc: NotReady) -> web.Response:
    """503 with Cog's body (``status``, ``error``); ``detail`` says which state, Retry-After."""
    body = {
        "status": "failed",
        "error": COG_SETUP_NOT_FINISHED,
        "detail": str(exc) or "the model is not ready",
    }
    return web.json_response(body, status=503, headers=_retry_after(request))


# --- bodies ----------------------------------------------------------------------------------
def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


async def _read_json(request: web.Request) -> Any:
    """The request's JSON body ({} when empty); 400 for anything that is not safe JSON.

    The body must arrive within ``http.body_timeout_s`` (else 408). Bodies over
    ``PARSE_INLINE_MAX_BYTES`` are parsed in a worker thread: a 93 MB body held the event
    loop (and /health-check, and every other request) for over a second.
    """
    raw = await read_body(request, request.app[CONFIG_KEY].http.body_timeout_s)  # 413 past max
    if len(raw) > PARSE_INLINE_MAX_BYTES:
        return await asyncio.to_thread(_parse_json, raw)
    return _parse_json(raw)


def _strict_loads(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


def _parse_json(raw: bytes | bytearray) -> Any:
    """The body's JSON value; its long string inputs (a ``data:`` URI) are kept as slices of
    ``raw`` (:func:`pool.jsonbody.loads_large`), everything else is parsed as it always was."""
    if not raw or (raw[:1].isspace() and not raw.strip()):
        return {}
    try:
        split, body = loads_large(raw, _strict_loads)
        if not split:
            body = _strict_loads(raw.decode("utf-8"))
    except RecursionError:
        raise _bad_json(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _bad_json(f"malformed JSON body: {e}") from None
    if nests_deeper_than(body, MAX_JSON_DEPTH):
        raise _bad_json(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return body


def _bad_json(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"detail": message}), content_type="application/json")


async def _prediction_response(
    request: web.Request,
    prediction: Prediction,
    *,
    status: int = 200,
    body: dict[str, Any] | None = None,
) -> web.StreamResponse:
    """The prediction (or ``body``, its view) as JSON; a large one is streamed out a piece at
    a time.

    ``json.dumps`` of a 100 MB output (a long text) was one C call holding the GIL for
    hundreds of milliseconds (the loop and ``/health-check`` stalled even from a worker
    thread), and the text plus its bytes were two more whole copies of the output.
    :func:`pool.jsonstream.json_pieces` writes the same JSON text a slice at a time, a file
    output kept on disk (``pool.files.FileOutput``) as base64 of the file read a slice at a
    time, and each ``write`` waits for the drain, so at most about one slice is held beyond
    the output. A live record may change between slices: each list or dict is listed in one
    step, so the text is always one valid state of it.
    """
    if body is None:
        body = prediction.to_dict()
    if not is_large(body, STREAM_RESPONSE_MIN_CHARS):
        return web.json_response(body, status=status, dumps=dumps)
    prediction.hold_output()  # its kept files stay until the last slice is written
    try:
        response = web.StreamResponse(status=status)
        response.content_type = "application/json"
        # No length: aiohttp sends it chunked (HTTP/1.1), or to the connection close (HTTP/1.0).
        await response.prepare(request)
        async for chunk in json_chunks(body, chunk_chars=_WRITE_CHUNK_CHARS, pieces=json_pieces):
            await response.write(chunk)  # waits for the drain, if any
        await response.write_eof()
        return response
    finally:
        prediction.release_output()


STREAM_RESPONSE_MIN_CHARS = 1 << 20
"""A finished prediction whose strings add up to more than this is streamed out."""
_WRITE_CHUNK_CHARS = 1 << 20


# --- routes ----------------------------------------------------------------------------------
async def index(request: web.Request) -> web.Response:
    """Discovery links, as Cog's root."""
    return web.json_response(
        {
            "openapi_url": "/openapi.json",
            "shutdown_url": "/shutdown",
            "healthcheck_url": "/health-check",
            "predictions_url": "/predictions",
            "predictions_idempotent_url": "/predictions/{prediction_id}",
            "predictions_cancel_url": "/predictions/{prediction_id}/cancel",
            "metrics_url": "/metrics",
        }
    )


async def health_check(request: web.Request) -> web.Response:
    """Always 200: the pool's status, setup, runners, concurrency and queue consumers.

    The manager's ``health()`` already carries each queue consumer's health source.
    """
    body = dict(request.app[MANAGER_KEY].health())
    body.setdefault("version", VERSION)
    if request.app[SHUTDOWN_KEY].is_set():
        body["shutting_down"] = True
    return web.json_response(body)


def _version() -> dict[str, str]:
    """``/health-check`` ``version``, Cog's object: the runtime, the Python SDK, Python.

    ``cog`` and ``coglet`` ship in this project, so the SDK's version is the project's.
    ``python`` is the pool's interpreter (a model's own, ``model.python``, may differ).
    """
    try:
        project = importlib.metadata.version("cog-pool")
    except importlib.metadata.PackageNotFoundError:
        project = "unknown"
    return {
        "runtime": "cog-pool",
        "cog_pool": project,
        "python_sdk": project,
        "python": platform.python_version(),
    }


VERSION = _version()


async def health_live(request: web.Request) -> web.Response:
    """200 while the supervisor loop turns (its last pass is recent); 503 otherwise."""
    last = request.app[MANAGER_KEY].last_tick_at
    limit_s = request.app[CONFIG_KEY].http.live_tick_age_s
    age_s = None if last is None else round(time.monotonic() - last, 3)
    alive = age_s is not None and age_s <= limit_s
    body = {"status": "alive" if alive else "stalled", "last_tick_age_s": age_s}
    return web.json_response(body, status=200 if alive else 503)


async def health_ready(request: web.Request) -> web.Response:
    """200 while a runner can take work and the pool is not draining; 503 otherwise."""
    manager = request.app[MANAGER_KEY]
    status = manager.status
    accepted = {"READY"} if request.app[CONFIG_KEY].http.reject_when_busy else _READY_STATUSES
    if request.app[SHUTDOWN_KEY].is_set() or manager.shutting_down:
        reason: str | None = "draining"
    elif manager.user_health_error is not None:
        reason = "pool status UNHEALTHY: no runner passes its healthcheck()"
    elif status not in accepted:
        reason = f"pool status {status}"
    else:
        reason = None
    body = {"ready": reason is None, "status": status, "reason": reason}
    return web.json_response(body, status=200 if reason is None else 503)


async def openapi(request: web.Request) -> web.Response:
    """The model's schema plus the API paths; 503 until a runner has reported it."""
    schema = request.app[MANAGER_KEY].schema
    if schema is None:
        return _error(
            503,
            "the model's schema is not known yet (no runner has started)",
            headers=_retry_after(request),
        )
    doc = openapi_document(schema)
    if request.app[MANAGER_KEY].streaming:
        # Where Cog 0.23.1 reads it to allow SSE; clients read it the same way.
        doc["paths"]["/predictions"]["post"]["x-cog-streaming"] = True
    return web.json_response(doc)


async def metrics_page(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].render().encode()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def shutdown(request: web.Request) -> web.Response:
    """Stop taking predictions now; the server's owner drains and exits.

    Off unless ``http.allow_shutdown``: anyone who can reach the port (or make the pool send
    a request to itself) could otherwise stop it. SIGTERM always works.
    """
    if not request.app[CONFIG_KEY].http.allow_shutdown:
        log.info("http_shutdown_refused reason=disabled")
        return _error(
            403,
            "POST /shutdown is disabled; set http.allow_shutdown: true "
            "(COG_POOL_HTTP_ALLOW_SHUTDOWN=true) to enable it, or send the process SIGTERM",
        )
    event = request.app[SHUTDOWN_KEY]
    if not event.is_set():
        log.info("http_shutdown_requested")
        event.set()
    return web.json_response({})


async def get_prediction(request: web.Request) -> web.StreamResponse:
    prediction = request.app[MANAGER_KEY].get(request.match_info["prediction_id"])
    if prediction is None:
        return _error(404, "prediction not found")
    return await _prediction_response(request, prediction)


async def cancel_prediction(request: web.Request) -> web.StreamResponse:
    """200 with the prediction's state for as long as it is known (as Cog: a repeat, or a
    cancel after the end, is still 200); 404 for an id never seen or long forgotten."""
    manager = request.app[MANAGER_KEY]
    prediction_id = request.match_info["prediction_id"]
    if not await manager.cancel(prediction_id):
        known = manager.get(prediction_id)
        if known is not None:
            return await _prediction_response(request, known)
        return _error(404, "prediction not found")
    log.info("http_cancel prediction=%s", prediction_id)
    prediction = manager.get(prediction_id)
    if prediction is None:
        return web.json_response({})
    return await _prediction_response(request, prediction)


async def create_prediction(request: web.Request) -> web.StreamResponse:
    """POST /predictions: run one prediction, sync or (Prefer: respond-async) async."""
    return await _create(request, path_id=None)


async def put_prediction(request: web.Request) -> web.StreamResponse:
    """PUT /predictions/{id}: idempotent create; a known id answers with its current state."""
    return await _create(request, path_id=request.match_info["prediction_id"])


async def create_training(request: web.Request) -> web.StreamResponse:
    """POST /trainings (cog.yaml train:): as POST /predictions, validated against
    ``TrainingInput``, run by the runner's trainer; 404 for a model without one."""
    return await _create(request, path_id=None, kind=protocol.KIND_TRAINING)


async def put_training(request: web.Request) -> web.StreamResponse:
    """PUT /trainings/{id}: idempotent create of a training."""
    path_id = request.match_info["training_id"]
    return await _create(request, path_id=path_id, kind=protocol.KIND_TRAINING)


def _training(request: web.Request) -> Prediction | None:
    """The training named in the URL; None when unknown or not a training."""
    record = request.app[MANAGER_KEY].get(request.match_info["training_id"])
    return record if record is not None and record.request.is_training else None


async def get_training(request: web.Request) -> web.StreamResponse:
    training = _training(request)
    if training is None:
        return _error(404, "training not found")
    return await _prediction_response(request, training)


async def cancel_training(request: web.Request) -> web.StreamResponse:
    """As a prediction's cancel: 200 while the training is known, 404 otherwise."""
    training = _training(request)
    if training is None:
        return _error(404, "training not found")
    if await request.app[MANAGER_KEY].cancel(training.id):
        log.info("http_cancel training=%s", training.id)
    known = request.app[MANAGER_KEY].get(training.id)
    return await _prediction_response(request, known or training)


# Cog 0.23.1's answer to an SSE request on a training route.
TRAINING_NO_STREAMING = "Training endpoints do not support streaming responses."


async def _create(
    request: web.Request, *, path_id: str | None, kind: str = protocol.KIND_PREDICTION
) -> web.StreamResponse:
    if request.app[SHUTDOWN_KEY].is_set():
        return _error(503, "the pool is shutting down", headers=_retry_after(request))
    manager = request.app[MANAGER_KEY]
    want_sse = sse.wants_sse(request)
    if want_sse and kind == protocol.KIND_TRAINING:
        return web.json_response({"error": TRAINING_NO_STREAMING}, status=406)
    if want_sse and manager.schema is not None and not manager.streaming:
        # Cog's answer; an undecorated iterator still answers JSON without the header.
        return web.json_response({"error": sse.NOT_STREAMING}, status=406)
    body = await _read_json(request)
    try:
        pred_request = PredictionRequest.from_body(body, path_id=path_id, kind=kind)
    except InvalidRequest as e:
        return _error(422, e.detail)
    respond_async = request.headers.get("Prefer") == _PREFER_ASYNC and not want_sse
    # The manager decides idempotency (a known id returns its prediction, except a run lost
    # to a runner death, which runs again); this request owns the prediction if it made it.
    existing = manager.get(pred_request.id) if pred_request.id else None
    try:
        prediction = await manager.submit(pred_request, source="http")
    except Exception as e:
        return _translate(request, e)
    existing = existing if prediction is existing else None
    # From now until its answer is written, this request may read the record's output files.
    prediction.hold_output()
    try:
        return await _answer(request, manager, prediction, existing, want_sse, respond_async)
    finally:
        prediction.release_output()


async def _answer(
    request: web.Request,
    manager: ManagerAPI,
    prediction: Prediction,
    existing: Prediction | None,
    want_sse: bool,
    respond_async: bool,
) -> web.StreamResponse:
    log.debug(  # prediction_finished is the INFO line; this one is per request, on the hot path
        "http_prediction prediction=%s mode=%s known=%s",
        prediction.id,
        "async" if respond_async else "sync",
        existing is not None,
    )
    if want_sse:
        capacity = request.app[CONFIG_KEY].http.stream_history_capacity
        return await sse.stream_prediction(
            request,
            prediction,
            replay_capacity=None if existing is None else capacity,
            cancel=manager.cancel if existing is None else None,
        )
    if respond_async:
        body = prediction.to_dict()
        if existing is None and body.get("status") not in TERMINAL_STATUSES:
            # Cog's async create answers "starting": the answer is the acceptance; progress
            # (processing, then the end) follows by webhook and GET.
            body["status"] = STATUS_STARTING
        return await _prediction_response(request, prediction, status=202, body=body)
    await _wait(request, manager, prediction, owned=existing is None)
    return await _prediction_response(request, prediction)


def _disconnected(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _wait(
    request: web.Request, manager: ManagerAPI, prediction: Prediction, *, owned: bool
) -> None:
    """Wait for the end; a client that goes away cancels the prediction it created.

    One future, a completion listener and a periodic connection check: no task per request
    (this is the hot path of every sync prediction).
    """
    if prediction.done:
        return
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[str] = loop.create_future()

    def on_event(_: Prediction, event: str) -> None:
        if event == EVENT_COMPLETED and not outcome.done():
            outcome.set_result("done")

    timers: list[asyncio.TimerHandle] = []

    def check_connection() -> None:
        if outcome.done():
            return
        if _disconnected(request):
            outcome.set_result("disconnected")
        else:
            timers[0] = loop.call_later(_DISCONNECT_CHECK_S, check_connection)

    prediction.add_listener(on_event)
    timers.append(loop.call_later(_DISCONNECT_CHECK_S, check_connection))
    try:
        result = await outcome
    except asyncio.CancelledError:
        if owned and not prediction.done:
            log.info("http_client_disconnected prediction=%s", prediction.id)
            await manager.cancel(prediction.id)
        raise
    finally:
        timers[0].cancel()
        prediction.remove_listener(on_event)
    if result == "disconnected" and not prediction.done:
        log.info("http_client_disconnected prediction=%s", prediction.id)
        if owned:
            await manager.cancel(prediction.id)


# --- OpenAPI ---------------------------------------------------------------------------------
def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


_VALIDATION_ERROR = {
    "422": {
        "description": "Validation Error",
        "content": _json_content(_ref("HTTPValidationError")),
    }
}

# Every other error answer: {"detail": "..."} (see _error and pool/server.py).
ERROR_COMPONENT = "PoolErrorDetail"
_ERROR_SCHEMA = {
    "title": ERROR_COMPONENT,
    "type": "object",
    "required": ["detail"],
    "properties": {"detail": {"title": "Detail"}},
}
_ERROR_REASONS = {
    "400": "Malformed request or JSON body",
    "401": "Missing or wrong bearer token (when http.auth_token is set)",
    "403": "Forbidden (POST /shutdown without http.allow_shutdown)",
    "404": "Prediction or training not found; a training for a model without train:",
    "408": "Request body not received within http.body_timeout_s",
    "409": "All runners busy (http.reject_when_busy)",
    "413": "Request body over http.max_body_bytes",
    "503": "Not ready, queue full, too many connections or shutting down",
}


def _errors(*codes: str) -> dict[str, Any]:
    return {
        code: {"description": _ERROR_REASONS[code], "content": _json_content(_ref(ERROR_COMPONENT))}
        for code in codes
    }


# Connection-level answers any route may give (pool/server.py).
_ANY_ROUTE_ERRORS = ("400", "401", "503")
_PREDICTION_ERRORS = ("400", "401", "408", "409", "413", "503")


def _prediction_op(
    summary: str, op_id: str, *, with_id: bool, noun: str = "Prediction"
) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"in": "header", "name": "prefer", "required": False, "schema": {"type": "string"}}
    ]
    if with_id:
        params.insert(
            0,
            {
                "in": "path",
                "name": f"{noun.lower()}_id",
                "required": True,
                "schema": {"title": f"{noun} ID", "type": "string"},
            },
        )
    return {
        "summary": summary,
        "description": f"Run a single {noun.lower()} on the model",
        "operationId": op_id,
        "parameters": params,
        "requestBody": {"content": _json_content(_ref(f"{noun}Request"))},
        "responses": {
            "200": {
                "description": "Successful Response",
                "content": _json_content(_ref(f"{noun}Response")),
            },
            "202": {
                "description": "Accepted (Prefer: respond-async); progress by webhook",
                "content": _json_content(_ref(f"{noun}Response")),
            },
            **_VALIDATION_ERROR,
            # an id with a "/" in it matches no route: 404
            **_errors(*_PREDICTION_ERRORS, *(("404",) if with_id else ())),
        },
    }


def _simple_op(
    summary: str,
    op_id: str,
    *,
    with_id: bool = False,
    errors: tuple[str, ...] = (),
    content: dict[str, Any] | None = None,
    noun: str = "Prediction",
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "operationId": op_id,
        "responses": {
            "200": {
                "description": "Successful Response",
                "content": content if content is not None else _json_content({}),
            },
            **_errors(*_ANY_ROUTE_ERRORS, *errors),
        },
    }
    if with_id:
        op["parameters"] = [
            {
                "in": "path",
                "name": f"{noun.lower()}_id",
                "required": True,
                "schema": {"title": f"{noun} ID", "type": "string"},
            }
        ]
        op["responses"].update(_VALIDATION_ERROR)
    return op


# Fields of a prediction that are null until (or unless) they are set: Cog's document types
# them as plain strings, so a validator reading it rejects Cog's own answers.
_NULLABLE_RESPONSE_FIELDS = ("output", "error", "started_at", "completed_at", "logs", "metrics")


def _nullable_response(components: dict[str, Any]) -> None:
    response = components.get("PredictionResponse")
    props = response.get("properties") if isinstance(response, dict) else None
    if not isinstance(props, dict):
        return
    for name in _NULLABLE_RESPONSE_FIELDS:
        prop = props.get(name)
        if not isinstance(prop, dict):
            continue
        if "$ref" in prop:  # OpenAPI 3.0 ignores siblings of $ref
            props[name] = {"allOf": [prop], "nullable": True}
        else:
            prop["nullable"] = True
    props.setdefault("status", _ref("Status"))


def _training_paths() -> dict[str, Any]:
    """Cog's training routes (a model with cog.yaml ``train:``)."""
    return {
        "/trainings": {
            "post": _prediction_op("Train", "train_trainings_post", with_id=False, noun="Training")
        },
        "/trainings/{training_id}": {
            "put": _prediction_op(
                "Train Idempotent",
                "train_idempotent_trainings__training_id__put",
                with_id=True,
                noun="Training",
            ),
            "get": _simple_op(
                "Get Training",
                "get_training_trainings__training_id__get",
                with_id=True,
                errors=("404",),
                noun="Training",
            ),
        },
        "/trainings/{training_id}/cancel": {
            "post": _simple_op(
                "Cancel Training",
                "cancel_training_trainings__training_id__cancel_post",
                with_id=True,
                errors=("404",),
                noun="Training",
            )
        },
    }


def openapi_document(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` (the runner's: every component, Cog's shape) with Cog's API paths added."""
    doc = copy.deepcopy(schema)
    doc.setdefault("openapi", "3.0.2")
    doc.setdefault("info", {"title": "Cog", "version": "0.1.0"})
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    components.setdefault(ERROR_COMPONENT, _ERROR_SCHEMA)
    _nullable_response(components)
    doc["paths"] = {
        "/": {"get": _simple_op("Root", "root__get")},
        "/health-check": {"get": _simple_op("Healthcheck", "healthcheck_health_check_get")},
        "/predictions": {
            "post": _prediction_op("Predict", "predict_predictions_post", with_id=False)
        },
        "/predictions/{prediction_id}": {
            "put": _prediction_op(
                "Predict Idempotent",
                "predict_idempotent_predictions__prediction_id__put",
                with_id=True,
            ),
            "get": _simple_op(
                "Get Prediction",
                "get_prediction_predictions__prediction_id__get",
                with_id=True,
                errors=("404",),
            ),
        },
        "/predictions/{prediction_id}/cancel": {
            "post": _simple_op(
                "Cancel",
                "cancel_predictions__prediction_id__cancel_post",
                with_id=True,
                errors=("404",),
            )
        },
        **(_training_paths() if "TrainingInput" in components else {}),
        "/shutdown": {
            "post": _simple_op("Start Shutdown", "start_shutdown_shutdown_post", errors=("403",))
        },
        "/metrics": {
            "get": _simple_op(
                "Metrics",
                "metrics_metrics_get",
                content={"text/plain": {"schema": {"type": "string"}}},
            )
        },
    }
    return doc
