"""PoolManager: the pool's public API, used by the HTTP API (``pool/api.py``) and ``ingest/``.

It ties the supervisor (runner processes), the router (queue and slots), input validation,
file inputs and outputs, webhooks and metrics together, and owns the shutdown sequence of
DESIGN §7: stop intake, let in-flight work finish within the grace, cancel the rest, stop
the runners in steps, leave no child behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiohttp

from coglet import protocol
from coglet.validation import InputValidationError, validate_input
from pool import files, network, statedir
from pool.config import PoolConfig
from pool.errors import InvalidInput, InvalidRequest, NoTrainer, NotReady, ShuttingDown
from pool.jsonstream import RawText
from pool.metrics import GAUGE_IN_FLIGHT, GAUGE_QUEUE_DEPTH, GAUGE_RUNNERS, Metrics, Sample
from pool.prediction import (
    EVENT_COMPLETED,
    EndReason,
    Phase,
    Prediction,
    PredictionRequest,
    approx_bytes,
    check_wire_safe,
    secret_fields,
)
from pool.router import Router
from pool.runner import BUSY, READY, RUNNER_STATES
from pool.supervisor import Supervisor
from pool.webhooks import WebhookSender

__all__ = ["PoolManager"]

log = logging.getLogger("pool.manager")

# Cog 0.23.1 fails a prediction whose input file cannot be fetched (HTTP 200, status failed)
# with this prefix before the download error; ours names the input, the URL and why after it.
COG_INPUT_ERROR_PREFIX = "Input validation error: "

CancelForwarder = Callable[[str], Awaitable[None]]
CANCEL_FORWARD_TIMEOUT_S = 5.0
OFF_LOOP_CHECK_BYTES = 1024 * 1024  # inputs larger: checked and encoded in a thread


class PoolManager:
    """Runs a pool of runners for one model and routes predictions to them."""

    def __init__(
        self,
        config: PoolConfig,
        *,
        metrics: Metrics | None = None,
        config_loader: Callable[[], PoolConfig] | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._own_state_dir = config.state_dir is None
        self.state_dir = config.state_dir or statedir.default_state_dir()
        os.makedirs(self.state_dir, exist_ok=True)
        self._state_lock = statedir.StateDirLock(self.state_dir)
        self._dir_locks: list[statedir.StateDirLock] = []
        # Runners' private temporary roots, on disk: spilled outputs must not fill a tmpfs.
        self._files_dir = statedir.files_dir_path()
        # Output files the prediction records keep (pool.files.OutputFiles), one dir each.
        self._outputs_dir = os.path.join(self._files_dir, "outputs")
        self._output_seq = itertools.count()
        # Input files stay on disk (they may be large); protocol files go to the state dir.
        self._own_inputs_dir = config.state_dir is None
        self.inputs_dir = (
            os.path.join(self.state_dir, "inputs")
            if config.state_dir
            else tempfile.mkdtemp(prefix=f"cog-pool-inputs-{os.getpid()}-")
        )
        self._supervisor = Supervisor(
            config,
            self.state_dir,
            on_tick=self._on_tick,
            metrics=metrics,
            temp_root=self._files_dir,
            config_loader=config_loader,  # a reload reads cog.yaml again
        )
        self._router = Router(config.http, self._supervisor.runners, config.predictions)
        self._webhooks = WebhookSender(config.webhooks, network=config.network, metrics=metrics)
        self._health_sources: dict[str, Callable[[], dict[str, Any]]] = {}
        self._health_sources["reload"] = self._supervisor.reload_info  # reload and scaling
        self._cancel_forwarders: list[CancelForwarder] = []
        self._cleanups: set[asyncio.Task[None]] = set()  # input dirs being removed, off the loop
        self._secrets: tuple[dict[str, Any] | None, frozenset[str]] = (None, frozenset())
        self._training_view: tuple[dict[str, Any] | None, dict[str, Any] | None] = (None, None)
        self._shutting_down = False
        self._shutdown_task: asyncio.Task[None] | None = None
        self._started = False
        self._http: aiohttp.ClientSession | None = None  # input downloads: network policy
        self._upload_http: aiohttp.ClientSession | None = None  # files.upload_url: trusted
        self._ready_once = False
        if metrics is not None:
            metrics.add_collector(self._samples)
            metrics.add_runner_source(self._supervisor.runners_info)

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Spawn the runners (they set up in parallel); returns at once."""
        if self._started:
            return
        self._started = True
        log.info(
            "pool_starting runners=%d model=%s state_dir=%s",
            len(self._supervisor.runners),
            self.config.model.path,
            self.state_dir,
        )
        # Before the lock: a dead pool's state dir may be this one, with its leftovers.
        await asyncio.to_thread(statedir.sweep_dead_pools)
        self._state_lock.acquire()  # StateDirBusy when another live pool uses this dir
        os.makedirs(self._files_dir, mode=0o700, exist_ok=True)
        os.makedirs(self._outputs_dir, mode=0o700, exist_ok=True)
        # This pool's own dirs are locked too: a pool that cannot see this one's pid (another
        # pid namespace sharing the directory) must not sweep them as a dead pool's.
        for own in (self._files_dir, self.inputs_dir if self._own_inputs_dir else None):
            if own is not None:
                lock = statedir.StateDirLock(own)
                lock.acquire()
                self._dir_locks.append(lock)
        await self._supervisor.start()
        # One client for every input download and output upload: connections and TLS
        # sessions are reused across predictions.
        self._http = network.client_session(self.config.network)
        self._upload_http = aiohttp.ClientSession()

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Drain (DESIGN §7). Concurrent and repeated calls share one shutdown."""
        if self._shutdown_task is None:
            grace = self.config.shutdown.grace_s if grace_s is None else grace_s
            self._shutdown_task = asyncio.get_running_loop().create_task(self._shutdown(grace))
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self, grace_s: float) -> None:
        self._shutting_down = True
        log.info("shutdown_begin grace_s=%s in_flight=%d", grace_s, len(self._router.active))
        self._router.notify()  # queue consumers waiting for a slot look again, and stop
        await self._wait_finished(grace_s)
        left = [p for p in self._router.active.values() if not p.done]
        if left:
            log.info("shutdown_step step=cancel predictions=%d", len(left))
            self._router.cancel_queued(EndReason.SHUTDOWN)
            for prediction in left:
                self._cancel(prediction, EndReason.SHUTDOWN)
            await self._wait_finished(self.config.runners.cancel_grace_s)
        if self._started:
            await self._supervisor.stop()
        for prediction in list(self._router.active.values()):
            prediction.request_cancel(EndReason.SHUTDOWN)
            prediction.fail("the runner was stopped", reason=EndReason.SHUTDOWN)
        await self._webhooks.close(self.config.webhooks.timeout_s)
        for session in (self._http, self._upload_http):
            if session is not None:
                await session.close()
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
        await asyncio.to_thread(self._remove_dirs)
        log.info("shutdown_complete")

    async def _wait_finished(self, timeout_s: float) -> None:
        pending = [p for p in self._router.active.values() if not p.done]
        if not pending or timeout_s <= 0:
            return
        waits = [asyncio.ensure_future(p.wait()) for p in pending]
        _, still = await asyncio.wait(waits, timeout=timeout_s)
        for fut in still:
            fut.cancel()
        await asyncio.gather(*still, return_exceptions=True)

    def _remove_dirs(self) -> None:
        held = self._state_lock.held
        for lock in self._dir_locks:
            lock.release()
        shutil.rmtree(self._files_dir, ignore_errors=True)
        self._state_lock.release()
        if self._own_inputs_dir:
            shutil.rmtree(self.inputs_dir, ignore_errors=True)
        if self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            return
        if not held:
            return  # a configured dir this pool never locked may be another pool's
        for runner in self._supervisor.runners:
            shutil.rmtree(runner.working_dir, ignore_errors=True)
        shutil.rmtree(os.path.join(self.state_dir, "inputs"), ignore_errors=True)

    # --- views ---------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        return self._supervisor.status()

    @property
    def streaming(self) -> bool:
        """The model's predict() has ``@cog.streaming`` (SSE allowed)."""
        return self._supervisor.features().get(protocol.FEATURE_STREAMING) is True

    @property
    def user_health_error(self) -> str | None:
        """Cog's ``user_healthcheck_error`` while no set-up runner passes its check."""
        return self._supervisor.user_health_error()

    @property
    def schema(self) -> dict[str, Any] | None:
        return self._supervisor.schema()

    @property
    def supervisor_failed(self) -> asyncio.Event:
        """Set when the supervisor's pass failed ``runners.max_failed_ticks`` times in a row."""
        return self._supervisor.failed

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    @property
    def last_tick_at(self) -> float | None:
        """``time.monotonic()`` of the supervisor loop's last pass (None before start)."""
        return self._supervisor.last_tick_at

    @property
    def runners(self) -> list[dict[str, Any]]:
        return self._supervisor.runners_info()

    def health(self) -> dict[str, Any]:
        """The /health-check body (queue consumers add theirs through health sources)."""
        user_error = self.user_health_error
        body: dict[str, Any] = {
            # Cog's UNHEALTHY: no runner passes its user healthcheck() (peers that pass serve).
            "status": "UNHEALTHY" if user_error is not None else self.status,
            "setup": self._supervisor.setup_info(),
            "runners": self._supervisor.runners_info(),
            "concurrency": {
                "max": self.capacity(),
                "current": self._router.in_flight,
            },
        }
        # Cog's `status` keeps its meaning (READY: a free slot); `degraded` says that part of
        # the configured capacity is gone for good, which READY alone would hide.
        if user_error is not None:
            body["user_healthcheck_error"] = user_error
        reasons = self._supervisor.degraded_reasons()
        body["degraded"] = bool(reasons)
        body["degraded_reasons"] = reasons
        for name, fn in self._health_sources.items():
            try:
                body[name] = fn()
            except Exception as e:  # one broken source must not break the health check
                body[name] = {"error": str(e)}
        return body

    def get(self, prediction_id: str) -> Prediction | None:
        """A prediction in flight (or downloading its inputs) or recently finished (slim)."""
        return self._router.get(prediction_id)

    def capacity(self) -> int:
        """Prediction slots over all runners (their concurrency), starting ones included."""
        return sum(r.capacity for r in self._supervisor.runners)

    def free_slots(self) -> int:
        if self._shutting_down:
            return 0
        return self._router.free_slots()

    def add_slot_listener(self, listener: Callable[[], object]) -> None:
        """Call ``listener()`` synchronously whenever slots may have changed (a slot freed, a
        runner ready, the pool draining)."""
        self._router.add_listener(listener)

    def remove_slot_listener(self, listener: Callable[[], object]) -> None:
        self._router.remove_listener(listener)

    async def wait_for_free_slot(self) -> None:
        """Return when ``free_slots() > 0``; raises ShuttingDown once the pool drains."""
        while self.free_slots() <= 0:
            if self._shutting_down:
                raise ShuttingDown("the pool is shutting down")
            await self._router.wait_for_free_slot()
            if self._shutting_down:
                raise ShuttingDown("the pool is shutting down")

    def request_reload(self) -> None:
        """Replace the runners one at a time (a fresh one READY before an old one drains)."""
        self._supervisor.request_reload()

    def request_scale(self, delta: int) -> None:
        """Add (> 0) or drain away (< 0) runners, within 1 and runners.max_runners."""
        self._supervisor.request_scale(delta)

    def add_health_source(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        self._health_sources[name] = fn

    def add_cancel_forwarder(self, fn: CancelForwarder) -> None:
        self._cancel_forwarders.append(fn)

    # --- predictions ---------------------------------------------------------------------------
    async def submit(self, request: PredictionRequest, *, source: str = "http") -> Prediction:
        """Validate and admit (once), prepare and queue one prediction; returns once it is
        queued or has ended (await ``.wait()``).

        Raises InvalidRequest (a webhook the network policy refuses) or InvalidInput (nothing
        taken), NotReady, PoolBusy, PoolFull or ShuttingDown.
        """
        # Before anything is taken: a 422 / a dead letter. A large input is walked in a thread
        # (50 MB of non-ASCII text take ~150 ms); from here on nothing awaits until admission,
        # so two submits of one id cannot both be admitted.
        if approx_bytes(request.input) > OFF_LOOP_CHECK_BYTES:
            await asyncio.to_thread(check_wire_safe, request)
        else:
            check_wire_safe(request)
        if self._shutting_down:
            raise ShuttingDown("the pool is shutting down; retry on another instance")
        if request.webhook is not None:
            await self._check_webhook(request.webhook)
            if self._shutting_down:
                raise ShuttingDown("the pool is shutting down; retry on another instance")
        if request.id is not None:
            known = self.get(request.id)
            # Idempotent by id, except for a run lost to a runner death: that is retried.
            if known is not None and not (known.done and known.runner_died):
                return known
        schema = self._require_ready()
        if request.is_training:
            schema = self._training_schema(schema)
        if _has_raw_text(request.input):
            request, checked = await asyncio.to_thread(_raw_text_inputs, schema, request)
            _validate(schema, checked)
        else:
            _validate(schema, request.input)
        prediction = Prediction(
            request,
            source=source,
            secret_fields=self._secret_fields(schema),
            logs_max_bytes=self.config.predictions.logs_max_bytes,
            streamed_output_max_bytes=self.config.predictions.streamed_output_max_bytes,
            encoder=self._encode_output,
        )
        self._router.admit(prediction)  # holds its place while its inputs are fetched
        prediction.add_listener(self._on_event)
        timeout_s = self.config.runners.predict_timeout_s
        if timeout_s is not None:
            prediction.arm_deadline(timeout_s, self._on_deadline)
        try:
            runner_input = await self._prepare(schema, prediction)
        except BaseException:
            prediction.disarm()
            prediction.remove_listener(self._on_event)
            self._router.withdraw(prediction)
            self._remove_input_dir(prediction, os.path.join(self.inputs_dir, prediction.id))
            raise
        if runner_input is not None:
            self._router.enqueue(prediction)
        self._webhooks.watch(prediction)
        # DEBUG: prediction_finished carries the same fields, and this path is hot.
        log.debug("prediction_accepted prediction=%s source=%s", prediction.id, source)
        return prediction

    async def _check_webhook(self, url: str) -> None:
        """A webhook the network policy refuses, or whose host does not resolve, is refused
        now (HTTP 422, a queue's dead letter), naming the field, the URL and why: accepted, it
        could only fail later, out of the client's sight."""
        try:
            await self._webhooks.check(url)
        except network.NetworkRefused as e:
            detail = {"loc": ["body", "webhook"], "msg": str(e), "type": "value_error.url.refused"}
            raise InvalidRequest([detail]) from None
        except network.UrlUnresolvable as e:
            detail = {
                "loc": ["body", "webhook"],
                "msg": str(e),
                "type": "value_error.url.unresolvable",
            }
            raise InvalidRequest([detail]) from None

    async def _prepare(self, schema: dict[str, Any], prediction: Prediction) -> Any:
        """Fetch the file inputs and encode the request file; None when the prediction ended
        meanwhile (failed fetch, deadline, cancel). Raises for what is not a prediction yet
        (a bad data URI: InvalidInput; the pool began to shut down: ShuttingDown)."""
        request = prediction.request
        dest = os.path.join(self.inputs_dir, prediction.id)
        runner_input: Any = request.input
        if files.file_input_fields(schema):
            task = asyncio.get_running_loop().create_task(
                files.prepare_inputs(
                    schema, request.input, dest, self.config.files, session=self._http
                )
            )
            prediction.preparation = task
            try:
                runner_input = await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not prediction.done or (current is not None and current.cancelling()):
                    raise  # our caller was cancelled, not the download
                self._remove_input_dir(prediction, dest)
                return None
            except files.FileFetchError as e:
                # The prediction was accepted: it is recorded, webhooked and counted as failed,
                # like any other failure, instead of vanishing with the exception. A failed
                # prediction, not a 422, is what Cog answers for an input it cannot fetch (an
                # unreachable host or a 404 alike); a URL the network policy refuses is one.
                self._remove_input_dir(prediction, dest)
                prediction.fail(f"{COG_INPUT_ERROR_PREFIX}{e}")
                return None
            finally:
                prediction.preparation = None
            if runner_input is not request.input:  # files were fetched into dest
                prediction.input_dir = dest
        try:
            if prediction.input_bytes > OFF_LOOP_CHECK_BYTES:  # ~2 ms per MB: not on the loop
                await asyncio.to_thread(prediction.encode_request, runner_input)
            else:
                prediction.encode_request(runner_input)
        except (ValueError, UnicodeError) as e:  # check_wire_safe refuses these first
            detail = {"loc": ["body", "input"], "msg": f"not encodable: {e}", "type": "value_error"}
            raise InvalidInput([detail]) from None
        # Nothing awaits from here to the queue: what happened meanwhile is seen now.
        if prediction.done:  # the deadline, or a cancel, ended it while it prepared
            return None
        if self._shutting_down:
            raise ShuttingDown("the pool is shutting down; retry on another instance")
        if prediction.cancel_requested:
            prediction.finish(protocol.STATUS_CANCELED)
            return None
        return runner_input

    def _secret_fields(self, schema: dict[str, Any]) -> frozenset[str]:
        cached_schema, fields = self._secrets
        if cached_schema is not schema:
            fields = secret_fields(schema)
            self._secrets = (schema, fields)
        return fields

    def _training_schema(self, schema: dict[str, Any]) -> dict[str, Any]:
        """The schema as a training sees it: ``TrainingInput``/``TrainingOutput`` in the place
        of ``Input``/``Output``, so validation, file inputs and secrets work unchanged
        (cached per schema). NoTrainer when the model has no ``train:``."""
        cached_for, view = self._training_view
        if cached_for is schema and view is not None:
            return view
        components = schema.get("components", {}).get("schemas", {})
        if not isinstance(components, dict) or "TrainingInput" not in components:
            raise NoTrainer("this model has no trainer (cog.yaml has no train:)")
        view = dict(schema)
        view_components = dict(components)
        view_components["Input"] = components["TrainingInput"]
        if "TrainingOutput" in components:
            view_components["Output"] = components["TrainingOutput"]
        view["components"] = {**schema["components"], "schemas": view_components}
        self._training_view = (schema, view)
        return view

    def _require_ready(self) -> dict[str, Any]:
        schema = self.schema
        if not self._ready_once or schema is None:
            raise NotReady(f"the model is not ready (status {self.status}); retry shortly")
        if not self._supervisor.can_ever_serve():
            raise NotReady(f"no runner can serve (status {self.status}); see /health-check")
        return schema

    async def cancel(self, prediction_id: str) -> bool:
        """Cancel a preparing, queued or running prediction; False when this pool does not
        hold it."""
        prediction = self._router.active.get(prediction_id)
        if prediction is not None and not prediction.done:
            return self._cancel(prediction, EndReason.CANCELED)
        if self.get(prediction_id) is not None:
            return False  # finished here already
        for forward in list(self._cancel_forwarders):
            try:
                # Bounded: a blocked broker must not hang the client's cancel request.
                await asyncio.wait_for(forward(prediction_id), CANCEL_FORWARD_TIMEOUT_S)
            except Exception as e:  # a broker hiccup must not fail the local cancel call
                log.warning("cancel_forward_failed prediction=%s error=%r", prediction_id, e)
        return False

    def _cancel(self, prediction: Prediction, reason: EndReason) -> bool:
        if prediction.phase == Phase.PREPARING:
            # The download stops now; submit() finishes it canceled.
            prediction.request_cancel(reason)
            prediction.finish(protocol.STATUS_CANCELED)
            log.info("prediction_canceled prediction=%s where=download", prediction.id)
            return True
        return self._router.cancel(prediction.id, reason)

    def _on_deadline(self, prediction: Prediction) -> None:
        """The record's deadline (runners.predict_timeout_s from admission) passed, in any
        phase: it ends ``failed`` now, and whatever still works for it is stopped."""
        if prediction.done:
            return
        runner = self._router.runner_of(prediction.id)
        phase = prediction.phase.value
        if prediction.phase == Phase.RUNNING and runner is None:
            phase = "encoding"  # the runner is done; its output is being encoded or uploaded
        log.warning(
            "prediction_timed_out prediction=%s phase=%s runner=%s",
            prediction.id,
            phase,
            prediction.runner_index,
        )
        # Cog's message; the phase it ended in is on the record (ended_in) and in the log.
        # A run still on its runner is canceled there (_on_event).
        prediction.fail("Prediction timed out", reason=EndReason.TIMED_OUT)

    def _on_event(self, prediction: Prediction, event: str) -> None:
        if event != EVENT_COMPLETED:
            return
        self._router.record_finished(prediction)
        runner = self._router.runner_of(prediction.id)
        if runner is not None:
            # It ended here (its deadline, its output cap, an output no JSON can carry) while
            # its runner still works on it: the runner is told to stop, and the supervisor
            # kills it if it has not let go within runners.cancel_grace_s.
            runner.cancel(prediction.id)
        if prediction.input_dir is not None:  # most predictions have no file inputs
            self._remove_input_dir(prediction)
        if self.metrics is not None:
            self.metrics.prediction_finished(
                status=prediction.status,
                source=prediction.source,
                queue_wait_s=prediction.queue_wait_s,
                predict_time_s=prediction.metrics.get("predict_time"),
                runner_index=prediction.runner_index,
            )
        # Successes are counted by /metrics and logged at DEBUG: a log line costs about as
        # much as the rest of the pool's work on a null prediction. Failures and cancels
        # are the lines an operator reads, at INFO.
        level = logging.DEBUG if prediction.status == protocol.STATUS_SUCCEEDED else logging.INFO
        log.log(
            level,
            "prediction_finished prediction=%s status=%s reason=%s runner=%s source=%s",
            prediction.id,
            prediction.status,
            prediction.end_reason,
            prediction.runner_index,
            prediction.source,
        )

    def _remove_input_dir(self, prediction: Prediction, path: str | None = None) -> None:
        """Remove the files fetched for ``prediction``, in a thread: a big tree must not stall
        the event loop. The task is owned here and awaited at shutdown."""
        path = path or prediction.input_dir
        prediction.input_dir = None
        if path is None or not os.path.lexists(path):
            return
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)
        )
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _encode_output(self, output: Any, prediction: Prediction) -> Any:
        return await files.encode_outputs(
            output,
            self.config.files,
            session=self._upload_http,
            keep=lambda: prediction.output_files(self._new_output_files),
            movable=self._runner_owns,
        )

    def _new_output_files(self, prediction_id: str) -> files.OutputFiles:
        name = f"{prediction_id}-{next(self._output_seq)}"  # an id may be run again
        return files.OutputFiles(self._outputs_dir, name, self._remove_output_dirs)

    def _runner_owns(self, path: str) -> bool:
        """A path in a runner's private temporary root (a file object it spilled): the
        record may move it instead of copying it."""
        return any(runner.owns(path) for runner in self._supervisor.runners)

    def _remove_output_dirs(self, dirs: list[str]) -> None:
        """Nothing may serve these output files any more: remove them, in a worker thread
        (a 100 MB file's blocks are freed by the unlink). Owned here, awaited at shutdown."""

        def remove() -> None:
            for path in dirs:
                shutil.rmtree(path, ignore_errors=True)

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a record used outside one)
            remove()
            return
        task = loop.create_task(asyncio.to_thread(remove))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    def _on_tick(self) -> None:
        if not self._ready_once and self.status in (READY, BUSY):
            self._ready_once = True
            log.info("pool_ready runners=%d", len(self._supervisor.runners))
        self._router.dispatch()
        if self._router.queued and not self._supervisor.can_ever_serve():
            # Every runner is out for good: waiting work would wait forever.
            count = self._router.fail_queued(
                f"no runner can serve this model (pool status {self.status}); see /health-check"
            )
            log.error("queued_predictions_failed count=%d reason=no_runner_can_serve", count)

    def _samples(self) -> Iterable[Sample]:
        counts = dict.fromkeys(RUNNER_STATES, 0)
        for runner in self._supervisor.runners:
            counts[runner.state] += 1
        for state, n in counts.items():
            yield Sample(GAUGE_RUNNERS, n, {"state": state})
        yield Sample(GAUGE_IN_FLIGHT, self._router.in_flight)
        yield Sample(GAUGE_QUEUE_DEPTH, self._router.queued)


