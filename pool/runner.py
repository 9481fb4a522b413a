"""One runner handle: a ``python -m coglet`` child process, its working directory, its slots.

The handle speaks the file + signal protocol of :mod:`coglet.protocol` from the pool's side.
It never decides policy (restarts, routing); the supervisor and the router do. Every method
here runs on the event loop thread; signal handlers never call into it (they only wake the
supervisor, which then calls :meth:`RunnerHandle.scan`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from coglet import protocol
from pool.config import PoolConfig, project_root
from pool.prediction import Prediction, utc_now

__all__ = [
    "BUSY",
    "DEFUNCT",
    "READY",
    "RUNNER_STATES",
    "SETUP_FAILED",
    "STARTING",
    "RunnerHandle",
    "describe_exit",
]

log = logging.getLogger("pool.runner")

STARTING = "STARTING"
READY = "READY"
BUSY = "BUSY"
SETUP_FAILED = "SETUP_FAILED"
DEFUNCT = "DEFUNCT"
RUNNER_STATES = (STARTING, READY, BUSY, SETUP_FAILED, DEFUNCT)

TAIL_LINES = 40  # last output lines kept for death reports


MAX_LINE_BYTES = 64 * 1024  # one runner output line at most; longer ones are cut


def _line_end(buf: bytearray) -> int:
    """Index of the first line end ("\n" or a bare "\r") in ``buf``, or -1."""
    nl = buf.find(b"\n")
    cr = buf.find(b"\r", 0, nl if nl >= 0 else len(buf))
    return cr if cr >= 0 else nl


def sdk_dir(state_dir: str) -> str:
    """``<state_dir>/sdk``: links to this project's ``cog`` and ``coglet`` packages, and nothing
    else, for the runners' ``PYTHONPATH`` (the same for a clone, an editable or a wheel install).
    """
    path = os.path.join(state_dir, "sdk")
    os.makedirs(path, exist_ok=True)
    for name in ("cog", "coglet"):
        target = os.path.join(project_root(), name)
        link = os.path.join(path, name)
        if os.path.islink(link) and os.readlink(link) == target:
            continue
        tmp = f"{link}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(target, tmp)
        os.replace(tmp, link)  # atomic: a runner starting now sees the old or the new link
    return path


def describe_exit(code: int) -> str:
    """``-9`` -> ``killed by SIGKILL``; ``3`` -> ``exited with code 3 (setup failed)``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    meaning = {
        protocol.EXIT_OK: "stopped",
        protocol.EXIT_BAD_CONFIG: "bad config.json",
        protocol.EXIT_SETUP_FAILED: "setup failed",
        protocol.EXIT_PARENT_DIED: "parent died",
    }.get(code)
    return f"exited with code {code}" + (f" ({meaning})" if meaning else "")


@dataclass
class Slot:
    """One prediction in flight on this runner, from dispatch to its terminal response."""

    prediction: Prediction
    dispatched_at: float
    next_epoch: int = 0
    cancel_sent: bool = False  # a cancel-<id> file was written (removed with the slot)
    timers: list[asyncio.TimerHandle] = field(default_factory=list)


