"""Async fixture predictors for the runner's protocol tests (tests/coglet/test_runner*.py)."""

import asyncio
import os
import time
from typing import AsyncIterator

from cog import BasePredictor, Input, current_scope


class Overlap(BasePredictor):
    """Each prediction waits until ``want`` of them run at once: they succeed only together."""

    async def setup(self) -> None:
        # Made in setup: it must belong to the loop the predictions run on.
        self.started = 0
        self.together = asyncio.Event()
        print("async setup ran")

    async def predict(self, tag: str, want: int = Input(default=3)) -> str:
        self.started += 1
        if self.started >= want:
            self.together.set()
        print(f"{tag} started")
        await asyncio.wait_for(self.together.wait(), timeout=30)
        await asyncio.sleep(0)  # let the others print in between
        print(f"{tag} finished")
        current_scope().record_metric("tag_len", len(tag))
        return f"{tag} ran with {self.started} started"


class AsyncSleeper(BasePredictor):
    async def predict(self, seconds: float = Input(default=120.0)) -> str:
        print("sleeping")
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            print("cancelled inside")
            raise
        return "woke up"


class AsyncGated(BasePredictor):
    async def predict(self, gate_dir: str, n: int = Input(default=3)) -> AsyncIterator[str]:
        for i in range(n):
            yield f"item-{i}"
            path = os.path.join(gate_dir, f"ack-{i}")
            deadline = time.monotonic() + 30
            while not os.path.exists(path):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {path}")
                await asyncio.sleep(0.002)


class AsyncNull(BasePredictor):
    """Returns at once (bench/coglet_roundtrip.py --model tests/models/runner)."""

    async def predict(self, sleep_ms: int = Input(default=0)) -> str:
        return "ok"
