"""The router: admission, one FIFO of waiting predictions, handed to the least loaded runner.

Admission comes from the pool's own accounting (each runner's slots in flight against its
capacity, less the predictions already waiting or still preparing their inputs), never from
the runners' READY/BUSY signals, which lag. A prediction is admitted once, before its inputs
are fetched, and holds its place from then on. The router also remembers recently finished
predictions (slim copies, bounded by count, bytes in memory, bytes of kept output files on
disk, and age), for ``GET /predictions/{id}`` and idempotent ``PUT``; a kept copy holds its
output files (``pool.files.OutputFiles``) until it is let go.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence

from coglet import protocol
from pool.config import HttpConfig, PredictionsConfig
from pool.errors import PoolBusy, PoolFull
from pool.prediction import EndReason, Phase, Prediction
from pool.runner import RunnerHandle

__all__ = ["Router"]

log = logging.getLogger("pool.router")


class Router:
    """Admit, queue, dispatch, cancel and remember predictions across a set of runners."""

    def __init__(
        self,
        http: HttpConfig,
        runners: Sequence[RunnerHandle],
        predictions: PredictionsConfig | None = None,
    ) -> None:
        self._http = http
        self._limits = predictions or PredictionsConfig()
        self._runners = runners
        self._queue: collections.deque[Prediction] = collections.deque()
        self._live: dict[str, Prediction] = {}  # admitted, not yet terminal (any phase)
        self._preparing = 0  # admitted records still fetching their inputs
        self.waiting_bytes = 0  # input bytes of the records preparing or queued
        # id -> (finished at, slim copy, its bytes in memory, its files' bytes), oldest first
        self._recent: collections.OrderedDict[str, tuple[float, Prediction, int, int]] = (
            collections.OrderedDict()
        )
        self.recent_bytes = 0
        self.recent_file_bytes = 0  # output files the kept copies hold on disk
        self._waiters: list[asyncio.Future[None]] = []
        self._listeners: list[Callable[[], object]] = []  # told synchronously, on notify

    # --- views ---------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def preparing(self) -> int:
        return self._preparing

    @property
    def in_flight(self) -> int:
        """Predictions holding a runner slot (a slot is freed by the runner's terminal update)."""
        return sum(len(r.slots) for r in self._runners)

    @property
    def active(self) -> dict[str, Prediction]:
        """Every admitted prediction not yet terminal, whatever its phase."""
        return self._live

    def capacity(self) -> int:
        """Slots of the runners that can take work now."""
        return sum(r.capacity for r in self._runners if r.accepting)

    def free_slots(self) -> int:
        """Free slots of ready runners, less the predictions waiting for one or preparing."""
        return sum(r.free for r in self._runners) - len(self._queue) - self._preparing

    def get(self, prediction_id: str) -> Prediction | None:
        found = self._live.get(prediction_id)
        if found is not None:
            return found
        self._prune_recent()
        entry = self._recent.get(prediction_id)
        return entry[1] if entry else None

    # --- intake --------------------------------------------------------------------------------
    def admit(self, prediction: Prediction) -> None:
        """Take ``prediction`` in (phase preparing, its place held) or raise PoolBusy
        (``reject_when_busy``) / PoolFull when one more may not wait. Called once."""
        free = sum(r.free for r in self._runners)
        waiting = len(self._queue) + self._preparing
        if free - waiting <= 0:
            if self._http.reject_when_busy:
                raise PoolBusy("every runner slot is taken; retry later")
            if waiting - free >= self._http.queue_limit:
                raise PoolFull(
                    f"the wait queue is full ({self._http.queue_limit} predictions); retry later"
                )
            limit = self._limits.waiting_max_bytes
            if self.waiting_bytes + prediction.input_bytes > limit:
                raise PoolFull(
                    f"the wait queue is full ({self.waiting_bytes} bytes of inputs waiting, "
                    f"this one {prediction.input_bytes}; predictions.waiting_max_bytes={limit})"
                    "; retry later"
                )
        self._live[prediction.id] = prediction
        self._preparing += 1
        self.waiting_bytes += prediction.input_bytes

    def withdraw(self, prediction: Prediction) -> None:
        """Forget an admitted prediction that never became one (refused while preparing)."""
        if self._live.get(prediction.id) is prediction:
            del self._live[prediction.id]
            self._leave_phase(prediction)
        self.notify()

    def enqueue(self, prediction: Prediction) -> None:
        """Its inputs are local and its request encoded (it is preparing, not ended): queue
        it, then dispatch."""
        if prediction.phase != Phase.PREPARING:
            raise RuntimeError(f"enqueue of prediction {prediction.id} in phase {prediction.phase}")
        self._preparing -= 1
        prediction.mark_queued(time.monotonic())
        self._queue.append(prediction)
        self.dispatch()

    def _leave_phase(self, prediction: Prediction) -> None:
        if prediction.phase == Phase.PREPARING:
            self._preparing -= 1
            self.waiting_bytes -= prediction.input_bytes
        elif prediction.phase == Phase.QUEUED:
            self._remove_queued(prediction)

    def _remove_queued(self, prediction: Prediction) -> None:
        try:
            self._queue.remove(prediction)
        except ValueError:
            return
        self.waiting_bytes -= prediction.input_bytes

    def dispatch(self) -> int:
        """Hand waiting predictions to runners with a free slot, least loaded first."""
        sent = 0
        while self._queue:
            runner = self._pick()
            if runner is None:
                break
            prediction = self._queue.popleft()
            self.waiting_bytes -= prediction.input_bytes
            if prediction.done or prediction.runner_request is None:
                continue
            try:
                runner.dispatch(prediction, prediction.runner_request)
            except OSError as e:  # the working dir vanished: the runner is on its way out
                log.error(
                    "dispatch_failed prediction=%s runner=%d error=%s",
                    prediction.id,
                    runner.index,
                    e,
                )
                # The request file is written before the slot is taken: nothing to undo.
                self._queue.appendleft(prediction)
                self.waiting_bytes += prediction.input_bytes
                break
            prediction.dispatched_at = time.monotonic()
            prediction.runner_request = None  # the runner has it: up to max_body_bytes freed
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
    def runner_of(self, prediction_id: str) -> RunnerHandle | None:
        """The runner holding a slot for ``prediction_id``, if any."""
        for runner in self._runners:
            if prediction_id in runner.slots:
                return runner
        return None

    def cancel(self, prediction_id: str, reason: EndReason = EndReason.CANCELED) -> bool:
        """Cancel a queued (finish it ``canceled`` here) or running (ask its runner) prediction."""
        prediction = self._live.get(prediction_id)
        if prediction is None or prediction.done:
            return False
        if prediction.phase == Phase.QUEUED:
            prediction.request_cancel(reason)
            prediction.finish(protocol.STATUS_CANCELED)
            log.info("prediction_canceled prediction=%s where=queue", prediction_id)
            return True
        runner = self.runner_of(prediction_id)
        if runner is not None:
            prediction.request_cancel(reason)
            return runner.cancel(prediction_id)
        return False

    def cancel_queued(self, reason: EndReason = EndReason.CANCELED) -> int:
        """Cancel everything still waiting (shutdown); returns how many."""
        count = 0
        for prediction in list(self._queue):
            if not prediction.done:
                prediction.request_cancel(reason)
                prediction.finish(protocol.STATUS_CANCELED)
                count += 1
        self._queue.clear()
        self.notify()
        return count

    def fail_queued(self, error: str) -> int:
        """Fail everything still waiting (no runner can ever take it); returns how many.

        Ended as lost to the runtime (``EndReason.NO_RUNNER``), like a run whose runner died:
        the request itself is not at fault, so a queue hands it to another pool and a client's
        PUT of the same id runs it again.
        """
        count = 0
        for prediction in list(self._queue):
            if not prediction.done:
                prediction.fail(error, reason=EndReason.NO_RUNNER)
                count += 1
        self._queue.clear()
        self.notify()
        return count

    def record_finished(self, prediction: Prediction) -> None:
        """A prediction reached its terminal status: keep a slim copy readable for a while."""
        if self._live.get(prediction.id) is prediction:
            del self._live[prediction.id]
            if prediction.ended_in == Phase.PREPARING:
                self._preparing -= 1
                self.waiting_bytes -= prediction.input_bytes
            elif prediction.ended_in == Phase.QUEUED:
                self._remove_queued(prediction)
        limits = self._limits
        if limits.recent_max > 0 and limits.recent_ttl_s > 0:
            slim, size = prediction.slim(
                limits.recent_value_max_bytes, limits.recent_files_max_bytes
            )
            old = self._recent.pop(prediction.id, None)
            if old is not None:
                self._forget(*old[1:])
            if size <= limits.recent_max_bytes:
                file_bytes = 0
                if slim.files is not None:
                    slim.files.hold()  # the store's hold, until the copy is let go
                    file_bytes = slim.files.bytes
                self._recent[prediction.id] = (time.monotonic(), slim, size, file_bytes)
                self.recent_bytes += size
                self.recent_file_bytes += file_bytes
        prediction.release_live()  # after the store's hold: kept files stay
        self._prune_recent()
        self.notify()

    def _forget(self, slim: Prediction, size: int, file_bytes: int) -> None:
        self.recent_bytes -= size
        self.recent_file_bytes -= file_bytes
        if slim.files is not None:
            slim.files.release()  # removed now, unless a reader still holds them

    def _prune_recent(self) -> None:
        limits = self._limits
        cutoff = time.monotonic() - limits.recent_ttl_s
        while self._recent:
            prediction_id, (finished_at, *_) = next(iter(self._recent.items()))
            if (
                finished_at >= cutoff
                and len(self._recent) <= limits.recent_max
                and self.recent_bytes <= limits.recent_max_bytes
                and self.recent_file_bytes <= limits.recent_files_max_bytes
            ):
                break
            self._forget(*self._recent.pop(prediction_id)[1:])

    # --- waiting for room ----------------------------------------------------------------------
    def notify(self) -> None:
        """Slots may have changed: let every waiter look again, and tell every listener now."""
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # one broken listener must not stop the others, nor dispatch
                log.exception("slot_listener_failed listener=%r", listener)

    def add_listener(self, listener: Callable[[], object]) -> None:
        """Call ``listener()`` whenever slots may have changed, in the same loop turn (a
        queue consumer's line of held messages: no task wake-up between a freed slot and
        the next message taking it)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], object]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def wait_for_free_slot(self) -> None:
        """Return when ``free_slots() > 0``."""
        while self.free_slots() <= 0:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut
