"""Yields ``time.time()`` (wall clock, seconds) ``n`` times, ``pause_ms`` apart: the client on
the same machine subtracts it from the arrival time (bench/sse_latency.py)."""

import time
from typing import Iterator

import cog
from cog import BasePredictor


class Predictor(BasePredictor):
    @cog.streaming
    def predict(self, n: int = 1000, pause_ms: float = 1.0) -> Iterator[float]:
        for _ in range(n):
            if pause_ms:
                time.sleep(pause_ms / 1000)
            yield time.time()
