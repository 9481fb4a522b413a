"""Runner supervision: spawn, reap, scan, reload, scale, restart, stop.

One loop task owns every runner handle. It wakes on a runner signal (SIGUSR1/SIGUSR2/SIGHUP),
on a child exit (its pidfd turns readable), on a freed slot, on an operator's request
(SIGTTIN/SIGTTOU, a reload request file plus SIGHUP), or after the safety rescan
(``SAFETY_RESCAN_S``); each wake runs the same short list of verbs: reap, scan, take requests,
recycle, reload, scale, restart, check setup timeouts, check cancel graces, then the
``on_tick`` callback (the router dispatches there).

Runners at run time: a reload replaces the runners one at a time (a fresh runner reaches READY
before an old one drains and stops); scaling adds a runner on the least-loaded GPU or drains
one away. A runner that is drained away for good is *retired*: once its process has exited
its handle leaves ``runners`` (the router's list too: the same list object). Runner indices
are never reused, so a fresh runner has a fresh working dir and its own metrics series.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from coglet import protocol
from pool.aio import TIMER_SLACK_S
from pool.config import PoolConfig
from pool.prediction import utc_now
from pool.runner import (
    BUSY,
    DEFUNCT,
    EVENT_FINISHED,
    READY,
    SETUP_FAILED,
    STARTING,
    RunnerHandle,
    describe_exit,
)

__all__ = [
    "RELOAD_REQUEST_FILE",
    "RELOAD_SIGNAL",
    "SCALE_DOWN_SIGNAL",
    "SCALE_UP_SIGNAL",
    "RunnerMetrics",
    "Supervisor",
    "runner_gpus",
]

log = logging.getLogger("pool.supervisor")

# Runner -> pool hints. Each only means "something changed somewhere: rescan".
WAKE_SIGNALS = (protocol.SIG_READY, protocol.SIG_BUSY, protocol.SIG_OUTPUT)


class RunnerMetrics(Protocol):
    def runner_restarted(self, runner_index: int) -> None: ...

    def runner_recycled(self, runner_index: int, reason: str) -> None: ...

    def runner_removed(self, runner_index: int) -> None: ...

    def reload_ended(self, result: str) -> None: ...


# Operator -> pool (gunicorn's convention). SIGHUP is also the runners' "rescan" hint in the
# file+signal protocol and carries no sender, so a bare SIGHUP cannot mean "reload": a reload
# is asked by the RELOAD_REQUEST_FILE in the state dir, then SIGHUP (`cog-pool reload`).
RELOAD_SIGNAL = signal.SIGHUP
SCALE_UP_SIGNAL = signal.SIGTTIN
SCALE_DOWN_SIGNAL = signal.SIGTTOU
RELOAD_REQUEST_FILE = "reload-request"  # in the state dir; never a prediction id or runner dir
REQUEST_CHECK_INTERVAL_S = 0.1

# Why a runner is drained away for good (logged as runner_retire reason=...).
RETIRE_RELOAD = "reload"
RETIRE_SCALE_DOWN = "scale_down"
RETIRE_RELOAD_ABORTED = "reload_aborted"

# A reload's states, as /health-check shows them.
RELOAD_IDLE = "idle"
RELOAD_RUNNING = "running"
RELOAD_SUCCEEDED = "succeeded"
RELOAD_FAILED = "failed"

# A recycle's reasons, as logged and counted.
RECYCLE_MAX_PREDICTIONS = "max_predictions"
RECYCLE_MAX_RSS = "max_rss_mb"
RECYCLE_MEMORY_ERROR = "memory_error"
RECYCLE_HEALTHCHECK = "healthcheck"


def runner_gpus(config: PoolConfig) -> list[str | None]:
    """The GPU of each runner, by index: ``per_gpu`` runners per listed GPU, else ``count``
    CPU-only runners (None)."""
    gpus = config.runners.gpus
    if not gpus:
        return [None] * config.runners.count
    return [gpu for gpu in gpus for _ in range(config.runners.per_gpu)]


# --- signal fan-out ------------------------------------------------------------------------------
# loop.add_signal_handler keeps one handler per signal and loop, while a process may hold
# several pools (tests, an embedding app): one handler per loop wakes all of them.
_wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[Callable[[], None]]] = (
    weakref.WeakKeyDictionary()
)


def _fan_out(wakers: set[Callable[[], None]]) -> None:
    for wake in list(wakers):
        wake()


def _add_waker(wake: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    wakers = _wakers.get(loop)
    if wakers is None:
        wakers = _wakers[loop] = set()
        for sig in WAKE_SIGNALS:
            loop.add_signal_handler(sig, _fan_out, wakers)
    wakers.add(wake)


def _remove_waker(wake: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    wakers = _wakers.get(loop)
    if wakers is None:
        return
    wakers.discard(wake)
    if not wakers:
        for sig in WAKE_SIGNALS:
            loop.remove_signal_handler(sig)
        del _wakers[loop]


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


# Operator signals fan out the same way (one handler per signal and loop, every pool acts).
_handlers: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[signal.Signals, set[Callable[[], None]]]
] = weakref.WeakKeyDictionary()


def _add_handler(sig: signal.Signals, fn: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    by_signal = _handlers.setdefault(loop, {})
    fns = by_signal.get(sig)
    if fns is None:
        fns = by_signal[sig] = set()
        loop.add_signal_handler(sig, _fan_out, fns)
    fns.add(fn)


def _remove_handler(sig: signal.Signals, fn: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    fns = _handlers.get(loop, {}).get(sig)
    if fns is None:
        return
    fns.discard(fn)
    if not fns:
        # SIGTTIN/SIGTTOU's default action stops the process: ignore them, do not restore it.
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
        del _handlers[loop][sig]


@dataclass
class _Reload:
    """One reload's progress: ``old`` runners still to replace, each by a fresh runner
    (``new``) that must be READY before the old one (``retiring``) drains."""

    state: str = RELOAD_IDLE
    error: str | None = None
    total: int = 0
    replaced: int = 0
    old: list[int] = field(default_factory=list)
    new: int | None = None
    retiring: int | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    config: PoolConfig | None = None  # for the fresh runners: cog.yaml as read at the start


@dataclass
class _Restarts:
    """One runner's restart bookkeeping."""

    deaths: collections.deque[float] = field(default_factory=collections.deque)
    due_at: float | None = None  # monotonic time of the scheduled restart
    given_up: bool = False
    # The current process's finished predictions (EVENT_FINISHED), for recycling.
    completed: int = 0
    memory_errors: int = 0  # ... of which failed with MemoryError
    checked: int = -1  # `completed` when the recycle limits were last checked
    cancel_killed_pid: int | None = None  # the process killed past its cancel grace


