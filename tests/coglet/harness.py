"""A test-side fake parent for coglet runners: spawns ``python -m coglet`` and speaks the protocol.

The test process itself is the parent: it installs its SIGUSR1/SIGUSR2/SIGHUP handlers
*before* spawning (an unhandled SIGHUP from a runner would kill pytest), writes requests
atomically, signals the runner, and wakes on the runner's signals through a wakeup pipe.
Every wait has a deadline and names what it waited for, with the runner's stderr, when it
times out. Reusable by other test suites::

    with RunnerHarness(model_dir, "predict.py:Predictor") as runner:
        runner.wait_setup()
        runner.submit("p1", {"text": "world"})
        state = runner.wait_done("p1")
        assert state.output == "hello world"
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from coglet import protocol

__all__ = ["PROJECT_ROOT", "ParentSignals", "PredictionState", "RunnerHarness", "wait_until"]

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARENT_SIGNALS = (protocol.SIG_READY, protocol.SIG_BUSY, protocol.SIG_OUTPUT)
# How often a wait re-checks its condition when no signal comes (the protocol's signals are
# hints; this is the test side's safety rescan, not a delay that hides a race).
RECHECK_S = 0.2


def wait_until(
    condition: Callable[[], bool], *, timeout_s: float, what: str, step_s: float = 0.02
) -> None:
    """Wait for ``condition()`` with a deadline (for conditions no signal announces)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(step_s)


class ParentSignals:
    """The parent's handlers: count each signal and wake ``wait()`` through a wakeup pipe.

    One per process (handlers are process-wide); installs are reference-counted so several
    harnesses may be open at once.
    """

    _instance: Optional[ParentSignals] = None

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._users = 0
        self._saved: Dict[int, Any] = {}
        self._saved_wakeup = -1

    @classmethod
    def shared(cls) -> ParentSignals:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def acquire(self) -> None:
        if self._users == 0:
            for sig in PARENT_SIGNALS:
                self._saved[sig] = signal.signal(sig, self._record)
            self._saved_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._users += 1

    def release(self) -> None:
        self._users -= 1
        if self._users > 0:
            return
        signal.set_wakeup_fd(self._saved_wakeup)
        # Exactly what was there: every runner is reaped by now, so none can still signal, and
        # an SIG_IGN left behind would be inherited by every process the tests spawn later.
        for sig, old in self._saved.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)

    def _record(self, signum: int, frame: Any) -> None:
        self.counts[signum] += 1

    def wait(self, timeout_s: float) -> None:
        """Return when a signal arrives or after ``timeout_s``."""
        if timeout_s > 0:
            select.select([self._read_fd], [], [], timeout_s)
        try:
            while os.read(self._read_fd, 512):
                pass
        except BlockingIOError:
            pass


@dataclass
class PredictionState:
    """One prediction as the parent sees it: the deltas applied in epoch order."""

    id: str
    status: Optional[str] = None
    output: Any = None
    logs: str = ""
    error: Optional[str] = None
    metrics: Dict[str, Any] = field(default_factory=dict)
    deltas: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.status in protocol.TERMINAL_STATUSES

    def apply(self, delta: Dict[str, Any]) -> None:
        self.deltas.append(delta)
        self.status = delta["status"]
        if "output_append" in delta:
            if not isinstance(self.output, list):
                self.output = []
            self.output.extend(delta["output_append"])
        if "output" in delta:
            self.output = delta["output"]
        self.logs += delta.get("logs_append", "")
        self.metrics.update(delta.get("metrics", {}))
        if "error" in delta:
            self.error = delta["error"]


class _PipeReader(threading.Thread):
    """Drains one of the runner's pipes so it never fills; keeps everything read."""

    def __init__(self, pipe: Any) -> None:
        super().__init__(daemon=True)
        self._pipe = pipe
        self._chunks: List[bytes] = []
        self._lock = threading.Lock()

    def run(self) -> None:
        for chunk in iter(lambda: self._pipe.read1(65536), b""):
            with self._lock:
                self._chunks.append(chunk)

    def text(self) -> str:
        with self._lock:
            return b"".join(self._chunks).decode("utf-8", "replace")


