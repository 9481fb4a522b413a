"""The router: one FIFO of waiting predictions, handed to the least loaded runner with a free slot.

Admission comes from the pool's own accounting (each runner's slots in flight against its
capacity), never from the runners' READY/BUSY signals, which lag. The router also remembers
recently finished predictions, for ``GET /predictions/{id}`` and idempotent ``PUT``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from coglet import protocol
from pool.config import HttpConfig
from pool.errors import PoolBusy, PoolFull
from pool.prediction import Prediction
from pool.runner import RunnerHandle

__all__ = ["Router"]

log = logging.getLogger("pool.router")


@dataclass
class _Waiting:
    prediction: Prediction
    runner_input: dict[str, Any]
    enqueued_at: float


class Router:
    """Queue, dispatch, cancel and remember predictions across a set of runners."""

    def __init__(self, http: HttpConfig, runners: Sequence[RunnerHandle]) -> None:
        self._http = http
        self._runners = runners
        self._queue: collections.deque[_Waiting] = collections.deque()
        self._active: dict[str, Prediction] = {}  # queued or on a runner, not yet terminal
        self._recent: collections.OrderedDict[str, tuple[float, Prediction]] = (
            collections.OrderedDict()
        )
        self._waiters: list[asyncio.Future[None]] = []
        self.queue_wait_s: dict[str, float] = {}  # per prediction, set at dispatch

    # --- views ---------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Predictions holding a runner slot (a slot is freed by the runner's terminal update)."""
        return sum(len(r.slots) for r in self._runners)

    @property
    def active(self) -> dict[str, Prediction]:
        return self._active

    def capacity(self) -> int:
        """Slots of the runners that can take work now."""
        return sum(r.capacity for r in self._runners if r.accepting)

    def free_slots(self) -> int:
        """Free slots of ready runners, less the predictions already waiting for one."""
        return sum(r.free for r in self._runners) - len(self._queue)

    def get(self, prediction_id: str) -> Prediction | None:
        found = self._active.get(prediction_id)
        if found is not None:
            return found
        self._prune_recent()
        entry = self._recent.get(prediction_id)
        return entry[1] if entry else None

    # --- intake --------------------------------------------------------------------------------
    def admit(self) -> None:
        """Raise PoolBusy (``reject_when_busy``) or PoolFull when one more may not wait."""
        if self.free_slots() <= 0:
            if self._http.reject_when_busy:
                raise PoolBusy("every runner slot is taken; retry later")
            if len(self._queue) >= self._http.queue_limit:
                raise PoolFull(
                    f"the wait queue is full ({self._http.queue_limit} predictions); retry later"
                )

    def enqueue(self, prediction: Prediction, runner_input: dict[str, Any]) -> None:
        """Queue one prediction (PoolBusy / PoolFull when it may not wait), then dispatch."""
        self.admit()
        self._active[prediction.id] = prediction
        self._queue.append(_Waiting(prediction, runner_input, time.monotonic()))
        self.dispatch()

    def dispatch(self) -> int:
        """Hand waiting predictions to runners with a free slot, least loaded first."""
        sent = 0
        while self._queue:
            runner = self._pick()
            if runner is None:
                break
            waiting = self._queue.popleft()
            prediction = waiting.prediction
            if prediction.done:
                continue
            self.queue_wait_s[prediction.id] = time.monotonic() - waiting.enqueued_at
            try:
                runner.dispatch(prediction, waiting.runner_input)
            except OSError as e:  # the working dir vanished: the runner is on its way out
                log.error(
                    "dispatch_failed prediction=%s runner=%d error=%s",
                    prediction.id,
                    runner.index,
                    e,
                )
                runner.slots.pop(prediction.id, None)
                self._queue.appendleft(waiting)
                break
            sent += 1
        self.notify()
        return sent

    def _pick(self) -> RunnerHandle | None:
        best: RunnerHandle | None = None
        for runner in self._runners:
            if runner.free <= 0:
                continue
            if best is None or len(runner.slots) < len(best.slots):
                best = runner
        return best

    # --- cancel and finish ---------------------------------------------------------------------
    def cancel(self, prediction_id: str) -> bool:
        """Cancel a queued (finish it ``canceled`` here) or running (ask its runner) prediction."""
        prediction = self._active.get(prediction_id)
        if prediction is None or prediction.done:
            return False
        for waiting in self._queue:
            if waiting.prediction.id == prediction_id:
                self._queue.remove(waiting)
                prediction.cancel_requested = True
                prediction.finish(protocol.STATUS_CANCELED)
                log.info("prediction_canceled prediction=%s where=queue", prediction_id)
                self.notify()
                return True
        for runner in self._runners:
            if runner.cancel(prediction_id):
                return True
        return False

    def cancel_queued(self) -> int:
        """Cancel everything still waiting (shutdown); returns how many."""
        count = 0
        while self._queue:
            waiting = self._queue.popleft()
            if not waiting.prediction.done:
                waiting.prediction.finish(protocol.STATUS_CANCELED)
                count += 1
        self.notify()
        return count

    def fail_queued(self, error: str) -> int:
        """Fail everything still waiting (no runner can ever take it); returns how many.

        Marked as lost to the runtime (``runner_died``), like a run whose runner died: the
        request itself is not at fault, so a queue hands it to another pool and a client's
        PUT of the same id runs it again.
        """
        count = 0
        while self._queue:
            waiting = self._queue.popleft()
            if not waiting.prediction.done:
                waiting.prediction.runner_died = True
                waiting.prediction.fail(error)
                count += 1
        self.notify()
        return count

    def record_finished(self, prediction: Prediction) -> None:
        """A prediction reached its terminal status: keep it readable for a while."""
        self._active.pop(prediction.id, None)
        self.queue_wait_s.pop(prediction.id, None)
        if self._http.recent_max > 0 and self._http.recent_ttl_s > 0:
            self._recent[prediction.id] = (time.monotonic(), prediction)
            self._recent.move_to_end(prediction.id)
        self._prune_recent()

    def _prune_recent(self) -> None:
        cutoff = time.monotonic() - self._http.recent_ttl_s
        while self._recent:
            prediction_id, (finished_at, _) = next(iter(self._recent.items()))
            if finished_at >= cutoff and len(self._recent) <= self._http.recent_max:
                break
            del self._recent[prediction_id]

    # --- waiting for room ----------------------------------------------------------------------
    def notify(self) -> None:
        """Slots may have changed: let every waiter look again."""
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait_for_free_slot(self) -> None:
        """Return when ``free_slots() > 0``."""
        while self.free_slots() <= 0:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut
