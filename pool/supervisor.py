"""Runner supervision: spawn, reap, scan, restart, stop.

One loop task owns every runner handle. It wakes on a runner signal (SIGUSR1/SIGUSR2/SIGHUP),
on a child exit (its pidfd turns readable), on a freed slot, or after the safety rescan
(``SAFETY_RESCAN_S``); each wake runs the same short list of verbs: reap, scan, restart,
check setup timeouts, then the ``on_tick`` callback (the router dispatches there).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import signal
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from coglet import protocol
from pool.config import PoolConfig
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

__all__ = ["RunnerMetrics", "Supervisor", "runner_gpus"]

log = logging.getLogger("pool.supervisor")

# Runner -> pool hints. Each only means "something changed somewhere: rescan".
WAKE_SIGNALS = (protocol.SIG_READY, protocol.SIG_BUSY, protocol.SIG_OUTPUT)


class RunnerMetrics(Protocol):
    def runner_restarted(self, runner_index: int) -> None: ...

    def runner_recycled(self, runner_index: int, reason: str) -> None: ...


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
    ) -> None:
        self.config = config
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
        self.runners = [
            RunnerHandle(i, gpu, config, state_dir, wake=self.wake, temp_root=temp_root)
            for i, gpu in enumerate(runner_gpus(config))
        ]
        self._restarts = {r.index: _Restarts() for r in self.runners}

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Install the wake handlers, then spawn every runner (they set up in parallel)."""
        # Before any spawn: an unhandled SIGHUP/SIGUSR1 from a runner would kill the pool.
        _add_waker(self.handle_signal)
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
        """One pass: reap, scan, recycle, restart, time out setups, then let the router
        dispatch."""
        self.reap()
        self.scan()
        self.recycle()
        self.restart_due()
        self.check_setup_timeouts()
        self._on_tick()

    # --- verbs ---------------------------------------------------------------------------------
    def reap(self) -> None:
        """Collect exited children and decide their fate."""
        for runner in self.runners:
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
        if self.stopping:
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
        self._timers.append(asyncio.get_running_loop().call_later(delay, self.wake))
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
                runner.send(signal.SIGKILL, group=True)

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
            ("sigkill", lambda r: r.send(signal.SIGKILL, group=True), 30.0),
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
                "healthy": r.healthy,
                "healthcheck_error": r.health_error,
                "healthcheck_failures": r.health_failures,
            }
            for r in self.runners
        ]