# --- long string inputs kept as slices of the request body (pool.jsonbody) ------------------
# Schema keys that say nothing about a string's content: any string passes such a property.
_NO_CONSTRAINT_KEYS = frozenset({"type", "format", "title", "description", "x-order", "default"})


def _any_string(prop: Any) -> bool:
    """Whether every ``str`` passes ``prop`` (a plain ``str``, ``Path`` or ``File`` input)."""
    return (
        isinstance(prop, dict)
        and prop.get("type") == "string"
        and prop.get("format") in (None, "uri")
        and _NO_CONSTRAINT_KEYS.issuperset(prop)
    )


def _any_strings(prop: Any) -> bool:
    """Whether every list of ``str`` passes ``prop`` (``list[Path]``, ``list[str]``)."""
    return (
        isinstance(prop, dict)
        and prop.get("type") == "array"
        and _NO_CONSTRAINT_KEYS.union({"items"}).issuperset(prop)
        and _any_string(prop.get("items"))
    )


def _has_raw_text(values: dict[str, Any]) -> bool:
    """Whether an input (or an item of a list input) is a :class:`RawText` (the parser keeps
    them only there)."""
    for value in values.values():
        if isinstance(value, RawText):
            return True
        if isinstance(value, list) and any(isinstance(item, RawText) for item in value):
            return True
    return False


