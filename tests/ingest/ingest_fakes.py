"""A stand-in for the PoolManager's public surface, for unit tests of consumer bookkeeping.

It is NOT a manager: no runners, no queue. Predictions finish when the test says so
(``finish``), or at once with their input as output when ``auto_finish`` is set. The end-to-end
tests (test_broker_*.py) use the real PoolManager with real coglet runners.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pool.errors import InvalidInput
from pool.prediction import Prediction, PredictionRequest


class FakeManager:
    def __init__(self, *, slots: int = 2, auto_finish: bool = True) -> None:
        self.slots = slots
        self.auto_finish = auto_finish
        self.predictions: dict[str, Prediction] = {}
        self.submitted: list[str] = []
        self.canceled: list[str] = []
        self.health_sources: dict[str, Any] = {}
        self.forwarders: list[Any] = []
        self.shutting_down = False
        self.metrics = None
        self._changed = asyncio.Event()
        self.slot_listeners: list[Any] = []

    def _running(self) -> int:
        return sum(1 for p in self.predictions.values() if not p.done)

    def capacity(self) -> int:
        return self.slots

    def free_slots(self) -> int:
        return self.slots - self._running()

    def add_slot_listener(self, listener: Any) -> None:
        self.slot_listeners.append(listener)

    def remove_slot_listener(self, listener: Any) -> None:
        self.slot_listeners.remove(listener)

    def _slots_changed(self) -> None:
        self._changed.set()
        for listener in list(self.slot_listeners):
            listener()

    async def wait_for_free_slot(self) -> None:
        while self.free_slots() <= 0:
            self._changed.clear()
            await self._changed.wait()

    def health(self) -> dict[str, Any]:
        return {"concurrency": {"max": self.slots, "current": self._running()}}

    async def submit(self, request: PredictionRequest, *, source: str = "http") -> Prediction:
        if request.input.get("bad"):
            raise InvalidInput([{"loc": ["body", "input", "bad"], "msg": "bad input", "type": "x"}])
        if request.id in self.predictions:
            return self.predictions[request.id]
        prediction = Prediction(request, source=source)
        self.predictions[prediction.id] = prediction
        self.submitted.append(prediction.id)
        prediction.mark_started(0)
        if self.auto_finish:
            asyncio.get_running_loop().call_soon(self.finish, prediction.id)
        return prediction

    def finish(self, prediction_id: str, status: str = "succeeded", error: str | None = None):
        prediction = self.predictions[prediction_id]
        delta: dict[str, Any] = {"status": status, "output": prediction.input}
        if error:
            delta["error"] = error
        prediction.apply_delta(delta)
        self._slots_changed()

    def get(self, prediction_id: str) -> Prediction | None:
        return self.predictions.get(prediction_id)

    async def cancel(self, prediction_id: str) -> bool:
        prediction = self.predictions.get(prediction_id)
        if prediction is None:
            for forward in self.forwarders:
                await forward(prediction_id)
            return False
        self.canceled.append(prediction_id)
        prediction.finish("canceled")
        self._changed.set()
        return True

    def add_health_source(self, name: str, fn: Any) -> None:
        self.health_sources[name] = fn

    def add_cancel_forwarder(self, fn: Any) -> None:
        self.forwarders.append(fn)


class BlockingSubmitManager(FakeManager):
    """A FakeManager whose ``submit`` waits for ``release`` (as the real one waits on a file
    download), so a test can act while a consumer is inside the call."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def submit(self, request: PredictionRequest, *, source: str = "http") -> Prediction:
        self.entered.set()
        await self.release.wait()
        return await super().submit(request, source=source)
