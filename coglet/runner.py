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
import contextvars
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
import typing
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Deque, Dict, List, Optional, Set, TextIO, Tuple

from cog.exceptions import CancelationException
from cog.scope import Scope, use_scope

from coglet import capture, protocol
from coglet.health import HealthChecker
from coglet.predictor import (
    MODE_TRAIN,
    LoadedPredictor,
    PredictorError,
    load_predictor,
    set_spill_root,
)
from coglet.responder import OutputJSON, RawText, Responder, encode_json
from coglet.schema import add_training
from coglet.signals import SignalWakeup
from coglet.sync import SyncGuard, TimerThread
from coglet.validation import InputValidationError

__all__ = ["ConfigError", "RunnerConfig", "cog_error_text", "main", "read_config"]

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
    train_ref: Optional[str] = None  # cog.yaml train:; requests of kind "training" run it
    healthcheck_interval_s: float = protocol.HEALTHCHECK_INTERVAL_S
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
    train_ref, interval_s = _read_feature_config(path, raw)
    temp_dir = raw.get("temp_dir")
    if temp_dir is not None and not (isinstance(temp_dir, str) and os.path.isabs(temp_dir)):
        raise ConfigError(f"{path}: temp_dir must be an absolute path")
    return RunnerConfig(ref, concurrency, index, train_ref, interval_s, temp_dir)


def _read_feature_config(path: str, raw: Dict[str, Any]) -> Tuple[Optional[str], float]:
    """config.json's ``train_ref`` and ``healthcheck_interval_s`` (Cog features)."""
    train_ref = raw.get("train_ref")
    if train_ref is not None and (not isinstance(train_ref, str) or ":" not in train_ref):
        raise ConfigError(f"{path}: train_ref must be a string like 'train.py:train'")
    interval_s = raw.get("healthcheck_interval_s", protocol.HEALTHCHECK_INTERVAL_S)
    if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)):
        raise ConfigError(f"{path}: healthcheck_interval_s must be a number of seconds")
    if not 0 < interval_s < float("inf"):
        raise ConfigError(f"{path}: healthcheck_interval_s must be > 0")
    return train_ref, float(interval_s)


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


# The runner's own log stream (the pool's log channel, else stderr): coglet's lines, and text
# that belongs to no prediction (a healthcheck's prints, a stray thread's late output).
_runner_log: Optional[TextIO] = None


