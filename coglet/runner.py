"""The coglet runner process: ``python -m coglet --working-dir DIR`` (DESIGN §3).

Lifecycle: read ``config.json`` → leave the terminal's session, die with the parent → load
the predictor and write ``openapi.json`` → run ``setup()`` → write ``setup_result.json`` and
send SIG_READY → serve request files until ``stop``/SIGTERM → exit 0.

Threads. The control loop (asyncio, on the main thread) scans the working directory on each
signal and owns the protocol. An **async** predictor's predictions are tasks on that loop. A
**sync** predictor's predictions run inline in it, one at a time, still on the main thread,
because that is the only thread where a signal handler can raise CancelationException inside
predict(); a helper timer thread (coglet.sync) covers what must happen on time meanwhile. A
null sync prediction therefore costs no thread switch at all. Signal handlers only record
(coglet.signals); the signal numbers reach the loop through ``signal.set_wakeup_fd``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import inspect
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Deque, Dict, List, Optional, Set, TextIO, Tuple

from cog.exceptions import CancelationException
from cog.scope import Scope, use_scope

from coglet import capture, protocol
from coglet.predictor import LoadedPredictor, PredictorError, load_predictor, set_spill_root
from coglet.responder import Responder, encode_json
from coglet.signals import SignalWakeup
from coglet.sync import SyncGuard, TimerThread
from coglet.validation import InputValidationError

__all__ = ["ConfigError", "RunnerConfig", "main", "read_config"]

_log = logging.getLogger("coglet")
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# The parent's death is delivered as SIGTERM (not SIGKILL) so the runner can tell it from a
# stop: it checks os.getppid() and exits EXIT_PARENT_DIED.
_PDEATHSIG = signal.SIGTERM
# How long after a prediction starts the runner announces it (see Runner._announce).
ANNOUNCE_DELAY_S = 0.002


# --- configuration -----------------------------------------------------------------------------
class ConfigError(Exception):
    """config.json is missing or malformed (a pool bug: the runner exits EXIT_BAD_CONFIG)."""


@dataclass(frozen=True)
class RunnerConfig:
    predictor_ref: str
    max_concurrency: int
    runner_index: Optional[int] = None
    temp_dir: Optional[str] = None  # the runner's private temporary root (made by the pool)


def read_config(working_dir: str) -> RunnerConfig:
    """Read and check ``config.json``; ConfigError names the problem."""
    path = os.path.join(working_dir, protocol.CONFIG_FILE)
    try:
        raw = protocol.read_json(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from e
    if raw is None:
        raise ConfigError(f"{path}: missing")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a JSON object")
    ref = raw.get("predictor_ref")
    if not isinstance(ref, str) or ":" not in ref:
        raise ConfigError(f"{path}: predictor_ref must be a string like 'predict.py:Predictor'")
    concurrency = raw.get("max_concurrency", 1)
    if not _is_int(concurrency) or concurrency < 1:
        raise ConfigError(f"{path}: max_concurrency must be an integer >= 1")
    index = raw.get("runner_index")
    if index is not None and not _is_int(index):
        raise ConfigError(f"{path}: runner_index must be an integer")
    temp_dir = raw.get("temp_dir")
    if temp_dir is not None and not (isinstance(temp_dir, str) and os.path.isabs(temp_dir)):
        raise ConfigError(f"{path}: temp_dir must be an absolute path")
    return RunnerConfig(ref, concurrency, index, temp_dir)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- process setup -----------------------------------------------------------------------------
def _detach(parent_pid: int) -> None:
    """Own session (a terminal's SIGINT/SIGHUP stays away) and die with the parent."""
    try:
        os.setsid()
    except OSError:
        pass  # already a session leader (EPERM): nothing to leave
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(_PDEATHSIG), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the safety rescan's getppid() check still notices
    if os.getppid() != parent_pid:
        _exit_parent_died()  # the parent died before prctl took effect


def _exit_parent_died() -> None:
    _log.info(
        "runner_exit reason=parent_died code=%d pid=%d", protocol.EXIT_PARENT_DIED, os.getpid()
    )
    logging.shutdown()
    # Nobody reads responses any more; leave at once so the GPU is freed, and take the
    # model's own children along: they are in this session's process group, and nobody
    # else would stop them. SIGKILL to the group ends this process too.
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    except OSError:
        pass
    os._exit(protocol.EXIT_PARENT_DIED)


def _exit_response_write_failed() -> None:
    logging.shutdown()
    # The parent waits for a terminal delta that cannot be written: leave, so that it fails
    # this runner's predictions (naming the exit) and starts a fresh runner.
    os._exit(protocol.EXIT_RESPONSE_WRITE_FAILED)


def _log_stream(real_err: TextIO) -> TextIO:
    """Where coglet's own lines go: the pool's log channel (``LOG_FD_ENV``), else stderr.

    The channel is kept out of the model's children (not inheritable), and the runner's
    stderr then carries only what the model writes, which the pool attributes to predictions.
    """
    raw = os.environ.pop(protocol.LOG_FD_ENV, None)
    if raw is None:
        return real_err
    try:
        fd = int(raw)
        os.set_inheritable(fd, False)
        return os.fdopen(fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    except (ValueError, OSError):
        return real_err


def _setup_logging(real_err: TextIO) -> None:
    handler = logging.StreamHandler(_log_stream(real_err))
    handler.setFormatter(logging.Formatter("coglet %(message)s"))
    _log.addHandler(handler)
    _log.propagate = False  # the root logger is the model's, captured into its logs
    _log.setLevel(os.environ.get("COGLET_LOG_LEVEL", "INFO").upper())


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# --- predictions -------------------------------------------------------------------------------
class Prediction:
    """One accepted request: its inputs, scope and response stream."""

    def __init__(
        self,
        prediction_id: str,
        responder: Responder,
        kwargs: Dict[str, Any],
        context: Dict[str, Any],
    ) -> None:
        self.id = prediction_id
        self.responder = responder
        self.kwargs = kwargs
        self.scope = Scope(context)
        self.cancel_requested = False
        self.announced = False
        self.task: Optional[asyncio.Task] = None  # async predictors only


class Runner:
    """The control loop: scans the working directory and runs what it finds."""

    def __init__(
        self,
        config: RunnerConfig,
        working_dir: str,
        predictor: LoadedPredictor,
        router: capture.LogRouter,
        wakeup: SignalWakeup,
        parent_pid: int,
        real_err: TextIO,
    ) -> None:
        self._dir = working_dir
        self._temp_dir = config.temp_dir
        self._predictor = predictor
        self._router = router
        self._wakeup = wakeup
        self._parent_pid = parent_pid
        self._real_err = real_err
        self.capacity = config.max_concurrency if predictor.is_async else 1
        self._predictions: Dict[str, Prediction] = {}
        self._waiting: Deque[Prediction] = collections.deque()
        self._running: Set[Prediction] = set()
        self._busy = False
        # Guards the BUSY/READY hint pair: the timer thread announces, the loop frees slots.
        self._hint_lock = threading.Lock()
        self._stopping = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._done: Optional[asyncio.Future] = None
        self._safety: Optional[asyncio.TimerHandle] = None
        self._sync: Optional[SyncGuard] = None
        self._timer: Optional[TimerThread] = None
        self._sync_scheduled = False
        if not predictor.is_async:
            self._sync = SyncGuard(working_dir, lambda: wakeup.stop_requested)
            self._timer = TimerThread(protocol.SAFETY_RESCAN_S, self._on_sync_tick)
            wakeup.interrupt = self._sync.on_signal
            if config.max_concurrency > 1:
                _log.info(
                    "concurrency_clamped max_concurrency=%d to=1 reason=sync_predict",
                    config.max_concurrency,
                )

    def serve(self, loop: asyncio.AbstractEventLoop) -> int:
        """Run the control loop on this (the main) thread until stopped; the exit code."""
        if self._timer is not None:
            self._timer.start()
        try:
            return loop.run_until_complete(self._control())
        finally:
            if self._timer is not None:
                self._timer.stop()

    async def _control(self) -> int:
        self._loop = loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        loop.add_reader(self._wakeup.read_fd, self._on_wakeup)
        self._safety = loop.call_later(protocol.SAFETY_RESCAN_S, self._on_safety)
        self._on_wakeup()  # files and signals that arrived before the loop ran
        try:
            return await self._done
        finally:
            loop.remove_reader(self._wakeup.read_fd)
            self._safety.cancel()

    # --- wake-ups -------------------------------------------------------------------------------
    def _on_wakeup(self) -> None:
        """A signal arrived (its number is on the wakeup pipe): look at everything."""
        self._wakeup.drain()
        self._look()

    def _look(self) -> None:
        if self._wakeup.stop_requested:
            self._handle_stop_signal()
        self._scan()

    def _on_safety(self) -> None:
        """The slow rescan: catches a lost or coalesced signal and a parent that died."""
        assert self._loop is not None
        self._safety = self._loop.call_later(protocol.SAFETY_RESCAN_S, self._on_safety)
        if os.getppid() != self._parent_pid:
            _exit_parent_died()
        self._on_wakeup()

    def _on_sync_tick(self) -> None:
        """Timer thread, while the loop may be inside a sync predict(): the same safety net."""
        assert self._sync is not None
        if os.getppid() != self._parent_pid:
            _exit_parent_died()
        prediction = self._sync.running
        if prediction is None:
            return
        self._announce(prediction.id)
        if self._sync.should_cancel(prediction):
            self._sync.interrupt(prediction)

    def _handle_stop_signal(self) -> None:
        """SIGTERM: the parent's death (PDEATHSIG) or a request to stop."""
        if os.getppid() != self._parent_pid:
            _exit_parent_died()
        self._begin_stop("sigterm")

    def _scan(self) -> None:
        try:
            names = os.listdir(self._dir)
        except FileNotFoundError:
            self._begin_stop("working_dir_gone")
            return
        requests: List[str] = []
        cancels: List[str] = []
        stop = False
        for name in names:
            if name.startswith(protocol.REQUEST_PREFIX):
                m = protocol.REQUEST_RE.match(name)
                if m:
                    requests.append(m.group("id"))
            elif name.startswith(protocol.CANCEL_PREFIX):
                m = protocol.CANCEL_RE.match(name)
                if m:
                    cancels.append(m.group("id"))
            elif name == protocol.STOP_FILE:
                stop = True
        if stop:  # first: a request that comes with the stop is not taken
            self._begin_stop("stop_file")
        if requests and not self._stopping:
            for prediction_id in self._in_arrival_order(requests):
                self._accept(prediction_id)
        for prediction_id in cancels:
            self._handle_cancel(prediction_id)

    def _in_arrival_order(self, ids: List[str]) -> List[str]:
        if len(ids) == 1:
            return ids

        def arrival(prediction_id: str) -> Tuple[int, int]:
            # mtime ticks coarsely on tmpfs; there, inode numbers grow with creation.
            try:
                st = os.stat(self._path(protocol.request_name(prediction_id)))
            except OSError:
                return (0, 0)
            return (st.st_mtime_ns, st.st_ino)

        return sorted(ids, key=arrival)

    def _path(self, name: str) -> str:
        return os.path.join(self._dir, name)

    # --- requests -------------------------------------------------------------------------------
    def _accept(self, prediction_id: str) -> None:
        """Read, delete and validate one request, queue it (epoch 0 comes with _announce)."""
        path = self._path(protocol.request_name(prediction_id))
        try:
            raw: Any = protocol.read_json(path)
        except (OSError, ValueError) as e:
            raw = e
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        if raw is None:
            return  # gone between listdir and open
        if isinstance(raw, dict) and protocol.REQUEST_FILE_KEY in raw:
            raw = self._read_spilled_request(prediction_id, raw[protocol.REQUEST_FILE_KEY])
        if prediction_id in self._predictions:
            _log.info("request_ignored prediction=%s reason=duplicate_id", prediction_id)
            return
        responder = self._new_responder(prediction_id)
        kwargs: Dict[str, Any] = {}
        warnings: List[str] = []
        problem = _request_problem(raw, prediction_id)
        if problem is None:
            try:
                kwargs, warnings = self._predictor.prepare_input(raw.get("input") or {})
            except InputValidationError as e:
                problem = str(e)
            except Exception as e:
                problem = f"invalid input: {type(e).__name__}: {e}"
        responder.start("".join(f"{w}\n" for w in warnings))
        if problem is not None:
            _log.debug("prediction_rejected prediction=%s error=%r", prediction_id, problem)
            self._finish_or_exit(responder, protocol.STATUS_FAILED, error=problem)
            return
        context = raw.get("context")
        prediction = Prediction(
            prediction_id, responder, kwargs, context if isinstance(context, dict) else {}
        )
        self._predictions[prediction_id] = prediction
        self._waiting.append(prediction)
        if self._timer is None:  # sync: the timer thread's tick announces (see _on_sync_tick)
            self._call_later(ANNOUNCE_DELAY_S, self._announce, prediction_id)
        self._dispatch()

    def _read_spilled_request(self, prediction_id: str, path: Any) -> Any:
        """A large request the pool wrote to this runner's temporary root; read and removed.
        Only that exact file is read: a pointer anywhere else is a bad request."""
        expected = (
            os.path.join(self._temp_dir, protocol.request_name(prediction_id))
            if self._temp_dir
            else None
        )
        if expected is None or path != expected:
            return ValueError(f"request file {path!r} is not this runner's")
        try:
            return protocol.read_json_file(path)
        except (OSError, ValueError) as e:
            return e
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass

    def _new_responder(self, prediction_id: str) -> Responder:
        return Responder(
            self._dir,
            prediction_id,
            notify=self._notify_output,
            schedule_flush=self._schedule_flush,
            late_log=self._late_log,
            spill_dir=self._temp_dir,
        )

    def _dispatch(self) -> None:
        """Start waiting predictions while slots are free (SIG_BUSY: see _announce)."""
        assert self._loop is not None
        if self._sync is not None:
            if self._waiting and not self._sync_scheduled:
                self._sync_scheduled = True
                self._loop.call_soon(self._run_next_sync)
            return
        while self._waiting and len(self._running) < self.capacity and not self._stopping:
            prediction = self._waiting.popleft()
            self._running.add(prediction)
            self._update_log_fallback()
            _log.debug("prediction_started prediction=%s", prediction.id)
            prediction.task = self._loop.create_task(self._run_async(prediction))

    def _announce(self, prediction_id: str) -> None:
        """A moment after a start: SIG_OUTPUT for epoch 0, and SIG_BUSY if the slots are full.

        Signals are hints and each one wakes the parent (on a small machine, often by taking
        the runner's CPU): a prediction that is over by now already said everything with its
        terminal signal, and its slot was never full for long enough to matter.
        """
        prediction = self._predictions.get(prediction_id)
        with self._hint_lock:
            if prediction is None or prediction.responder.done or prediction.announced:
                return
            prediction.announced = True
            if prediction.responder.announce():
                self._signal_parent(protocol.SIG_OUTPUT)
            if len(self._running) >= self.capacity and not self._busy:
                self._busy = True
                self._signal_parent(protocol.SIG_BUSY)

    def _finished(self, prediction: Prediction) -> None:
        """After the terminal delta is written: free the slot, start the next one."""
        self._predictions.pop(prediction.id, None)
        self._running.discard(prediction)
        prediction.task = None
        if prediction.cancel_requested:
            # A cancel file seen later than this is stale and goes in _handle_cancel.
            try:
                os.unlink(self._path(protocol.cancel_name(prediction.id)))
            except FileNotFoundError:
                pass
        _log.debug("prediction_finished prediction=%s", prediction.id)
        self._dispatch()
        self._update_log_fallback()
        with self._hint_lock:
            if self._busy and len(self._running) < self.capacity:
                self._busy = False
                self._signal_parent(protocol.SIG_READY)
        if self._stopping and not self._predictions:
            self._finish_stop()

    def _update_log_fallback(self) -> None:
        # A thread the model starts has an empty context: with one prediction in flight its
        # output is that prediction's; with several it cannot be attributed.
        self._router.fallback = (
            next(iter(self._running)).responder if len(self._running) == 1 else None
        )

    # --- cancel and stop ------------------------------------------------------------------------
    def _handle_cancel(self, prediction_id: str) -> None:
        prediction = self._predictions.get(prediction_id)
        if prediction is None:
            try:  # stale: that prediction already finished (or never came)
                os.unlink(self._path(protocol.cancel_name(prediction_id)))
            except FileNotFoundError:
                pass
            return
        if not prediction.cancel_requested:
            _log.debug("prediction_cancel prediction=%s", prediction_id)
            self._cancel(prediction)

    def _cancel(self, prediction: Prediction) -> None:
        prediction.cancel_requested = True
        if prediction in self._waiting:
            self._waiting.remove(prediction)
            self._finish_or_exit(prediction.responder, protocol.STATUS_CANCELED)
            self._finished(prediction)
        elif prediction.task is not None:
            prediction.task.cancel()
        # A running sync prediction is interrupted by the signal handler, not from here: the
        # loop does not run while it does.

    def _begin_stop(self, reason: str) -> None:
        """Take no more requests, cancel what runs, exit 0 once each has its terminal delta."""
        if self._stopping:
            return
        self._stopping = True
        _log.info(
            "runner_stopping reason=%s in_flight=%d pid=%d",
            reason,
            len(self._predictions),
            os.getpid(),
        )
        for prediction in list(self._waiting) + list(self._running):
            self._cancel(prediction)
        if not self._predictions:
            self._finish_stop()

    def _finish_stop(self) -> None:
        if self._done is not None and not self._done.done():
            _log.info("runner_exit reason=stopped code=%d pid=%d", protocol.EXIT_OK, os.getpid())
            self._done.set_result(protocol.EXIT_OK)

    # --- sync predictions: inline on the main thread --------------------------------------------
    def _run_next_sync(self) -> None:
        """A loop callback: run the next waiting sync prediction to its end, right here."""
        self._sync_scheduled = False
        if self._wakeup.drain():
            # Signals that came during the previous prediction (a cancel of this one, a stop)
            # must count before it starts; the loop would only see them after.
            self._look()
        if self._running or not self._waiting or self._stopping:
            return
        prediction = self._waiting.popleft()
        self._running.add(prediction)
        self._update_log_fallback()
        self._run_sync(prediction)
        self._finished(prediction)

    def _run_sync(self, prediction: Prediction) -> None:
        """Predict, stream or encode, and write the terminal delta."""
        assert self._sync is not None
        sync = self._sync
        started = time.perf_counter()
        outcome = _Outcome()
        sync.running = prediction
        with capture.attributed(prediction.responder), use_scope(prediction.scope):
            try:
                # Flags only: signals that came before the start were scanned just now.
                if prediction.cancel_requested or self._wakeup.stop_requested:
                    raise CancelationException(f"prediction {prediction.id} was canceled")
                outcome.output_json = sync.call_cancelable(
                    prediction, lambda: self._call_sync(prediction)
                )
            except CancelationException:
                outcome.status = protocol.STATUS_CANCELED
            except BaseException as e:
                outcome.fail(prediction, e)
        sync.running = None
        self._complete(prediction, outcome, time.perf_counter() - started)

    def _call_sync(self, prediction: Prediction) -> Optional[str]:
        result: Any = self._predictor.predict(prediction.kwargs)
        if self._predictor.is_iterator:
            for item in result:
                prediction.responder.append_output(self._encode(item))
            return None
        return self._encode(result)

    # --- async predictions: tasks on the loop ---------------------------------------------------
    async def _run_async(self, prediction: Prediction) -> None:
        """Predict, stream or encode, and write the terminal delta."""
        started = time.perf_counter()
        outcome = _Outcome()
        with capture.attributed(prediction.responder), use_scope(prediction.scope):
            try:
                outcome.output_json = await self._call_async(prediction)
            except (asyncio.CancelledError, CancelationException):
                outcome.status = protocol.STATUS_CANCELED
            except BaseException as e:
                outcome.fail(prediction, e)
        self._complete(prediction, outcome, time.perf_counter() - started)
        self._finished(prediction)

    async def _call_async(self, prediction: Prediction) -> Optional[str]:
        result: Any = self._predictor.predict(prediction.kwargs)
        if self._predictor.is_iterator:
            if hasattr(result, "__aiter__"):
                async for item in result:
                    prediction.responder.append_output(self._encode(item))
            else:
                for item in await result if inspect.isawaitable(result) else result:
                    prediction.responder.append_output(self._encode(item))
            return None
        if inspect.isawaitable(result):
            result = await result
        return self._encode(result)

    # --- both -----------------------------------------------------------------------------------
    def _encode(self, value: Any) -> str:
        return encode_json(self._predictor.encode_output(value))

    def _complete(self, prediction: Prediction, outcome: _Outcome, predict_time_s: float) -> None:
        metrics = dict(prediction.scope.metrics)
        metrics["predict_time"] = predict_time_s
        self._finish_or_exit(
            prediction.responder,
            outcome.status,
            output_json=outcome.output_json,
            stream=self._predictor.is_iterator,
            error=outcome.error,
            error_type=outcome.error_type,
            metrics=metrics,
        )

    def _finish_or_exit(self, responder: Responder, status: str, **fields: Any) -> None:
        """Write a terminal delta; when not even a failure notice can be written, exit."""
        try:
            responder.finish(status, **fields)
        except OSError as e:
            _log.error(
                "response_write_failed prediction=%s error=%r action=exit code=%d",
                responder.prediction_id,
                e,
                protocol.EXIT_RESPONSE_WRITE_FAILED,
            )
            _exit_response_write_failed()

    # --- plumbing -------------------------------------------------------------------------------
    def _call_later(self, delay_s: float, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule a protocol callback, from any thread: on the timer thread for a sync
        predictor (the loop is busy while one runs), else on the loop."""
        if self._timer is not None:
            self._timer.call_later(delay_s, fn, *args)
            return
        assert self._loop is not None
        if threading.current_thread() is threading.main_thread():
            self._loop.call_later(delay_s, fn, *args)
        else:  # a thread the model started
            self._loop.call_soon_threadsafe(self._loop.call_later, delay_s, fn, *args)

    def _schedule_flush(self, responder: Responder, delay_s: float) -> None:
        self._call_later(delay_s, self._flush, responder)

    def _flush(self, responder: Responder) -> None:
        try:
            responder.flush()
        except OSError as e:
            # What was pending stays pending: the next flush or the terminal delta retries it.
            _log.error(
                "response_write_failed prediction=%s error=%r action=retry_later",
                responder.prediction_id,
                e,
            )

    def _notify_output(self) -> None:
        self._signal_parent(protocol.SIG_OUTPUT)

    def _signal_parent(self, sig: signal.Signals) -> None:
        try:
            os.kill(self._parent_pid, sig)
        except ProcessLookupError:
            pass  # the parent is gone: the safety rescan exits

    def _late_log(self, text: str) -> None:
        self._real_err.write(text)
        self._real_err.flush()


class _Outcome:
    """How one prediction ended, as the terminal delta will say."""

    def __init__(self) -> None:
        self.status = protocol.STATUS_SUCCEEDED
        self.output_json: Optional[str] = None
        self.error: Optional[str] = None
        self.error_type: Optional[str] = None

    def fail(self, prediction: Prediction, exc: BaseException) -> None:
        self.status = protocol.STATUS_FAILED
        self.output_json = None
        self.error = _error_message(exc)
        self.error_type = type(exc).__name__
        # Cog shows the traceback in the prediction's logs and the message as its error.
        prediction.responder.append_log(
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        )


def _error_message(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _request_problem(raw: Any, prediction_id: str) -> Optional[str]:
    """What is wrong with a request file's body, or None."""
    if isinstance(raw, BaseException):
        return f"unreadable request file: {raw}"
    if not isinstance(raw, dict):
        return "request must be a JSON object"
    if raw.get("id", prediction_id) != prediction_id:
        return f"request id {raw.get('id')!r} does not match its file name"
    if not isinstance(raw.get("input") or {}, dict):
        return "input must be a JSON object"
    return None


# --- setup -------------------------------------------------------------------------------------
def _load_and_setup(
    config: RunnerConfig,
    working_dir: str,
    router: capture.LogRouter,
    loop: asyncio.AbstractEventLoop,
) -> Tuple[Optional[LoadedPredictor], Dict[str, Any]]:
    """Load the predictor, write openapi.json, run setup(); returns (predictor|None, result)."""
    logs = capture.SetupLogs()
    router.fallback = logs
    result: Dict[str, Any] = {"status": protocol.STATUS_SUCCEEDED, "started_at": _now_iso()}
    predictor: Optional[LoadedPredictor] = None
    try:
        with capture.attributed(logs):
            predictor = load_predictor(config.predictor_ref)
            protocol.write_json_atomic(
                os.path.join(working_dir, protocol.OPENAPI_FILE), predictor.openapi_schema()
            )
            awaitable = predictor.setup()
            if inspect.isawaitable(awaitable):
                # The loop predictions will use: what setup binds to it stays usable.
                loop.run_until_complete(_await(awaitable))
    except PredictorError as e:
        result.update(status=protocol.STATUS_FAILED, error=str(e))
        logs.append_log(f"{e}\n")
    except BaseException as e:
        result.update(status=protocol.STATUS_FAILED, error=_error_message(e))
        logs.append_log(traceback.format_exc())
    finally:
        router.fallback = None
    result["completed_at"] = _now_iso()
    result["logs"] = logs.text()
    if result["status"] != protocol.STATUS_SUCCEEDED:
        return None, result
    assert predictor is not None
    # The capacity this runner really has: a sync predict() runs one at a time.
    result["max_concurrency"] = config.max_concurrency if predictor.is_async else 1
    return predictor, result


async def _await(awaitable: Any) -> Any:
    return await awaitable


SETUP_LOGS_KEPT = 64 * 1024  # characters of setup logs kept when the whole does not fit


def _write_setup_result(working_dir: str, result: Dict[str, Any]) -> None:
    """Write setup_result.json; when it does not fit (a full tmpfs, huge setup logs), write it
    again with only the end of the logs; when not even that fits, exit: the pool must never
    wait for a setup result that will not come."""
    path = os.path.join(working_dir, protocol.SETUP_RESULT_FILE)
    try:
        protocol.write_json_atomic(path, result)
        return
    except OSError as e:
        logs = result.get("logs") or ""
        _log.error("setup_result_write_failed error=%r logs_chars=%d", e, len(logs))
        short = dict(result)
        short["logs"] = f"[{len(logs) - SETUP_LOGS_KEPT} characters of setup logs cut]\n" + (
            logs[-SETUP_LOGS_KEPT:]
        ) if len(logs) > SETUP_LOGS_KEPT else logs
    try:
        protocol.write_json_atomic(path, short)
    except OSError as e:
        _log.error("setup_result_write_failed error=%r action=exit", e)
        _exit_response_write_failed()


# --- main --------------------------------------------------------------------------------------
def _parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m coglet", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--working-dir",
        required=True,
        help="the runner's private protocol directory (config.json lives there)",
    )
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one coglet; returns the process exit code (see coglet.protocol EXIT_*)."""
    args = _parse_args(argv)
    working_dir = os.path.abspath(args.working_dir)
    try:
        config = read_config(working_dir)
    except ConfigError as e:
        print(f"coglet: bad config: {e}", file=sys.stderr, flush=True)
        return protocol.EXIT_BAD_CONFIG
    parent_pid = os.getppid()
    wakeup = SignalWakeup()
    wakeup.install_rescan()
    router = capture.LogRouter()
    _real_out, real_err = capture.install(router)
    _setup_logging(real_err)
    _detach(parent_pid)
    set_spill_root(config.temp_dir)
    model_dir = os.getcwd()
    # Importing the model would otherwise write __pycache__/ into the model directory, which
    # is the user's (and often read-only); cached bytecode that is already there still loads.
    sys.dont_write_bytecode = True
    if model_dir not in sys.path:
        sys.path.insert(0, model_dir)  # `python -I`/`-P` leave the cwd off sys.path
    _log.info(
        "runner_starting runner=%s pid=%d ref=%s",
        config.runner_index,
        os.getpid(),
        config.predictor_ref,
    )
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    predictor, setup_result = _load_and_setup(config, working_dir, router, loop)
    wakeup.install_stop()
    _write_setup_result(working_dir, setup_result)
    if predictor is None:
        _log.info(
            "runner_exit reason=setup_failed code=%d error=%s",
            protocol.EXIT_SETUP_FAILED,
            json.dumps(setup_result.get("error")),
        )
        return protocol.EXIT_SETUP_FAILED
    runner = Runner(config, working_dir, predictor, router, wakeup, parent_pid, real_err)
    _log.info(
        "runner_ready runner=%s pid=%d async=%s capacity=%d",
        config.runner_index,
        os.getpid(),
        predictor.is_async,
        runner.capacity,
    )
    try:
        os.kill(parent_pid, protocol.SIG_READY)
    except ProcessLookupError:
        _exit_parent_died()
    return runner.serve(loop)
