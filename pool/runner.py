"""One runner handle: a ``python -m coglet`` child process, its working directory, its slots.

The handle speaks the file + signal protocol of :mod:`coglet.protocol` from the pool's side.
It never decides policy (restarts, kills, recycling, routing); the supervisor and the router
do. Every method
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
from pool.files import has_path
from pool.jsonstream import TextSlices
from pool.prediction import EVENT_COMPLETED, Prediction, utc_now

__all__ = [
    "BUSY",
    "DEFUNCT",
    "EVENT_FINISHED",
    "EVENT_READY",
    "EVENT_SETUP_FAILED",
    "READY",
    "RUNNER_STATES",
    "SETUP_FAILED",
    "STARTING",
    "DeltaFile",
    "RunnerEvent",
    "RunnerHandle",
    "Slot",
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
        protocol.EXIT_RESPONSE_WRITE_FAILED: "could not write a response",
    }.get(code)
    return f"exited with code {code}" + (f" ({meaning})" if meaning else "")


EVENT_READY = "ready"
EVENT_SETUP_FAILED = "setup_failed"
EVENT_FINISHED = "finished"


@dataclass(frozen=True)
class RunnerEvent:
    """Something a runner's channel reported, for the supervisor to act on (the handle only
    reads and writes the channel; what to do about it is the supervisor's policy)."""

    kind: str  # EVENT_READY, EVENT_SETUP_FAILED, EVENT_FINISHED
    prediction_id: str | None = None
    error_type: str | None = None  # EVENT_FINISHED of a failed prediction: the exception's type


@dataclass(frozen=True)
class DeltaFile:
    """A delta the runner spilled to a file in its temporary root (large output or logs)."""

    path: str


@dataclass(frozen=True)
class RunnerLost:
    """The runner died while a spilled delta was being read: the loss lands after it."""

    error: str


Pending = dict[str, Any] | DeltaFile | RunnerLost