def _setup_logging(real_err: TextIO) -> None:
    global _runner_log
    _runner_log = _log_stream(real_err)
    handler = logging.StreamHandler(_runner_log)
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
        predictor: LoadedPredictor,
    ) -> None:
        self.id = prediction_id
        self.predictor = predictor  # the model's predict(), or its train() for a training
        self.responder = responder
        self.kwargs = kwargs
        self.scope = Scope(context)
        self.cancel_requested = False
        self.announced = False
        # Set once predict() has returned an iterator and the runner is taking its items:
        # Cog words a failure there differently (see cog_error_text).
        self.iterating = False
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
        *,
        trainer: Optional[LoadedPredictor] = None,
        training_error: Optional[str] = None,
    ) -> None:
        self._dir = working_dir
        self._temp_dir = config.temp_dir
        self._predictor = predictor
        self._trainer = trainer
        self._training_error = training_error
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
        predictor = self._predictor
        if problem is None:
            predictor, problem = self._predictor_for(raw)
        if problem is None:
            try:
                kwargs, warnings = predictor.prepare_input(raw.get("input") or {})
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
            prediction_id,
            responder,
            kwargs,
            context if isinstance(context, dict) else {},
            predictor,
        )
        responder.watch_metrics(prediction.scope.metrics)
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

    def _predictor_for(self, raw: Dict[str, Any]) -> Tuple[LoadedPredictor, Optional[str]]:
        """What a request of its ``kind`` runs: predict(), or train() for a training."""
        kind = raw.get("kind", protocol.KIND_PREDICTION)
        if kind == protocol.KIND_PREDICTION:
            return self._predictor, None
        if kind == protocol.KIND_TRAINING:
            if self._training_error is not None:
                return self._predictor, f"trainings are disabled: {self._training_error}"
            if self._trainer is None:
                return self._predictor, "this model has no trainer (cog.yaml has no train:)"
            return self._trainer, None
        kinds = [protocol.KIND_PREDICTION, protocol.KIND_TRAINING]
        return self._predictor, f"request kind must be one of {kinds}, not {kind!r}"

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
                outcome.fail(prediction, e, is_async=prediction.predictor.is_async)
        sync.running = None
        self._complete(prediction, outcome, time.perf_counter() - started)

    def _call_sync(self, prediction: Prediction) -> Optional[OutputJSON]:
        if prediction.predictor.needs_setup:
            awaitable = _train_setup(prediction.predictor)
            if awaitable is not None:  # `async def setup` beside a sync train()
                _run_in_fresh_loop(awaitable)
                prediction.predictor.setup_done()
        result: Any = prediction.predictor.predict(prediction.kwargs)
        if inspect.isawaitable(result) or hasattr(result, "__aiter__"):
            return _drive_on_own_loop(prediction, result)  # an async train() beside sync predict
        if prediction.predictor.is_iterator:
            prediction.iterating = True
            for item in result:
                prediction.responder.append_output(_encode(prediction, item))
            return None
        return _encode_whole(prediction, result)

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
                outcome.fail(prediction, e, is_async=prediction.predictor.is_async)
        self._complete(prediction, outcome, time.perf_counter() - started)
        self._finished(prediction)

    async def _call_async(self, prediction: Prediction) -> Optional[OutputJSON]:
        if not prediction.predictor.is_async:
            # A sync train() beside an async predict(): on its own thread, so the loop and the
            # other predictions keep running.
            return await _in_daemon_thread(lambda: self._call_sync(prediction))
        if prediction.predictor.needs_setup:
            awaitable = _train_setup(prediction.predictor)
            if awaitable is not None:
                await awaitable
                prediction.predictor.setup_done()
        result: Any = prediction.predictor.predict(prediction.kwargs)
        if prediction.predictor.is_iterator:
            if hasattr(result, "__aiter__"):
                async for item in result:
                    prediction.responder.append_output(_encode(prediction, item))
            else:
                for item in await result if inspect.isawaitable(result) else result:
                    prediction.responder.append_output(_encode(prediction, item))
            return None
        if inspect.isawaitable(result):
            result = await result
        return _encode_whole(prediction, result)

    # --- both -----------------------------------------------------------------------------------

    def _complete(self, prediction: Prediction, outcome: _Outcome, predict_time_s: float) -> None:
        metrics = dict(prediction.scope.metrics)
        metrics["predict_time"] = predict_time_s
        self._finish_or_exit(
            prediction.responder,
            outcome.status,
            output_json=outcome.output_json,
            stream=prediction.predictor.is_iterator,
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

    def notify_health(self) -> None:
        """health.json changed (coglet.health): tell the pool to rescan."""
        self._signal_parent(protocol.SIG_OUTPUT)

    def write_runner_log(self, text: str) -> None:
        """Text for the runner's own log (the log channel), never a prediction's."""
        self._late_log(text)

    def _late_log(self, text: str) -> None:
        # Not stderr: the pool gives stderr lines to the one prediction in flight, and this
        # text is no prediction's (or a finished one's).
        stream = _runner_log or self._real_err
        stream.write(text)
        stream.flush()


def _train_setup(trainer: LoadedPredictor) -> Optional[Any]:
    """A training class's setup(), at its first training (its output goes to that training's
    logs, a failure fails it and the next training tries again); an awaitable when async."""
    _log.info("train_setup_starting ref=%s", trainer.ref)
    result = trainer.setup()
    if inspect.isawaitable(result):
        return result
    trainer.setup_done()
    return None


def _drive_on_own_loop(prediction: Prediction, result: Any) -> Optional[OutputJSON]:
    """Await (or iterate) an async train()'s result from the sync path: on a helper thread
    with its own loop, while this (main) thread waits where a cancel's signal can raise
    CancelationException; that cancels the helper's task."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: Dict[str, Any] = {}

    async def consume() -> Optional[OutputJSON]:
        if hasattr(result, "__aiter__"):
            async for item in result:
                prediction.responder.append_output(_encode(prediction, item))
            return None
        return _encode_whole(prediction, await result)

    def work() -> None:
        try:
            box["task"] = task = loop.create_task(consume())
            started.set()
            box["value"] = loop.run_until_complete(task)
        except BaseException as e:
            box["error"] = e
        finally:
            started.set()
            loop.close()

    # The prediction's context (its scope, its log attribution) goes with it to the thread.
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(work,), name="coglet-async-train")
    thread.daemon = True
    thread.start()
    try:
        thread.join()
    except CancelationException:
        started.wait()
        task = box.get("task")
        if task is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:
                pass  # the loop closed meanwhile: it has ended anyway
        thread.join()
        raise
    if "error" in box:
        raise box["error"]
    return typing.cast(Optional[OutputJSON], box.get("value"))


async def _in_daemon_thread(fn: Callable[[], Any]) -> Any:
    """``await fn()`` run on a daemon thread with this context: a training thread must never
    hold the runner's exit (an executor's workers are joined at interpreter exit). A cancel
    ends the wait at once; Python cannot stop the thread, which runs to its end."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()
    context = contextvars.copy_context()

    def settle(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def work() -> None:
        try:
            value = context.run(fn)
        except BaseException as e:
            loop.call_soon_threadsafe(settle, future.set_exception, e)
        else:
            loop.call_soon_threadsafe(settle, future.set_result, value)

    threading.Thread(target=work, name="coglet-sync-train", daemon=True).start()
    return await future


def _run_in_fresh_loop(awaitable: Any) -> None:
    """Await ``awaitable`` to its end from sync code that runs inside the runner's own loop
    (which cannot be re-entered): on a helper thread with its own loop."""
    failure: List[BaseException] = []

    def work() -> None:
        try:
            asyncio.run(_await(awaitable))
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=work, name="coglet-train-setup", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def _encode(prediction: Prediction, value: Any) -> str:
    return encode_json(prediction.predictor.encode_output(value))


def _encode_whole(prediction: Prediction, value: Any) -> OutputJSON:
    """A prediction's whole output: a large string is kept raw (see responder.RawText)."""
    encoded = prediction.predictor.encode_output(value)
    if isinstance(encoded, str) and len(encoded) > protocol.SPILL_DELTA_BYTES:
        return RawText(encoded)
    return encode_json(encoded)


class _Outcome:
    """How one prediction ended, as the terminal delta will say."""

    def __init__(self) -> None:
        self.status = protocol.STATUS_SUCCEEDED
        self.output_json: Optional[OutputJSON] = None
        self.error: Optional[str] = None
        self.error_type: Optional[str] = None

    def fail(self, prediction: Prediction, exc: BaseException, *, is_async: bool) -> None:
        self.status = protocol.STATUS_FAILED
        self.output_json = None
        self.error = cog_error_text(
            exc,
            is_async=is_async,
            iterating=prediction.iterating,
            training=prediction.predictor.mode == MODE_TRAIN,
        )
        self.error_type = type(exc).__name__
        # Cog shows the traceback in the prediction's logs and the message as its error.
        prediction.responder.append_log(
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        )


# --- Cog's words for a failed prediction (Cog 0.23.1, measured) --------------------------------
# Cog's worker names the exception after a phase prefix, and its server prefixes that again
# with "Prediction failed: ", so a sync predict() that raises reads
# "Prediction failed: Prediction failed: ValueError: this is a value error". Clients match on
# these strings, so they are kept word for word (docs/architecture.md, Cog compatibility).
COG_FAILED_PREFIX = "Prediction failed: "
COG_SYNC_PREFIX = "Prediction failed: "
COG_ITERATION_PREFIX = "Generator iteration error: "
COG_ASYNC_PREFIX = "Async prediction failed: "
COG_TRAINING_PREFIX = "Training failed: "
COG_ASYNC_TRAINING_PREFIX = "Async training failed: "


def cog_error_text(
    exc: BaseException, *, is_async: bool, iterating: bool, training: bool = False
) -> str:
    """A failed prediction's (or training's) ``error``, as Cog 0.23.1 words it; the
    traceback goes to the logs."""
    if is_async:
        phase = COG_ASYNC_TRAINING_PREFIX if training else COG_ASYNC_PREFIX
    elif iterating:
        phase = COG_ITERATION_PREFIX
    else:
        phase = COG_TRAINING_PREFIX if training else COG_SYNC_PREFIX
    return f"{COG_FAILED_PREFIX}{phase}{type(exc).__name__}: {exc}"


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
@dataclass
class _Models:
    """What setup produced: the predictor and, with cog.yaml train:, the trainer."""

    predictor: Optional[LoadedPredictor] = None
    trainer: Optional[LoadedPredictor] = None
    training_error: Optional[str] = None  # why train_ref did not load (predictions still run)


def _load_and_setup(
    config: RunnerConfig,
    working_dir: str,
    router: capture.LogRouter,
    loop: asyncio.AbstractEventLoop,
) -> Tuple[_Models, Dict[str, Any]]:
    """Load the predictor (and trainer), write openapi.json, run setup(); returns the models
    (``predictor`` None when setup failed) and the setup result."""
    logs = capture.SetupLogs()
    router.fallback = logs
    result: Dict[str, Any] = {"status": protocol.STATUS_SUCCEEDED, "started_at": _now_iso()}
    models = _Models()
    watchdog = SetupWatchdog.from_env(working_dir, logs, result["started_at"])
    try:
        with capture.attributed(logs):
            _load_models(config, working_dir, loop, models)
    except PredictorError as e:
        result.update(status=protocol.STATUS_FAILED, error=str(e))
        logs.append_log(f"{e}\n")
    except BaseException as e:
        result.update(status=protocol.STATUS_FAILED, error=_error_message(e))
        logs.append_log(traceback.format_exc())
    finally:
        router.fallback = None
        if watchdog is not None:
            watchdog.finish()
    result["completed_at"] = _now_iso()
    result["logs"] = logs.text()
    if result["status"] != protocol.STATUS_SUCCEEDED:
        return _Models(), result
    predictor = models.predictor
    assert predictor is not None
    # The capacity this runner really has: a sync predict() runs one at a time.
    result["max_concurrency"] = config.max_concurrency if predictor.is_async else 1
    result["features"] = _features(models)
    if models.training_error is not None:
        result["training_error"] = models.training_error
    return models, result


def _load_models(
    config: RunnerConfig,
    working_dir: str,
    loop: asyncio.AbstractEventLoop,
    models: _Models,
) -> None:
    """Load and check predict (and train), write openapi.json, then run predict's setup().

    A trainer that cannot be loaded disables trainings only: Cog serves predictions and
    trainings from separate processes, so a broken train: never stops predict: there. For the
    same reason a training class's own setup() waits for the first training (see
    Runner._train_setup): a runner that only predicts never loads a second model.
    """
    predictor = models.predictor = load_predictor(config.predictor_ref)
    schema = predictor.openapi_schema()
    if config.train_ref is not None:
        try:
            # An async train() beside a sync predict() runs on its own loop, a sync one beside
            # an async predict() on its own thread (Runner._call_sync / _call_async).
            models.trainer = load_predictor(config.train_ref, mode=MODE_TRAIN)
        except Exception as e:
            _disable_training(models, e)
        else:
            add_training(schema, models.trainer.inputs, models.trainer.output)
    protocol.write_json_atomic(os.path.join(working_dir, protocol.OPENAPI_FILE), schema)
    _run_setup(predictor, loop)


def _disable_training(models: _Models, exc: Exception) -> None:
    text = str(exc) if isinstance(exc, PredictorError) else f"{type(exc).__name__}: {exc}"
    models.trainer = None
    models.training_error = text
    if not isinstance(exc, PredictorError):
        traceback.print_exc()  # into the setup logs, as a failed setup() would be
    print(f"trainings disabled: {text}")
    _log.warning("training_disabled error=%s", json.dumps(text))


def _run_setup(model: LoadedPredictor, loop: asyncio.AbstractEventLoop) -> None:
    awaitable = model.setup()
    if inspect.isawaitable(awaitable):
        # The loop predictions will use: what setup binds to it stays usable.
        loop.run_until_complete(_await(awaitable))
    model.setup_done()


def _features(models: _Models) -> Dict[str, bool]:
    """What the pool may offer for this model (setup_result.json ``features``)."""
    predictor = models.predictor
    assert predictor is not None
    return {
        protocol.FEATURE_STREAMING: predictor.is_streaming,
        protocol.FEATURE_TRAINING: models.trainer is not None,
        protocol.FEATURE_HEALTHCHECK: predictor.healthcheck is not None,
    }


def _start_healthchecks(
    config: RunnerConfig,
    working_dir: str,
    predictor: LoadedPredictor,
    runner: Runner,
    loop: asyncio.AbstractEventLoop,
) -> Optional[HealthChecker]:
    """Run the predictor's healthcheck() periodically (coglet.health), when it has one."""
    if predictor.healthcheck is None:
        return None
    checker = HealthChecker(
        predictor.healthcheck,
        working_dir=working_dir,
        interval_s=config.healthcheck_interval_s,
        notify=runner.notify_health,
        log_write=runner.write_runner_log,
        # An async predictor's loop is free between awaits; a sync one's is not.
        loop=loop if predictor.is_async else None,
    )
    checker.start()
    return checker


class SetupWatchdog:
    """``COG_SETUP_TIMEOUT``: past it, setup fails with Cog's text and the runner exits.

    A timer thread, because setup() may be stuck where nothing can interrupt it (C code, a
    download): at the deadline it writes the failed setup_result.json itself and leaves with
    EXIT_SETUP_FAILED, so the pool never restart-loops a model that cannot load in time.
    """

    def __init__(
        self, timeout_s: float, working_dir: str, logs: capture.SetupLogs, started_at: str
    ) -> None:
        self.timeout_s = timeout_s
        self._path = os.path.join(working_dir, protocol.SETUP_RESULT_FILE)
        self._logs = logs
        self._started_at = started_at
        self._lock = threading.Lock()
        self._finished = False
        self._timer = threading.Timer(timeout_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    @classmethod
    def from_env(
        cls, working_dir: str, logs: capture.SetupLogs, started_at: str
    ) -> Optional[SetupWatchdog]:
        """A running watchdog when COG_SETUP_TIMEOUT holds a number of seconds > 0, else None."""
        text = os.environ.get(protocol.SETUP_TIMEOUT_ENV, "").strip()
        if not text:
            return None
        try:
            timeout_s = float(text)
        except ValueError:
            timeout_s = float("nan")
        if not timeout_s > 0 or timeout_s == float("inf"):
            # As Cog: a bad value (or 0, which would fail at once) means no timeout.
            _log.warning(
                "setup_timeout_ignored %s=%r reason=not_a_positive_number",
                protocol.SETUP_TIMEOUT_ENV,
                text,
            )
            return None
        return cls(timeout_s, working_dir, logs, started_at)

    def finish(self) -> None:
        """Setup ended in time: the deadline no longer applies."""
        with self._lock:  # a deadline firing right now finishes (and exits) first
            self._finished = True
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            if self._finished:
                return
            result = {
                "status": protocol.STATUS_FAILED,
                "started_at": self._started_at,
                "completed_at": _now_iso(),
                "logs": self._logs.text() + protocol.SETUP_TIMEOUT_ERROR + "\n",
                "error": protocol.SETUP_TIMEOUT_ERROR,
            }
            try:
                protocol.write_json_atomic(self._path, result)
            finally:
                _log.info(
                    "runner_exit reason=setup_timeout code=%d timeout_s=%s pid=%d",
                    protocol.EXIT_SETUP_FAILED,
                    self.timeout_s,
                    os.getpid(),
                )
                logging.shutdown()
                # setup() still runs on the main thread and cannot be interrupted: leave now.
                os._exit(protocol.EXIT_SETUP_FAILED)


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
    models, setup_result = _load_and_setup(config, working_dir, router, loop)
    predictor = models.predictor
    wakeup.install_stop()
    _write_setup_result(working_dir, setup_result)
    if predictor is None:
        _log.info(
            "runner_exit reason=setup_failed code=%d error=%s",
            protocol.EXIT_SETUP_FAILED,
            json.dumps(setup_result.get("error")),
        )
        return protocol.EXIT_SETUP_FAILED
    runner = Runner(
        config,
        working_dir,
        predictor,
        router,
        wakeup,
        parent_pid,
        real_err,
        trainer=models.trainer,
        training_error=models.training_error,
    )
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
    checker = _start_healthchecks(config, working_dir, predictor, runner, loop)
    try:
        return runner.serve(loop)
    finally:
        if checker is not None:
            checker.stop()