class RunnerHandle:
    """The pool's side of one coglet runner (index ``index``, on ``gpu`` or CPU-only)."""

    def __init__(
        self,
        index: int,
        gpu: str | None,
        config: PoolConfig,
        state_dir: str,
        *,
        wake: Callable[[], None],
    ) -> None:
        self.index = index
        self.gpu = gpu
        self.config = config
        self.working_dir = os.path.join(state_dir, f"runner-{index}")
        self.capacity = config.runners.max_concurrency or 1
        self.restarts = 0
        self.schema: dict[str, Any] | None = None
        self.setup_result: dict[str, Any] | None = None
        self.started_at: float | None = None  # monotonic, of the current process
        self.spawned_at: datetime | None = None  # wall clock, of the first spawn
        self.exit_code: int | None = None
        self.setup_timed_out = False
        self.slots: dict[str, Slot] = {}
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._state = DEFUNCT
        self._wake = wake
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self._pipes: dict[int, bytearray] = {}
        self._streams: dict[int, Any] = {}  # fd -> the Popen file object that owns it
        self._tasks: set[asyncio.Task[None]] = set()

    # --- views ---------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """``runner 2 (gpu 2)`` / ``runner 0 (cpu)``: how errors and logs name this runner."""
        return f"runner {self.index} ({'gpu ' + self.gpu if self.gpu is not None else 'cpu'})"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self.exit_code is None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self.exit_code is None

    @property
    def state(self) -> str:
        """STARTING, READY (a free slot by the pool's count), BUSY, SETUP_FAILED or DEFUNCT."""
        if self._state in (READY, BUSY):
            return BUSY if len(self.slots) >= self.capacity else READY
        return self._state

    @property
    def accepting(self) -> bool:
        """Ready and alive: may take predictions up to its capacity."""
        return self._state in (READY, BUSY) and self.alive

    @property
    def free(self) -> int:
        return max(0, self.capacity - len(self.slots)) if self.accepting else 0

    # --- process lifecycle ---------------------------------------------------------------------
    def spawn(self) -> None:
        """Prepare a clean working dir, write config.json, start the child (state STARTING)."""
        self._reset_dir()
        protocol.write_json_atomic(
            os.path.join(self.working_dir, protocol.CONFIG_FILE), self._runner_config()
        )
        python = self.config.model.python or sys.executable
        self._proc = subprocess.Popen(
            [python, "-m", "coglet", "--working-dir", self.working_dir],
            cwd=self.config.model.path,
            env=self._child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Its own session: a terminal's SIGINT/SIGHUP must not reach it; the pool stops it.
            start_new_session=True,
        )
        self.exit_code = None
        self.schema = None
        self.setup_result = None
        self.setup_timed_out = False
        self.started_at = time.monotonic()
        if self.spawned_at is None:
            self.spawned_at = utc_now()
        self._state = STARTING
        self._watch_process()
        log.info("runner_spawned runner=%d gpu=%s pid=%d", self.index, self.gpu, self._proc.pid)

    def _reset_dir(self) -> None:
        # A previous process's leftovers (responses, a stop file) must not leak into this one.
        shutil.rmtree(self.working_dir, ignore_errors=True)
        os.makedirs(self.working_dir, exist_ok=True)

    def _runner_config(self) -> dict[str, Any]:
        config = {
            "predictor_ref": self.config.model.predict,
            "max_concurrency": self.capacity,
            "runner_index": self.index,
            "gpu": self.gpu,
        }
        if self.config.model.train is not None:
            config["train_ref"] = self.config.model.train  # cog.yaml train: (issue 9)
        return config

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.config.runners.env)
        # CPU-only runners get an empty CUDA_VISIBLE_DEVICES: they must not grab a GPU that
        # the configuration did not give them.
        env["CUDA_VISIBLE_DEVICES"] = self.gpu if self.gpu is not None else ""
        # `cog` and `coglet` come from this project, imported by the model's own interpreter,
        # from a directory that holds nothing else: neither the pool's dependencies nor its
        # other top-level packages can shadow what the model's environment installed.
        sdk = sdk_dir(os.path.dirname(self.working_dir))
        old = env.get("PYTHONPATH")
        env["PYTHONPATH"] = sdk + (os.pathsep + old if old else "")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _watch_process(self) -> None:
        assert self._proc is not None and self._proc.stdout and self._proc.stderr
        loop = asyncio.get_running_loop()
        # A pidfd becomes readable when the child exits: no SIGCHLD handler, no polling.
        self._pidfd = os.pidfd_open(self._proc.pid)
        loop.add_reader(self._pidfd, self._wake)
        for stream in (self._proc.stdout, self._proc.stderr):
            fd = stream.fileno()
            os.set_blocking(fd, False)
            self._pipes[fd] = bytearray()
            self._streams[fd] = stream
            loop.add_reader(fd, self._read_pipe, fd)

    def reap(self) -> int | None:
        """If the child has exited: collect it, read its last output, return its exit code."""
        if self._proc is None or self.exit_code is not None:
            return None
        pid, status = os.waitpid(self._proc.pid, os.WNOHANG)
        if pid == 0:
            return None
        code = os.waitstatus_to_exitcode(status)
        self._proc.returncode = code  # so Popen never waits for this pid again
        self.exit_code = code
        self._unwatch_process()
        return code

    def _unwatch_process(self) -> None:
        loop = asyncio.get_running_loop()
        if self._pidfd is not None:
            loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        for fd in list(self._pipes):
            self._read_pipe(fd)  # drain: the last lines matter most in a death report
            self._close_pipe(fd)

    def mark(self, state: str) -> None:
        """Set the supervisor-decided state (SETUP_FAILED, DEFUNCT)."""
        self._state = state

    def send(self, sig: signal.Signals) -> bool:
        """Signal the live child; False when it is gone (never signal a reaped pid)."""
        if not self.alive or self._proc is None:
            return False
        try:
            os.kill(self._proc.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def request_stop(self) -> None:
        """Write ``stop`` and say so: the runner finishes or cancels its work and exits 0."""
        if not self.alive:
            return
        protocol.write_atomic(os.path.join(self.working_dir, protocol.STOP_FILE), b"")
        self.send(protocol.SIG_RESCAN)

    def close(self) -> None:
        """Release fds and tasks after the process is gone (the pool is shutting down)."""
        for task in list(self._tasks):
            task.cancel()
        if self._proc is not None and self.exit_code is None:
            self._unwatch_process()

    # --- output pipes --------------------------------------------------------------------------
    def _read_pipe(self, fd: int) -> None:
        buf = self._pipes.get(fd)
        if buf is None:
            return
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                self._close_pipe(fd)
                break
            buf.extend(chunk)
        self._emit_lines(buf, final=fd not in self._pipes)

    def _close_pipe(self, fd: int) -> None:
        buf = self._pipes.pop(fd, None)
        if buf is None:
            return
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(fd)
        self._emit_lines(buf, final=True)
        # Close through the file object that owns the fd: a bare os.close would leave it to
        # close the same number again later, by then maybe another pipe's.
        stream = self._streams.pop(fd, None)
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()

    def _emit_lines(self, buf: bytearray, *, final: bool) -> None:
        # A bare "\r" ends a line too: progress bars written at the fd level (ffmpeg, tqdm in
        # a subprocess) would otherwise grow one line for as long as the process lives. A
        # line longer than MAX_LINE_BYTES is cut, so the buffer stays bounded.
        while buf:
            end = _line_end(buf)
            if end < 0:
                if not final and len(buf) < MAX_LINE_BYTES:
                    return
                end = min(len(buf), MAX_LINE_BYTES) - 1
            line = bytes(buf[: end + 1]).decode("utf-8", "replace").rstrip("\r\n")
            del buf[: end + 1]
            if line:
                self._on_output_line(line)

    def _on_output_line(self, line: str) -> None:
        # Output from C code or subprocesses: it belongs to the one prediction running, if
        # exactly one is; otherwise nobody can tell whose it is, so it goes to the pool log.
        self.tail.append(line)
        if len(self.slots) == 1:
            (slot,) = self.slots.values()
            slot.prediction.apply_delta({"logs_append": line + "\n"})
        else:
            log.info("runner_output runner=%d line=%s", self.index, json.dumps(line))

    # --- scanning ------------------------------------------------------------------------------
    def scan(self) -> list[Prediction]:
        """Read what the runner wrote: schema, setup result, responses. Returns the predictions
        whose slot was freed (terminal response seen)."""
        if self._state == STARTING:
            self._scan_setup()
        if not self.slots:
            return []
        return self._scan_responses()

    def _scan_setup(self) -> None:
        if self.schema is None:
            self.schema = self._read(protocol.OPENAPI_FILE)
        result = self._read(protocol.SETUP_RESULT_FILE)
        if result is None:
            return
        self.setup_result = result
        if self.schema is None:
            self.schema = self._read(protocol.OPENAPI_FILE)
        if result.get("status") == protocol.STATUS_SUCCEEDED:
            # A runner may take fewer at once than configured (a sync predict takes one).
            effective = result.get("max_concurrency")
            if isinstance(effective, int) and 1 <= effective < self.capacity:
                self.capacity = effective
            self._state = READY
            elapsed = time.monotonic() - (self.started_at or time.monotonic())
            log.info("runner_ready runner=%d pid=%s setup_s=%.3f", self.index, self.pid, elapsed)
        else:
            self._state = SETUP_FAILED
            log.error(
                "runner_setup_failed runner=%d pid=%s error=%s",
                self.index,
                self.pid,
                json.dumps(result.get("error")),
            )

    def _read(self, name: str) -> dict[str, Any] | None:
        path = os.path.join(self.working_dir, name)
        try:
            data = protocol.read_json(path)
        except (OSError, ValueError) as e:
            log.error("runner_bad_file runner=%d file=%s error=%s", self.index, name, e)
            return None
        return data if isinstance(data, dict) else None

    def _scan_responses(self) -> list[Prediction]:
        epochs: dict[str, set[int]] = {}
        try:
            names = os.listdir(self.working_dir)
        except FileNotFoundError:
            return []
        for name in names:
            m = protocol.RESPONSE_RE.match(name)
            if m:
                epochs.setdefault(m["id"], set()).add(int(m["epoch"]))
        freed: list[Prediction] = []
        for prediction_id, seen in epochs.items():
            slot = self.slots.get(prediction_id)
            if slot is None:
                self._discard_responses(prediction_id, seen)
                continue
            while slot.next_epoch in seen and prediction_id in self.slots:
                if self._take_response(prediction_id, slot):
                    freed.append(slot.prediction)
        return freed

    def _discard_responses(self, prediction_id: str, epochs: set[int]) -> None:
        for epoch in epochs:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(
                    os.path.join(self.working_dir, protocol.response_name(prediction_id, epoch))
                )

    def _take_response(self, prediction_id: str, slot: Slot) -> bool:
        """Apply response ``slot.next_epoch``; True when it was terminal (slot freed)."""
        path = os.path.join(
            self.working_dir, protocol.response_name(prediction_id, slot.next_epoch)
        )
        try:
            delta = protocol.read_json(path)
        except Exception as e:  # anything a runner wrote that will not parse fails just this one
            delta = {
                "status": protocol.STATUS_FAILED,
                "error": f"{self.name} sent a bad response: {e}",
            }
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        slot.next_epoch += 1
        problem = protocol.delta_problem(delta)
        if problem is not None or not isinstance(delta, dict):  # garbage fails this one only
            delta = {
                "status": protocol.STATUS_FAILED,
                "error": f"{self.name} sent a bad response: {problem}",
            }
        terminal = delta.get("status") in protocol.TERMINAL_STATUSES
        # Path outputs are encoded by the record before anyone sees them, in epoch order.
        slot.prediction.deliver(delta)
        if terminal:
            self._release(prediction_id)
        return terminal

    # --- predictions ---------------------------------------------------------------------------
    def dispatch(self, prediction: Prediction, request: bytes) -> None:
        """Hand one prediction to the runner: its request file, then SIGHUP.

        ``request`` was encoded by the record before any slot was taken; the file is written
        before the slot is, so a failed write leaves nothing held.
        """
        protocol.write_atomic(
            os.path.join(self.working_dir, protocol.request_name(prediction.id)), request
        )
        self.slots[prediction.id] = Slot(prediction=prediction, dispatched_at=time.monotonic())
        prediction.mark_started(self.index)
        self.send(protocol.SIG_RESCAN)
        log.debug("prediction_dispatched prediction=%s runner=%d", prediction.id, self.index)

    def cancel(self, prediction_id: str) -> bool:
        """Ask the runner to cancel one prediction: ``cancel-<id>``, then SIGUSR1."""
        if prediction_id not in self.slots:
            return False
        self.slots[prediction_id].cancel_sent = True
        protocol.write_atomic(
            os.path.join(self.working_dir, protocol.cancel_name(prediction_id)), b""
        )
        self.send(protocol.SIG_CANCEL)
        log.info("prediction_cancel_sent prediction=%s runner=%d", prediction_id, self.index)
        return True

    def time_out(self, prediction_id: str) -> bool:
        """Its record's deadline passed (the record has ended it): cancel it on the runner, and
        kill the runner if it has not let go within runners.cancel_grace_s."""
        slot = self.slots.get(prediction_id)
        if slot is None:
            return False
        self.cancel(prediction_id)
        grace = self.config.runners.cancel_grace_s
        loop = asyncio.get_running_loop()
        slot.timers.append(loop.call_later(grace, self._on_cancel_grace_over, prediction_id))
        return True

    def _on_cancel_grace_over(self, prediction_id: str) -> None:
        if prediction_id not in self.slots or not self.alive:
            return
        log.warning(
            "runner_kill runner=%d pid=%s reason=cancel_grace_over prediction=%s",
            self.index,
            self.pid,
            prediction_id,
        )
        self.send(signal.SIGKILL)

    def _release(self, prediction_id: str) -> None:
        slot = self.slots.pop(prediction_id, None)
        if slot is None:
            return
        for timer in slot.timers:
            timer.cancel()
        # The runner deletes the request file it took, and the working directory is emptied
        # before a restart; only a cancel file may be left behind, and only after a cancel.
        if slot.cancel_sent:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.working_dir, protocol.cancel_name(prediction_id)))
        self._wake()

    def fail_all(self, error: str) -> list[Prediction]:
        """The process is gone: fail every prediction it held; returns them (slots freed)."""
        failed = []
        for prediction_id in list(self.slots):
            slot = self.slots[prediction_id]
            self._release(prediction_id)
            # Updates still being encoded land first, then this failure, in order.
            slot.prediction.lose_runner(error)
            failed.append(slot.prediction)
        return failed

    def death_report(self) -> str:
        """``runner 2 (gpu 2) died: killed by SIGKILL`` plus the last output lines."""
        text = f"{self.name} died: {describe_exit(self.exit_code or 0)}"
        lines = [line for line in self.tail if line.strip()][-10:]
        if lines:
            text += "\nlast output:\n" + "\n".join(lines)
        return text