class Supervisor:
    """Owns the runner handles and the loop that keeps them alive."""

    def __init__(
        self,
        config: PoolConfig,
        state_dir: str,
        *,
        on_tick: Callable[[], None],
        metrics: RunnerMetrics | None = None,
        temp_root: str | None = None,
        config_loader: Callable[[], PoolConfig] | None = None,
    ) -> None:
        self.config = config
        # Loads the configuration again (cog.yaml included) when a reload begins; without it
        # fresh runners get the configuration the pool started with.
        self._config_loader = config_loader
        self._runner_config = config  # what fresh runners (reload, scale-up) are made from
        self.state_dir = state_dir
        self.stopping = False
        self._closing = False
        self._on_tick = on_tick
        self._metrics = metrics
        self._event = asyncio.Event()
        self._exited = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._failed_ticks = 0
        # Set when the supervisor's own pass keeps failing: the pool should exit non-zero.
        self.failed = asyncio.Event()
        # time.monotonic() of the loop's last pass; /health/live reads it (None: not started).
        self.last_tick_at: float | None = None
        self._temp_root = temp_root
        self.runners = [
            RunnerHandle(i, gpu, config, state_dir, wake=self.wake, temp_root=temp_root)
            for i, gpu in enumerate(runner_gpus(config))
        ]
        self._restarts = {r.index: _Restarts() for r in self.runners}
        self._next_index = len(self.runners)
        configured = len(self.runners)
        self.max_runners = config.runners.max_runners or 2 * configured
        self._retiring: set[int] = set()  # indices drained away for good: removed on exit
        self._reload = _Reload()
        self._reloads_begun = 0
        self._reload_requested = False
        self._scale_pending = 0  # runners to add (> 0) or remove (< 0), as asked
        self._requests_checked_at = float("-inf")  # monotonic, of the last request file check
        self._cancel_wake_at: float | None = None  # monotonic: a wake is armed for then

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Install the wake handlers, then spawn every runner (they set up in parallel)."""
        # Before any spawn: an unhandled SIGHUP/SIGUSR1 from a runner would kill the pool.
        _add_waker(self.handle_signal)
        _add_handler(SCALE_UP_SIGNAL, self.handle_ttin)
        _add_handler(SCALE_DOWN_SIGNAL, self.handle_ttou)
        for runner in self.runners:
            runner.spawn()
        self.last_tick_at = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pool-supervisor")

    def wake(self) -> None:
        """Something changed (a child exit, a freed slot, a cancel): run one tick soon."""
        self._event.set()

    def handle_signal(self) -> None:
        """A runner signalled (SIGHUP output, SIGUSR1 ready, SIGUSR2 busy): rescan now.

        This runs as a loop callback, not in signal context, so it may do the work itself:
        one loop iteration less on every prediction's path than waking the supervisor task.
        """
        if self._closing:
            return
        self._tick_and_settle()

    def handle_ttin(self) -> None:
        """SIGTTIN: add one runner (on the least-loaded GPU), up to runners.max_runners."""
        self.request_scale(1)

    def handle_ttou(self) -> None:
        """SIGTTOU: drain one runner away, never the last one."""
        self.request_scale(-1)

    def request_scale(self, delta: int) -> None:
        """Record a scaling request (signal handlers call this); the loop acts on it."""
        # Bounded: no more can be added or removed than max_runners, however many signals.
        most = self.max_runners
        self._scale_pending = max(-most, min(most, self._scale_pending + delta))
        self.wake()

    def request_reload(self) -> None:
        """Record a reload request; the loop replaces the runners one at a time."""
        self._reload_requested = True
        self.wake()

    async def _run(self) -> None:
        # The safety rescan is a timer that sets the same event as a wake does: cheaper on
        # the hot path than wait_for(), which wraps every wait in a new task. The loop ends
        # on a flag as well as on cancel, so a stop can never be missed.
        loop = asyncio.get_running_loop()
        # At least once per healthcheck interval too: each check of a failing runner counts.
        rescan_s = min(protocol.SAFETY_RESCAN_S, self.config.runners.healthcheck_interval_s)
        while not self._closing:
            safety = loop.call_later(rescan_s, self._event.set)
            try:
                await self._event.wait()
            finally:
                safety.cancel()
            self._tick_and_settle()
            # Here, not in tick(): runner signals tick too, and would keep a dead loop "live".
            self.last_tick_at = time.monotonic()

    def _tick_and_settle(self) -> None:
        try:
            self.tick()
        except Exception:  # the supervisor must outlive one bad tick, not a wedged loop
            self._failed_ticks += 1
            log.exception("supervisor_tick_failed consecutive=%d", self._failed_ticks)
            limit = self.config.runners.max_failed_ticks
            if self._failed_ticks >= limit and not self.failed.is_set():
                log.error("supervisor_failed consecutive_failed_ticks=%d action=exit", limit)
                self.failed.set()
        else:
            self._failed_ticks = 0
        # Cleared after the tick: a tick never awaits, so no other callback ran inside it,
        # and a wake() seen now came from the tick itself (a freed slot) or from before it;
        # this tick served both. Clearing before would cost an empty scan per prediction.
        self._event.clear()

    def tick(self) -> None:
        """One pass: reap, scan, take requests, recycle, reload, scale, restart, time out
        setups, enforce cancel graces, then let the router dispatch."""
        self.reap()
        self.scan()
        self.take_requests()
        self.recycle()
        self.reload()
        self.scale()
        self.restart_due()
        self.check_setup_timeouts()
        self.check_cancel_graces()
        self._on_tick()

    # --- verbs ---------------------------------------------------------------------------------
    def reap(self) -> None:
        """Collect exited children and decide their fate."""
        for runner in list(self.runners):  # a retired runner leaves the list here
            code = runner.reap()
            if code is not None:
                self.handle_exit(runner, code)

    def scan(self) -> None:
        """Read every live runner's directory (signals carry no sender), then act on what each
        reported."""
        for runner in self.runners:
            if runner.alive:
                try:
                    runner.scan()
                except Exception:  # one runner's bad state must not stall the others
                    log.exception("runner_scan_failed runner=%d", runner.index)
            self.consume(runner)

    def consume(self, runner: RunnerHandle) -> None:
        """Act on a runner's events: finished predictions count toward its recycle."""
        book = self._restarts[runner.index]
        for event in runner.take_events():
            if event.kind == EVENT_FINISHED:
                book.completed += 1
                if event.error_type == "MemoryError":
                    book.memory_errors += 1

    def handle_exit(self, runner: RunnerHandle, code: int) -> None:
        """A runner process ended: fail its work, then restart it, or not."""
        self._exited.set()
        runner.scan()  # responses written just before the exit still count
        self.consume(runner)
        if runner.draining is not None and code != protocol.EXIT_OK:
            runner.draining = None  # it died while draining: a death like any other
        was = runner.state
        failed = runner.fail_all(runner.death_report())
        log_fn = log.info if self.stopping or code == protocol.EXIT_OK else log.warning
        log_fn(
            "runner_exited runner=%d exit=%s state=%s failed_predictions=%d",
            runner.index,
            describe_exit(code).replace(" ", "_"),
            was,
            len(failed),
        )
        if runner.index in self._retiring:
            self._remove(runner)
        elif self.stopping:
            runner.mark(DEFUNCT)
        elif runner.draining is not None and code == protocol.EXIT_OK:
            # A recycle, not a death: back at once, no backoff, no count against max_restarts.
            runner.mark(DEFUNCT)
            self._restarts[runner.index].due_at = time.monotonic()
            self.wake()
        elif was == SETUP_FAILED or code == protocol.EXIT_SETUP_FAILED or runner.setup_timed_out:
            self._mark_setup_failed(runner, code)
        elif code == protocol.EXIT_BAD_CONFIG:
            runner.mark(DEFUNCT)
            self._restarts[runner.index].given_up = True  # a pool bug: restarting cannot help
            log.error("runner_defunct runner=%d reason=bad_config", runner.index)
        else:
            runner.mark(DEFUNCT)
            self._schedule_restart(runner)

    def _mark_setup_failed(self, runner: RunnerHandle, code: int) -> None:
        runner.mark(SETUP_FAILED)
        if runner.setup_result is None or runner.setup_timed_out:
            # No setup_result.json: the runner died (or was killed) before it could write one.
            if runner.setup_timed_out:
                error = f"setup timed out after {self.config.runners.setup_timeout_s}s"
            else:
                error = f"runner exited during setup: {describe_exit(code)}"
            runner.setup_result = {
                "status": protocol.STATUS_FAILED,
                "started_at": None,
                "completed_at": None,
                "logs": "\n".join(runner.tail) + ("\n" if runner.tail else ""),
                "error": error,
            }
        log.error("runner_setup_failed_final runner=%d restart=no", runner.index)

    def _schedule_restart(self, runner: RunnerHandle) -> None:
        rc = self.config.runners
        book = self._restarts[runner.index]
        now = time.monotonic()
        book.deaths.append(now)
        while book.deaths and now - book.deaths[0] > rc.restart_window_s:
            book.deaths.popleft()
        if len(book.deaths) > rc.max_restarts:
            book.given_up = True
            log.error(
                "runner_defunct runner=%d deaths=%d window_s=%s",
                runner.index,
                len(book.deaths),
                rc.restart_window_s,
            )
            return
        # Capped exponential backoff with jitter, so runners that die together do not
        # come back together.
        base = min(rc.backoff_max_s, rc.backoff_initial_s * 2 ** (len(book.deaths) - 1))
        delay = random.uniform(base / 2, base)
        book.due_at = now + delay
        # restart_due() compares due_at with time.monotonic(): the timer must not fire before.
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(delay + TIMER_SLACK_S, self.wake))
        log.info("runner_restart_scheduled runner=%d delay_s=%.3f", runner.index, delay)

    def recycle(self) -> None:
        """Drain runners past a recycle limit; stop drained ones (they come back fresh)."""
        for runner in self.runners:
            if not runner.alive or runner.state not in (READY, BUSY):
                continue
            if runner.draining is None:
                reason = self._recycle_reason(runner)
                if reason is None:
                    continue
                runner.draining = reason
                runner.recycles += 1
                if self._metrics is not None:
                    self._metrics.runner_recycled(runner.index, reason)
                log.info(
                    "runner_recycle runner=%d pid=%s reason=%s predictions=%d in_flight=%d",
                    runner.index,
                    runner.pid,
                    reason,
                    self._restarts[runner.index].completed,
                    len(runner.slots),
                )
            if not runner.slots and not runner.stop_requested:
                runner.request_stop()

    def _recycle_reason(self, runner: RunnerHandle) -> str | None:
        if runner.health_failures >= self.config.runners.healthcheck_max_failures:
            return RECYCLE_HEALTHCHECK
        book = self._restarts[runner.index]
        if book.checked == book.completed:
            return None  # nothing finished since the last look
        book.checked = book.completed
        rc = self.config.runners
        if book.memory_errors:
            return RECYCLE_MEMORY_ERROR
        if rc.max_predictions is not None and book.completed >= rc.max_predictions:
            return RECYCLE_MAX_PREDICTIONS
        if rc.max_rss_mb is not None:
            rss_mb = runner.rss_mb()
            if rss_mb is not None and rss_mb > rc.max_rss_mb:
                return RECYCLE_MAX_RSS
        return None

    def take_requests(self) -> None:
        """A reload request file in the state dir (``cog-pool reload``) asks for a reload."""
        # One failed unlink costs ~3 us, and a busy pool ticks several times per prediction:
        # looked for at most every REQUEST_CHECK_INTERVAL_S (the safety rescan bounds the rest).
        now = time.monotonic()
        if now - self._requests_checked_at < REQUEST_CHECK_INTERVAL_S:
            return
        self._requests_checked_at = now
        try:
            os.unlink(os.path.join(self.state_dir, RELOAD_REQUEST_FILE))
        except FileNotFoundError:
            return
        except OSError as e:  # unreadable state dir: say so, keep serving
            log.error("reload_request_unreadable error=%r", e)
            return
        log.info("reload_requested source=file")
        self._reload_requested = True

    def reload(self) -> None:
        """Advance a reload by one step: a fresh runner starts; once it is READY one old
        runner drains and stops; once that one is gone, the next fresh runner starts."""
        if self._reload_requested and self._reload.state != RELOAD_RUNNING and not self.stopping:
            self._reload_requested = False
            self._begin_reload()
        r = self._reload
        if r.state != RELOAD_RUNNING or self.stopping:
            return
        if r.retiring is not None:
            if self._by_index(r.retiring) is not None:
                return  # capacity may drop by one runner only: the next waits for its exit
            r.retiring = None
        if r.new is not None:
            self._reload_check_new(r)
            return
        while r.old and self._by_index(r.old[0]) is None:
            r.old.pop(0)  # gone meanwhile (it cannot be: scaling waits; kept safe)
        if not r.old:
            if r.config is not None:
                self._runner_config = r.config  # later scale-ups start what the reload did
            r.state = RELOAD_SUCCEEDED
            r.completed_at = utc_now()
            log.info("reload_succeeded replaced=%d", r.replaced)
            if self._metrics is not None:
                self._metrics.reload_ended(RELOAD_SUCCEEDED)
            return
        old = self._by_index(r.old[0])
        assert old is not None
        new = self._add_runner(old.gpu, r.config)  # the same GPU: placement is kept
        r.new = new.index
        log.info("reload_step runner=%d replaces=%d gpu=%s", new.index, old.index, old.gpu)

    def _begin_reload(self) -> None:
        old = [r.index for r in self.runners if r.index not in self._retiring]
        self._reloads_begun += 1
        self._reload = _Reload(state=RELOAD_RUNNING, total=len(old), old=old, started_at=utc_now())
        log.info("reload_begin runners=%s", ",".join(str(i) for i in old))
        try:
            self._reload.config = self._reloaded_config()
        except Exception as e:  # a bad cog.yaml or pool YAML: no runner is touched
            self._end_reload_failed(self._reload, f"configuration: {e}")

    def _reloaded_config(self) -> PoolConfig:
        """The configuration for fresh runners: what cog.yaml says now (``predict``/``run``,
        ``train``, ``concurrency.max``, ``environment``); everything else stays as started."""
        if self._config_loader is None:
            return self._runner_config
        new = self._config_loader()
        old = self._runner_config
        model = dataclasses.replace(old.model, predict=new.model.predict, train=new.model.train)
        runners = dataclasses.replace(
            old.runners, max_concurrency=new.runners.max_concurrency, env=new.runners.env
        )
        return dataclasses.replace(old, model=model, runners=runners)

    def _end_reload_failed(self, r: _Reload, error: str) -> None:
        r.state = RELOAD_FAILED
        r.error = f"reload aborted after {r.replaced} of {r.total} runners: {error}"
        r.new = None
        r.old = []
        r.completed_at = utc_now()
        log.error(
            "reload_failed replaced=%d total=%d error=%s", r.replaced, r.total, json.dumps(error)
        )
        if self._metrics is not None:
            self._metrics.reload_ended(RELOAD_FAILED)

    def _reload_check_new(self, r: _Reload) -> None:
        new = self._by_index(r.new) if r.new is not None else None
        if new is not None and new.accepting:
            old = self._by_index(r.old.pop(0))
            r.new = None
            r.replaced += 1
            if old is not None:
                self._retire(old, RETIRE_RELOAD)
                r.retiring = old.index if self._by_index(old.index) is not None else None
            return
        book = self._restarts.get(r.new) if r.new is not None else None
        failed = new is None or new.state == SETUP_FAILED or (book is not None and book.given_up)
        if not failed:
            return  # still setting up (runners.setup_timeout_s bounds it when set)
        error = "the fresh runner is gone"
        if new is not None:
            result = new.setup_result or {}
            error = str(result.get("error") or f"{new.name} could not start")
            self._retire(new, RETIRE_RELOAD_ABORTED)
        self._end_reload_failed(r, error)

    def scale(self) -> None:
        """Add or drain away runners as SIGTTIN/SIGTTOU asked (after a running reload)."""
        if self._scale_pending == 0 or self.stopping or self._reload.state == RELOAD_RUNNING:
            return
        serving = [r for r in self.runners if r.index not in self._retiring]
        while self._scale_pending > 0:
            self._scale_pending -= 1
            if len(serving) >= self.max_runners:
                log.warning(
                    "scale_refused direction=up runners=%d max_runners=%d",
                    len(serving),
                    self.max_runners,
                )
                continue
            new = self._add_runner(self._least_loaded_gpu(serving))
            serving.append(new)
            log.info("scale_up runner=%d gpu=%s runners=%d", new.index, new.gpu, len(serving))
        while self._scale_pending < 0:
            self._scale_pending += 1
            if len(serving) <= 1:
                log.warning("scale_refused direction=down runners=%d min_runners=1", len(serving))
                continue
            victim = self._scale_down_choice(serving)
            serving.remove(victim)
            self._retire(victim, RETIRE_SCALE_DOWN)
            log.info(
                "scale_down runner=%d gpu=%s runners=%d", victim.index, victim.gpu, len(serving)
            )

    def _least_loaded_gpu(self, serving: list[RunnerHandle]) -> str | None:
        """The placement rule: the configured GPU with the fewest runners (the first listed
        on a tie); None for CPU-only pools."""
        gpus = self.config.runners.gpus
        if not gpus:
            return None
        load = collections.Counter(r.gpu for r in serving)
        return min(gpus, key=lambda gpu: (load[gpu], gpus.index(gpu)))

    def _scale_down_choice(self, serving: list[RunnerHandle]) -> RunnerHandle:
        """From the most loaded GPU: a runner that serves nothing yet, else the least busy,
        else the newest."""
        load = collections.Counter(r.gpu for r in serving)
        return min(serving, key=lambda r: (-load[r.gpu], r.accepting, len(r.slots), -r.index))

    def _add_runner(self, gpu: str | None, config: PoolConfig | None = None) -> RunnerHandle:
        """A fresh runner (a new index, working dir and process), spawned now."""
        runner = RunnerHandle(
            self._next_index,
            gpu,
            config or self._runner_config,
            self.state_dir,
            wake=self.wake,
            temp_root=self._temp_root,
        )
        self._next_index += 1
        self.runners.append(runner)
        self._restarts[runner.index] = _Restarts()
        try:
            runner.spawn()
        except OSError as e:
            log.error("runner_spawn_failed runner=%d error=%s", runner.index, e)
            self._schedule_restart(runner)
        return runner

    def _retire(self, runner: RunnerHandle, reason: str) -> None:
        """Drain ``runner`` away for good: no new work; stopped once its slots are empty (see
        recycle()); removed once its process is gone."""
        self._retiring.add(runner.index)
        self._restarts[runner.index].due_at = None  # a pending restart is off
        log.info(
            "runner_retire runner=%d pid=%s reason=%s in_flight=%d",
            runner.index,
            runner.pid,
            reason,
            len(runner.slots),
        )
        if not runner.alive:
            self._remove(runner)
        elif runner.state in (READY, BUSY):
            runner.draining = reason
        else:
            # Still setting up (or failed): it may not handle SIGHUP yet, so no stop file.
            runner.send(signal.SIGTERM, group=True)

    def _remove(self, runner: RunnerHandle) -> None:
        """A retired runner's process is gone: its handle, books and dirs go too."""
        self._retiring.discard(runner.index)
        self._restarts.pop(runner.index, None)
        if runner in self.runners:
            self.runners.remove(runner)  # in place: the router holds this list
        runner.close()
        shutil.rmtree(runner.working_dir, ignore_errors=True)  # a few small files
        if self._metrics is not None:
            self._metrics.runner_removed(runner.index)
        log.info("runner_removed runner=%d runners=%d", runner.index, len(self.runners))
        self.wake()

    def _by_index(self, index: int | None) -> RunnerHandle | None:
        for runner in self.runners:
            if runner.index == index:
                return runner
        return None

    def restart_due(self) -> None:
        """Respawn runners whose backoff has passed."""
        now = time.monotonic()
        loop_now = asyncio.get_running_loop().time()
        self._timers = [t for t in self._timers if t.when() > loop_now and not t.cancelled()]
        for runner in self.runners:
            book = self._restarts[runner.index]
            if book.due_at is None or book.due_at > now or self.stopping:
                continue
            book.due_at = None
            book.checked = -1
            book.completed = book.memory_errors = 0  # a fresh process
            if runner.draining is None:
                runner.restarts += 1
                if self._metrics is not None:
                    self._metrics.runner_restarted(runner.index)
                log.info("runner_restart runner=%d restarts=%d", runner.index, runner.restarts)
            try:
                runner.spawn()
            except OSError as e:
                log.error("runner_spawn_failed runner=%d error=%s", runner.index, e)
                self._schedule_restart(runner)

    def check_setup_timeouts(self) -> None:
        """Kill runners whose setup has run past runners.setup_timeout_s."""
        limit = self.config.runners.setup_timeout_s
        if limit is None:
            return
        now = time.monotonic()
        for runner in self.runners:
            if runner.state != STARTING or not runner.alive or runner.setup_timed_out:
                continue
            if runner.started_at is not None and now - runner.started_at > limit:
                runner.setup_timed_out = True
                log.error("runner_setup_timed_out runner=%d limit_s=%s", runner.index, limit)
                runner.kill()

    def check_cancel_graces(self) -> None:
        """Kill runners that still hold a prediction runners.cancel_grace_s after the pool
        asked them to cancel it (a model that ignores cancels, or a cancel file that could
        not be written); wake again when the next grace ends.

        Cancels of the pool's own drain are left to the shutdown's steps (stop file, SIGTERM,
        SIGKILL): a runner killed here would be restarted.
        """
        if self.stopping:
            return  # the shutdown's steps end every runner now
        grace = self.config.runners.cancel_grace_s
        now = time.monotonic()
        next_due: float | None = None
        for runner in self.runners:
            book = self._restarts[runner.index]
            if not runner.alive or book.cancel_killed_pid == runner.pid:
                continue
            for prediction_id, slot in runner.slots.items():
                sent_at = slot.cancel_sent_at
                if sent_at is None or slot.prediction.ended_by_shutdown:
                    continue
                due = sent_at + grace
                if due > now:
                    next_due = due if next_due is None else min(next_due, due)
                    continue
                log.warning(
                    "runner_kill runner=%d pid=%s reason=cancel_grace_over prediction=%s "
                    "grace_s=%s",
                    runner.index,
                    runner.pid,
                    prediction_id,
                    grace,
                )
                book.cancel_killed_pid = runner.pid
                runner.kill()  # its exit is reaped like any death: restarted, slots failed
                break
        if next_due is None:
            return
        armed = self._cancel_wake_at
        if armed is None or armed <= now or next_due < armed:
            self._cancel_wake_at = next_due
            loop = asyncio.get_running_loop()
            # Armed past next_due: a wake before it would find no grace over and arm nothing.
            self._timers.append(loop.call_later(next_due - now + TIMER_SLACK_S, self.wake))

    # --- stopping ------------------------------------------------------------------------------
    async def stop(self, stop_grace_s: float | None = None) -> None:
        """Stop every runner: ``stop`` file, then SIGTERM, then SIGKILL, each after a grace."""
        grace = self.config.runners.stop_grace_s if stop_grace_s is None else stop_grace_s
        self.stopping = True
        for timer in self._timers:
            timer.cancel()
        steps: list[tuple[str, Callable[[RunnerHandle], Any], float]] = [
            ("stop_file", lambda r: r.request_stop(), grace),
            ("sigterm", lambda r: r.send(signal.SIGTERM, group=True), grace),
            ("sigkill", lambda r: r.kill(), 30.0),
        ]
        for step, act, wait_s in steps:
            alive = [r for r in self.runners if r.alive]
            if not alive:
                break
            log.info(
                "shutdown_step step=%s runners=%s", step, ",".join(str(r.index) for r in alive)
            )
            for runner in alive:
                act(runner)
            await self._wait_all_exited(wait_s)
        await self._close()

    async def _wait_all_exited(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self.reap()
            if not any(r.alive for r in self.runners):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._exited.clear()
            try:
                # Bounded by the safety rescan too: the loop task may have been cancelled.
                await asyncio.wait_for(self._exited.wait(), min(left, protocol.SAFETY_RESCAN_S))
            except TimeoutError:
                pass

    async def _close(self) -> None:
        if self._task is not None:
            self._closing = True
            self.wake()
            # A loop that already ended (a bug escaped it, or it was cancelled) must not stop
            # the shutdown from closing the runners.
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for runner in self.runners:
            runner.close()
        _remove_waker(self.handle_signal)
        _remove_handler(SCALE_UP_SIGNAL, self.handle_ttin)
        _remove_handler(SCALE_DOWN_SIGNAL, self.handle_ttou)

    # --- views ---------------------------------------------------------------------------------
    def status(self) -> str:
        """READY (a free slot), BUSY (ready runners all full), STARTING, SETUP_FAILED, DEFUNCT."""
        states = [r.state for r in self.runners]
        if any(r.free > 0 for r in self.runners):
            return READY
        if BUSY in states or READY in states:
            return BUSY
        if STARTING in states or any(b.due_at is not None for b in self._restarts.values()):
            return STARTING
        if SETUP_FAILED in states:
            return SETUP_FAILED
        return DEFUNCT

    def degraded_reasons(self) -> list[str]:
        """Why the pool serves below its configured capacity for good (empty: it does not)."""
        reasons = []
        for runner in self.runners:
            if self._restarts[runner.index].given_up:
                reasons.append(f"{runner.name} is DEFUNCT: restarts given up")
            elif runner.state == SETUP_FAILED:
                reasons.append(f"{runner.name} is SETUP_FAILED")
        if self._failed_ticks:
            reasons.append(f"supervisor pass failed {self._failed_ticks} time(s) in a row")
        return reasons

    def user_health_error(self) -> str | None:
        """Cog's ``user_healthcheck_error`` when no runner that finished setup is healthy:
        the first failing runner's error; None while any set-up runner passes its check
        (or none has one)."""
        serving = [r for r in self.runners if r.alive and r.state in (READY, BUSY)]
        if not serving or any(r.healthy for r in serving):
            return None
        return next(e for r in serving if (e := r.health_error) is not None)

    def can_ever_serve(self) -> bool:
        """False when every runner is out for good (setup failed, or restarts given up)."""
        return any(
            r.state != SETUP_FAILED and not self._restarts[r.index].given_up for r in self.runners
        )

    def features(self) -> dict[str, Any]:
        """The model's features (setup_result ``features``) from a runner that set up."""
        for runner in self.runners:
            result = runner.setup_result
            if result is not None and result.get("status") == protocol.STATUS_SUCCEEDED:
                features = result.get("features")
                return features if isinstance(features, dict) else {}
        return {}

    def schema(self) -> dict[str, Any] | None:
        for runner in self.runners:
            if runner.schema is not None:
                return runner.schema
        return None

    def setup_info(self) -> dict[str, Any]:
        """Cog's ``setup`` object: the first success, else the first failure, else starting."""
        results = [r.setup_result for r in self.runners if r.setup_result is not None]
        chosen = next(
            (x for x in results if x.get("status") == protocol.STATUS_SUCCEEDED),
            results[0] if results else None,
        )
        if chosen is None:  # still setting up: when the first runner started
            spawned = [r.spawned_at for r in self.runners if r.spawned_at is not None]
            started = min(spawned).isoformat().replace("+00:00", "Z") if spawned else None
            return {"started_at": started, "completed_at": None, "status": None, "logs": ""}
        info = {k: chosen.get(k) for k in ("started_at", "completed_at", "status", "logs")}
        info["logs"] = info["logs"] or ""
        if chosen.get("error") and chosen.get("status") != protocol.STATUS_SUCCEEDED:
            info["error"] = chosen["error"]
        return info

    def reload_info(self) -> dict[str, Any]:
        """``/health-check`` ``reload``: the last reload's state and error, and the count."""
        r = self._reload
        return {
            "state": r.state,
            "error": r.error,
            "count": self._reloads_begun,
            "replaced": r.replaced,
            "total": r.total,
            "started_at": _iso(r.started_at) if r.started_at else None,
            "completed_at": _iso(r.completed_at) if r.completed_at else None,
            "runners": len([x for x in self.runners if x.index not in self._retiring]),
            "max_runners": self.max_runners,
        }

    def runners_info(self) -> list[dict[str, Any]]:
        return [
            {
                "index": r.index,
                "gpu": r.gpu,
                "pid": r.pid,
                "status": r.state,
                "busy": len(r.slots),
                "capacity": r.capacity,
                "restarts": r.restarts,
                "recycles": r.recycles,
                "draining": r.draining,
                "healthy": r.healthy,
                "healthcheck_error": r.health_error,
                "healthcheck_failures": r.health_failures,
            }
            for r in self.runners
        ]