def _raw_text_inputs(
    schema: dict[str, Any], request: PredictionRequest
) -> tuple[PredictionRequest, dict[str, Any]]:
    """The request, and the input to validate, for a request whose long strings are slices of
    its body (:class:`RawText`).

    Where the schema takes any string (a ``Path``, ``File`` or unconstrained ``str`` input,
    or a list of them) the slice stays, and validation sees a short stand-in string, which
    passes exactly as the real one would. Anywhere else (a pattern, choices, a length limit,
    a union, a ``Secret``, a field the schema does not know) the slice becomes the ``str``
    it is, so validation and its messages are exactly those of the whole string. For a
    worker thread: a made ``str`` is one copy of its slice.
    """
    props = schema.get("components", {}).get("schemas", {}).get("Input", {}).get("properties")
    props = props if isinstance(props, dict) else {}
    values = dict(request.input)
    checked = dict(values)
    for name, value in values.items():
        prop = props.get(name)
        if isinstance(value, RawText):
            if _any_string(prop):
                checked[name] = _STAND_IN
            else:
                values[name] = checked[name] = value.text()
        elif isinstance(value, list) and any(isinstance(item, RawText) for item in value):
            if _any_strings(prop):
                checked[name] = [_STAND_IN if isinstance(v, RawText) else v for v in value]
            else:
                values[name] = checked[name] = [
                    v.text() if isinstance(v, RawText) else v for v in value
                ]
    return dataclasses.replace(request, input=values), checked


_STAND_IN = "data:,"  # any string: it stands in only where every string passes


def _validate(schema: dict[str, Any], raw: dict[str, Any]) -> None:
    """The model's schema check of one input (InvalidInput with Cog's messages, located)."""
    try:
        validate_input(schema, raw)
    except InputValidationError as e:
        detail = []
        for err in e.errors:
            loc = ["body", "input", err.get("field")]
            detail.append({"loc": loc, "msg": err.get("msg"), "type": err.get("type")})
        raise InvalidInput(detail) from None
