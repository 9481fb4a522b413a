"""Streams ``n`` tokens; records metrics while it runs; ``pause_s`` between tokens; waits for
the file ``gate`` (when given) to exist before each token past ``gate_after``, so a test can
attach a second stream while it runs."""

import asyncio
import os
from typing import AsyncIterator

import cog
from cog import BasePredictor, current_scope


class Predictor(BasePredictor):
    @cog.streaming
    async def predict(
        self, n: int = 3, pause_s: float = 0.0, gate: str = "", gate_after: int = 0
    ) -> AsyncIterator[str]:
        scope = current_scope()
        scope.record_metric("temperature", 0.5)
        for i in range(n):
            if gate and i >= gate_after:
                while not os.path.exists(gate):
                    await asyncio.sleep(0.01)
            scope.record_metric("tokens", 1, "incr")
            yield f"tok{i}"
            if pause_s:
                await asyncio.sleep(pause_s)