class RunnerHarness:
    """Spawns one runner in a fresh working directory and plays the pool's side."""

    def __init__(
        self,
        model_dir: str,
        predictor_ref: str,
        *,
        max_concurrency: int = 1,
        runner_index: int = 0,
        python: str = sys.executable,
        command: Optional[Sequence[str]] = None,
        env: Optional[Dict[str, str]] = None,
        config: Optional[Dict[str, Any]] = None,
        working_dir: Optional[str] = None,
        write_config: bool = True,
    ) -> None:
        self.model_dir = model_dir
        self._own_dir = working_dir is None
        # /dev/shm when present: the design's place for protocol directories.
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.working_dir = working_dir or tempfile.mkdtemp(prefix="coglet-test-", dir=base)
        if config is None:
            config = {
                "predictor_ref": predictor_ref,
                "max_concurrency": max_concurrency,
                "runner_index": runner_index,
            }
        self.config = config
        self._write_config = write_config
        self.command = list(command or [python, "-m", "coglet"])
        self.env = dict(os.environ if env is None else env)
        if env is None:
            self.env["PYTHONPATH"] = PROJECT_ROOT
        self.signals = ParentSignals.shared()
        self.proc: Optional[subprocess.Popen] = None
        self.predictions: Dict[str, PredictionState] = {}
        self._next_epoch: Dict[str, int] = {}
        self._readers: List[_PipeReader] = []
        self._acquired = False

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> RunnerHarness:
        """Write config.json (if any), install the parent's handlers, then spawn."""
        if self._write_config:
            protocol.write_json_atomic(
                os.path.join(self.working_dir, protocol.CONFIG_FILE), self.config
            )
        self.signals.acquire()  # before the child exists: it may signal at once
        self._acquired = True
        self.proc = subprocess.Popen(
            [*self.command, "--working-dir", self.working_dir],
            cwd=self.model_dir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for pipe in (self.proc.stdout, self.proc.stderr):
            reader = _PipeReader(pipe)
            reader.start()
            self._readers.append(reader)
        return self

    def __enter__(self) -> RunnerHarness:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Kill the runner if it still runs, reap it, restore the handlers, remove the dir."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=30)
            for reader in self._readers:
                reader.join(timeout=10)
        if self._acquired:
            self._acquired = False
            self.signals.release()
        if self._own_dir:
            for name in os.listdir(self.working_dir):
                os.unlink(os.path.join(self.working_dir, name))
            os.rmdir(self.working_dir)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def stdout(self) -> str:
        return self._readers[0].text() if self._readers else ""

    @property
    def stderr(self) -> str:
        return self._readers[1].text() if self._readers else ""

    def path(self, name: str) -> str:
        return os.path.join(self.working_dir, name)

    def send(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    # --- waiting ------------------------------------------------------------------------------
    def wait_for(self, condition: Callable[[], bool], *, timeout_s: float, what: str) -> None:
        """Pump responses until ``condition()``; TimeoutError (with stderr) at the deadline.

        Also fails at once when the runner exits while the condition still does not hold.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            self.pump()
            if condition():
                return
            if self.proc is not None and self.proc.poll() is not None:
                self.pump()
                if condition():
                    return
                raise AssertionError(
                    f"runner exited ({self.proc.returncode}) while waiting for {what}; "
                    f"stderr:\n{self.stderr}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"timed out after {timeout_s}s waiting for {what}; stderr:\n{self.stderr}"
                )
            self.signals.wait(min(RECHECK_S, remaining))

    def wait_exit(self, timeout_s: float = 30) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"runner still running after {timeout_s}s; stderr:\n{self.stderr}"
            ) from None
        for reader in self._readers:  # the pipes reach EOF now: read them to the end
            reader.join(timeout=timeout_s)
        return code

    def wait_stderr(self, text: str, timeout_s: float = 30) -> None:
        """Wait until the runner's stderr (its lifecycle lines) contains ``text``."""
        self.wait_for(lambda: text in self.stderr, timeout_s=timeout_s, what=f"stderr {text!r}")

    def wait_setup(self, timeout_s: float = 60) -> Dict[str, Any]:
        """The setup result, once the runner wrote it (AssertionError if it exits first)."""
        path = self.path(protocol.SETUP_RESULT_FILE)
        self.wait_for(lambda: os.path.exists(path), timeout_s=timeout_s, what="setup_result.json")
        result = protocol.read_json(path)
        assert isinstance(result, dict)
        return result

    def wait_ready(self, timeout_s: float = 60) -> Dict[str, Any]:
        """The setup result, which must say succeeded."""
        result = self.wait_setup(timeout_s)
        assert result["status"] == protocol.STATUS_SUCCEEDED, (result, self.stderr)
        return result

    # --- predictions -------------------------------------------------------------------------
    def submit(
        self,
        prediction_id: str,
        input: Dict[str, Any],
        *,
        context: Optional[Dict[str, str]] = None,
        body: Optional[Dict[str, Any]] = None,
        signal_runner: bool = True,
    ) -> PredictionState:
        """Write ``request-<id>.json`` atomically, then SIG_RESCAN (like the pool)."""
        if body is None:
            body = {"id": prediction_id, "input": input, "stream": False}
            if context is not None:
                body["context"] = context
        state = self.predictions[prediction_id] = PredictionState(prediction_id)
        self._next_epoch[prediction_id] = 0
        protocol.write_json_atomic(self.path(protocol.request_name(prediction_id)), body)
        if signal_runner:
            self.send(protocol.SIG_RESCAN)
        return state

    def cancel(self, prediction_id: str, *, sig: Optional[int] = protocol.SIG_CANCEL) -> None:
        """Write ``cancel-<id>``, then signal (SIG_CANCEL like the pool, unless told otherwise)."""
        protocol.write_atomic(self.path(protocol.cancel_name(prediction_id)), b"")
        if sig is not None:
            self.send(sig)

    def stop(self, *, timeout_s: float = 30) -> int:
        """Write ``stop``, SIG_RESCAN, and wait for the exit code."""
        protocol.write_atomic(self.path(protocol.STOP_FILE), b"")
        self.send(protocol.SIG_RESCAN)
        code = self.wait_exit(timeout_s)
        self.pump()
        return code

    def pump(self) -> None:
        """Apply every response file present, per prediction in epoch order; delete them."""
        for prediction_id, state in self.predictions.items():
            epoch = self._next_epoch[prediction_id]
            while True:
                path = self.path(protocol.response_name(prediction_id, epoch))
                delta = protocol.read_json(path)
                if delta is None:
                    break
                os.unlink(path)
                if protocol.DELTA_FILE_KEY in delta:  # a large delta, spilled to temp_dir
                    spilled = delta[protocol.DELTA_FILE_KEY]
                    delta = protocol.read_delta_file(spilled)
                    os.unlink(spilled)
                state.apply(delta)
                epoch += 1
            self._next_epoch[prediction_id] = epoch

    def wait_done(self, prediction_id: str, timeout_s: float = 30) -> PredictionState:
        state = self.predictions[prediction_id]
        self.wait_for(lambda: state.done, timeout_s=timeout_s, what=f"{prediction_id} to finish")
        return state

    def wait_status(
        self, prediction_id: str, status: str, timeout_s: float = 30
    ) -> PredictionState:
        state = self.predictions[prediction_id]
        self.wait_for(
            lambda: state.status == status,
            timeout_s=timeout_s,
            what=f"{prediction_id} to reach {status}",
        )
        return state

    def stray_files(self) -> List[str]:
        """Files in the working dir other than config/openapi/setup_result/health."""
        known = {
            protocol.CONFIG_FILE,
            protocol.OPENAPI_FILE,
            protocol.SETUP_RESULT_FILE,
            protocol.HEALTH_FILE,
        }
        return sorted(n for n in os.listdir(self.working_dir) if n not in known)
