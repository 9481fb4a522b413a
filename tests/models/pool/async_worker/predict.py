# An async predictor with concurrency.max 4: several predictions share one runner.
import asyncio
import json
import os
import time

from cog import BasePredictor, Input


class Predictor(BasePredictor):
    async def setup(self) -> None:
        pass

    async def predict(self, sleep_s: float = Input(default=0.0, ge=0)) -> str:
        started = time.time()
        await asyncio.sleep(sleep_s)
        return json.dumps({"pid": os.getpid(), "started": started, "ended": time.time()})