@dataclass
class Slot:
    """One prediction in flight on this runner, from dispatch to its terminal response."""

    prediction: Prediction
    dispatched_at: float
    next_epoch: int = 0
    # time.monotonic() of the pool's cancel (its cancel-<id> file, if it could be written, is
    # removed with the slot). What to do if the runner does not let go is the supervisor's.
    cancel_sent_at: float | None = None
    pending: list[Pending] = field(default_factory=list)  # behind a spilled delta's load
    loader: asyncio.Task[None] | None = None


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
        temp_root: str | None = None,
    ) -> None:
        self.index = index
        self.gpu = gpu
        self.config = config
        self.working_dir = os.path.join(state_dir, f"runner-{index}")
        # The runner's private temporary root, on disk: large deltas and returned file
        # objects are spilled here, and this is the only place the pool removes files from.
        self.temp_dir = os.path.join(temp_root or state_dir, f"runner-{index}-tmp")
        self.capacity = config.runners.max_concurrency or 1
        self.restarts = 0
        self.recycles = 0
        # What the channel reported since the supervisor last looked (take_events()).
        self._events: list[RunnerEvent] = []
        self.draining: str | None = None  # why it takes no new work before a recycle
        self.stop_requested = False  # the stop file was written to the current process
        self.schema: dict[str, Any] | None = None
        self.setup_result: dict[str, Any] | None = None
        self.started_at: float | None = None  # monotonic, of the current process
        self.spawned_at: datetime | None = None  # wall clock, of the first spawn
        self.exit_code: int | None = None
        self.setup_timed_out = False
        self.slots: dict[str, Slot] = {}
        # The user healthcheck() (health.json): the latest result, and how many checks in a
        # row have failed (a check is one new ``checked_at``); reset with each process.
        self.health: dict[str, Any] | None = None
        self.health_failures = 0
        self._health_stamp: tuple[int, int] | None = None  # health.json's (mtime_ns, size)
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._state = DEFUNCT
        self._wake = wake
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self._pipes: dict[int, bytearray] = {}
        self._streams: dict[int, Any] = {}  # fd -> the Popen file object that owns it
        self._log_fd: int | None = None  # coglet's own log channel (protocol.LOG_FD_ENV)
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
            full = len(self.slots) >= self.capacity
            return BUSY if full or self.draining or not self.healthy else READY
        return self._state

    @property
    def accepting(self) -> bool:
        """Ready, alive, healthy and not draining for a recycle: may take predictions up to
        capacity."""
        return (
            self._state in (READY, BUSY) and self.alive and self.draining is None and self.healthy
        )

    @property
    def has_healthcheck(self) -> bool:
        """The predictor has a user ``healthcheck()`` (setup_result ``features``)."""
        features = (self.setup_result or {}).get("features")
        return isinstance(features, dict) and features.get(protocol.FEATURE_HEALTHCHECK) is True

    @property
    def healthy(self) -> bool:
        """False while the latest user healthcheck() failed; True without one, or before the
        first result."""
        return self.health is None or self.health.get("healthy") is not False

    @property
    def health_error(self) -> str | None:
        """The failing check's text (Cog's words), or None."""
        if self.healthy or self.health is None:
            return None
        error = self.health.get("error")
        return error if isinstance(error, str) else "Healthcheck failed"

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
        log_read, log_write = os.pipe()
        env = self._child_env()
        env[protocol.LOG_FD_ENV] = str(log_write)
        try:
            self._proc = subprocess.Popen(
                [python, "-m", "coglet", "--working-dir", self.working_dir],
                cwd=self.config.model.path,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(log_write,),
                # Its own session and process group: a terminal's SIGINT/SIGHUP must not
                # reach it, and the pool can signal the model's own children with it.
                start_new_session=True,
            )
        except BaseException:
            os.close(log_read)
            raise
        finally:
            os.close(log_write)
        self._log_fd = log_read
        self.exit_code = None
        self.schema = None
        self.setup_result = None
        self.setup_timed_out = False
        self.health = None
        self.health_failures = 0
        self._health_stamp = None
        self._events.clear()
        self.draining = None
        self.stop_requested = False
        self.started_at = time.monotonic()
        if self.spawned_at is None:
            self.spawned_at = utc_now()
        self._state = STARTING
        self._watch_process()
        log.info("runner_spawned runner=%d gpu=%s pid=%d", self.index, self.gpu, self._proc.pid)

    def _reset_dir(self) -> None:
        # A previous process's leftovers (responses, a stop file, spilled files) must not leak
        # into this one. Both dirs are private to this runner: 0700. The working dir holds a
        # few small files; the temporary root may hold a dead runner's large spills, so it is
        # renamed away at once and removed in a worker thread, off the loop.
        shutil.rmtree(self.working_dir, ignore_errors=True)
        if os.path.lexists(self.temp_dir):
            old = f"{self.temp_dir}.old-{time.monotonic_ns()}"
            os.rename(self.temp_dir, old)
            self._remove_later(old)
        for path in (self.working_dir, self.temp_dir):
            os.makedirs(path, mode=0o700, exist_ok=True)
            os.chmod(path, 0o700)

    def _remove_later(self, path: str) -> None:
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _runner_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "predictor_ref": self.config.model.predict,
            "max_concurrency": self.capacity,
            "runner_index": self.index,
            "gpu": self.gpu,
            "temp_dir": self.temp_dir,
        }
        if self.config.model.train is not None:
            config["train_ref"] = self.config.model.train  # cog.yaml train: (issue 9)
        config["healthcheck_interval_s"] = self.config.runners.healthcheck_interval_s
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
        streams: list[Any] = [self._proc.stdout, self._proc.stderr]
        if self._log_fd is not None:
            streams.append(os.fdopen(self._log_fd, "rb", buffering=0))
        for stream in streams:
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
        self._kill_leftovers(self._proc.pid)
        self._unwatch_process()
        return code

    def _kill_leftovers(self, pgid: int) -> None:
        """The runner is gone: kill what the model started in its process group (children
        that would otherwise outlive it, holding a GPU or a port). The group id cannot be
        handed to a new process while any member of the group is alive."""
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return  # the group is empty: nothing was left behind
        log.warning("runner_leftovers_killed runner=%d pgid=%d", self.index, pgid)

    def _unwatch_process(self) -> None:
        loop = asyncio.get_running_loop()
        if self._pidfd is not None:
            loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        for fd in list(self._pipes):
            self._read_pipe(fd)  # drain: the last lines matter most in a death report
            self._close_pipe(fd)
        self._log_fd = None

    def mark(self, state: str) -> None:
        """Set the supervisor-decided state (SETUP_FAILED, DEFUNCT)."""
        self._state = state

    def send(self, sig: signal.Signals, *, group: bool = False) -> bool:
        """Signal the live child (with ``group``: its whole process group, the model's own
        children included); False when it is gone (never signal a reaped pid)."""
        if not self.alive or self._proc is None:
            return False
        try:
            if group:
                os.killpg(self._proc.pid, sig)  # the runner leads its own group
            else:
                os.kill(self._proc.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def request_stop(self) -> None:
        """Write ``stop`` and say so: the runner finishes or cancels its work and exits 0."""
        if not self.alive:
            return
        self.stop_requested = True
        try:
            protocol.write_atomic(os.path.join(self.working_dir, protocol.STOP_FILE), b"")
        except OSError as e:
            # A full tmpfs must not keep a runner alive: SIGTERM asks for the same clean stop.
            log.warning(
                "runner_stop_file_failed runner=%d pid=%s error=%r action=sigterm",
                self.index,
                self.pid,
                e,
            )
            self.send(signal.SIGTERM)
            return
        self.send(protocol.SIG_RESCAN)

    def close(self) -> None:
        """Release fds and tasks after the process is gone (the pool is shutting down)."""
        for task in list(self._tasks):
            task.cancel()
        if self._proc is not None and self.exit_code is None:
            self._unwatch_process()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

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
        self._emit_lines(fd, buf, final=fd not in self._pipes)

    def _close_pipe(self, fd: int) -> None:
        buf = self._pipes.pop(fd, None)
        if buf is None:
            return
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(fd)
        self._emit_lines(fd, buf, final=True)
        # Close through the file object that owns the fd: a bare os.close would leave it to
        # close the same number again later, by then maybe another pipe's.
        stream = self._streams.pop(fd, None)
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()

    def _emit_lines(self, fd: int, buf: bytearray, *, final: bool) -> None:
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
            if not line:
                continue
            if fd == self._log_fd:
                self._on_runner_log(line)
            else:
                self._on_output_line(line)

    def _on_runner_log(self, line: str) -> None:
        # coglet's own lines: the pool's log, never a prediction's (they name the runner's
        # troubles, e.g. response_write_failed, not the model's output). A death report
        # shows them with the model's last lines.
        self.tail.append(line)
        log.info("runner_log runner=%d pid=%s %s", self.index, self.pid, line)

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
        if self._state in (READY, BUSY) and self.has_healthcheck:
            self._scan_health()
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
            self._events.append(RunnerEvent(EVENT_READY))
            elapsed = time.monotonic() - (self.started_at or time.monotonic())
            log.info("runner_ready runner=%d pid=%s setup_s=%.3f", self.index, self.pid, elapsed)
        else:
            self._state = SETUP_FAILED
            self._events.append(RunnerEvent(EVENT_SETUP_FAILED))
            log.error(
                "runner_setup_failed runner=%d pid=%s error=%s",
                self.index,
                self.pid,
                json.dumps(result.get("error")),
            )

    def _scan_health(self) -> None:
        """Read health.json when it changed (one stat a pass); count failed checks in a row."""
        path = os.path.join(self.working_dir, protocol.HEALTH_FILE)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return  # no check has finished yet
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._health_stamp:
            return
        self._health_stamp = stamp
        data = self._read(protocol.HEALTH_FILE)
        if data is None or not isinstance(data.get("healthy"), bool):
            return  # a bad file is logged by _read; the last good result stands
        previous = self.health
        if previous is not None and previous.get("checked_at") == data.get("checked_at"):
            return  # the same check (a rewrite with equal content)
        self.health = data
        if data["healthy"]:
            self.health_failures = 0
        else:
            self.health_failures += 1
        was_healthy = previous is None or previous.get("healthy") is not False
        if was_healthy != data["healthy"]:
            log.info(
                "runner_health runner=%d pid=%s healthy=%s error=%s",
                self.index,
                self.pid,
                data["healthy"],
                json.dumps(data.get("error")),
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
            delta = self._bad_response(e)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        slot.next_epoch += 1
        problem = protocol.delta_problem(delta)
        if problem is not None or not isinstance(delta, dict):  # garbage fails this one only
            delta = self._bad_response(ValueError(problem))
        terminal = delta.get("status") in protocol.TERMINAL_STATUSES
        if terminal:
            # Released first: a record that ends with this delta sees its runner done with it
            # (a record that ends while its runner still holds it is canceled there).
            self._release(prediction_id)
        if protocol.DELTA_FILE_KEY in delta:
            self._deliver(slot, self._delta_file(delta[protocol.DELTA_FILE_KEY]))
        else:
            self._deliver(slot, delta)
        return terminal

    def _bad_response(self, error: Exception | None) -> dict[str, Any]:
        why = f": {error}" if error is not None else ""
        return {"status": protocol.STATUS_FAILED, "error": f"{self.name} sent a bad response{why}"}

    def _delta_file(self, path: Any) -> dict[str, Any] | DeltaFile:
        """The spilled delta a response points to; only a file in this runner's own temporary
        root is read (and removed) by the pool."""
        if isinstance(path, str) and self.owns(path):
            return DeltaFile(path)
        return self._bad_response(ValueError(f"delta file {path!r} is outside {self.temp_dir}"))

    def owns(self, path: str) -> bool:
        """True for a path inside this runner's private temporary root (made by the pool)."""
        root = os.path.realpath(self.temp_dir)
        real = os.path.realpath(path)
        return real != root and os.path.commonpath([root, real]) == root

    def take_events(self) -> list[RunnerEvent]:
        """What happened on the channel since the last call, in order (the supervisor acts)."""
        events, self._events = self._events, []
        return events

    def _note_terminal(self, prediction: Prediction, delta: dict[str, Any]) -> None:
        if delta.get("status") not in protocol.TERMINAL_STATUSES:
            return
        error_type = delta.get(protocol.ERROR_TYPE_KEY)
        self._events.append(
            RunnerEvent(
                EVENT_FINISHED,
                prediction.id,
                error_type=error_type if isinstance(error_type, str) else None,
            )
        )

    def _deliver(self, slot: Slot, item: dict[str, Any] | DeltaFile) -> None:
        # A spilled delta is read in a worker thread, off the loop; the deltas after it wait
        # behind it (slot.pending), so epoch order holds.
        if isinstance(item, DeltaFile) or slot.loader is not None:
            slot.pending.append(item)
            if slot.loader is None:
                slot.loader = asyncio.get_running_loop().create_task(self._load_pending(slot))
                self._tasks.add(slot.loader)
            return
        self._apply(slot, item)

    async def _load_pending(self, slot: Slot) -> None:
        try:
            while slot.pending:
                item = slot.pending.pop(0)
                if isinstance(item, RunnerLost):
                    slot.prediction.lose_runner(item.error)
                    continue
                if isinstance(item, DeltaFile):
                    try:
                        item = await asyncio.to_thread(_load_delta_file, item.path)
                    except Exception as e:  # unreadable: the prediction fails, with why
                        log.warning(
                            "response_read_failed prediction=%s error=%s", slot.prediction.id, e
                        )
                        item = self._bad_response(e)
                self._apply(slot, item)
                self._wake()  # a terminal delta read here is news for the supervisor
        finally:
            if slot.loader is not None:
                self._tasks.discard(slot.loader)
            slot.loader = None

    def _apply(self, slot: Slot, delta: dict[str, Any]) -> None:
        """Hand one delta, in epoch order, to its prediction (through the output encoder)."""
        self._note_terminal(slot.prediction, delta)
        if has_path(delta.get("output")) or has_path(delta.get("output_append")):
            self._track_spills(slot.prediction, delta)  # only Path outputs hold runner copies
        # Path outputs are encoded by the record before anyone sees them, in epoch order.
        slot.prediction.deliver(delta)

    def _track_spills(self, prediction: Prediction, delta: dict[str, Any]) -> None:
        """Remove the runner's copies of returned file objects once the prediction is over
        (its outputs encoded): only paths inside this runner's temporary root qualify."""
        spilled = [p for p in _paths_in(delta) if self.owns(p)]
        if not spilled:
            return

        def on_event(_: Prediction, event: str) -> None:
            if event == EVENT_COMPLETED:
                task = asyncio.get_running_loop().create_task(
                    asyncio.to_thread(self._remove_spilled, spilled)
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        prediction.add_listener(on_event)

    def _remove_spilled(self, paths: list[str]) -> None:
        """Remove the runner's copies of returned file objects (``<temp_dir>/cog-output-*/``);
        a file the model returned by path is never in the temporary root, so never removed."""
        root = os.path.realpath(self.temp_dir)
        for path in paths:
            parent = os.path.dirname(os.path.realpath(path))
            if os.path.dirname(parent) == root and os.path.basename(parent).startswith(
                protocol.SPILL_DIR_PREFIX
            ):
                shutil.rmtree(parent, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)

    # --- predictions ---------------------------------------------------------------------------
    def dispatch(self, prediction: Prediction, request: bytes) -> None:
        """Hand one prediction to the runner: its request file, then SIGHUP.

        ``request`` was encoded by the record before any slot was taken; the file is written
        before the slot is, so a failed write leaves nothing held.
        """
        protocol.write_request(self.working_dir, prediction.id, request, spill_dir=self.temp_dir)
        self.slots[prediction.id] = Slot(prediction=prediction, dispatched_at=time.monotonic())
        prediction.mark_started(self.index)
        self.send(protocol.SIG_RESCAN)
        log.debug("prediction_dispatched prediction=%s runner=%d", prediction.id, self.index)

    def cancel(self, prediction_id: str) -> bool:
        """Ask the runner to cancel one prediction: ``cancel-<id>``, then SIGUSR1.

        The slot keeps when (``cancel_sent_at``); asking again changes nothing. Whether the
        runner let go in time is the supervisor's to judge (runners.cancel_grace_s).
        """
        slot = self.slots.get(prediction_id)
        if slot is None:
            return False
        if slot.cancel_sent_at is not None:
            return True
        slot.cancel_sent_at = time.monotonic()
        try:
            protocol.write_atomic(
                os.path.join(self.working_dir, protocol.cancel_name(prediction_id)), b""
            )
        except OSError as e:
            # The runner cannot be told which prediction to stop (a full tmpfs): the cancel
            # grace runs all the same, so the slot is not held for good.
            log.warning(
                "prediction_cancel_write_failed prediction=%s runner=%d error=%r action=%s",
                prediction_id,
                self.index,
                e,
                "kill_after_cancel_grace",
            )
        else:
            self.send(protocol.SIG_CANCEL)
            log.info("prediction_cancel_sent prediction=%s runner=%d", prediction_id, self.index)
        self._wake()  # the supervisor starts counting the grace
        return True

    def kill(self) -> bool:
        """SIGKILL the runner's whole process group (the model's children too); False when it
        is gone. When to is the supervisor's decision."""
        return self.send(signal.SIGKILL, group=True)

    def _release(self, prediction_id: str) -> None:
        slot = self.slots.pop(prediction_id, None)
        if slot is None:
            return
        # The runner deletes the request file it took, and the working directory is emptied
        # before a restart; only a cancel file may be left behind, and only after a cancel.
        if slot.cancel_sent_at is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.working_dir, protocol.cancel_name(prediction_id)))
        self._wake()

    def fail_all(self, error: str) -> list[Prediction]:
        """The process is gone: fail every prediction it held; returns them (slots freed)."""
        failed = []
        for prediction_id in list(self.slots):
            slot = self.slots[prediction_id]
            self._release(prediction_id)
            if slot.loader is not None:
                # A spilled delta is still being read: the loss lands after it, in order.
                slot.pending.append(RunnerLost(error))
            else:
                # Updates still being encoded land first, then this failure, in order.
                slot.prediction.lose_runner(error)
            failed.append(slot.prediction)
        return failed

    def rss_mb(self) -> float | None:
        """The runner process's resident memory in MiB (None when it is gone)."""
        pid = self.pid
        if pid is None:
            return None
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                pages = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)

    def death_report(self) -> str:
        """``runner 2 (gpu 2) died: killed by SIGKILL`` plus the last output lines."""
        text = f"{self.name} died: {describe_exit(self.exit_code or 0)}"
        lines = [line for line in self.tail if line.strip()][-10:]
        if lines:
            text += "\nlast output:\n" + "\n".join(lines)
        return text


def _load_delta_file(path: str) -> dict[str, Any]:
    """Read and remove one spilled delta (runs in a worker thread: it may be large). A raw
    string output stays the slices it was decoded in (:class:`pool.jsonstream.TextSlices`):
    joining them would be one more whole copy, in one C call that holds the GIL."""
    try:
        delta = protocol.read_delta_file(path, text=TextSlices)
    except FileNotFoundError:
        raise ValueError(f"spilled response {path} is missing") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    problem = protocol.delta_problem(delta)
    if problem is not None or not isinstance(delta, dict):
        raise ValueError(f"spilled response {os.path.basename(path)}: {problem}")
    return delta


def _paths_in(value: Any) -> list[str]:
    """Every ``{PATH_MARKER: path}`` path in a delta's output (iterative)."""
    found: list[str] = []
    stack = [value.get("output"), value.get("output_append")]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            marked = item.get(protocol.PATH_MARKER)
            if len(item) == 1 and isinstance(marked, str):
                found.append(marked)
            else:
                stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found
