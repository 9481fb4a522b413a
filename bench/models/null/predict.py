"""The benchmark predictor: returns at once, or after ``sleep_ms`` milliseconds.

Uses only the API that Cog's SDK and cog-pool's SDK share (``BasePredictor``, ``Input``), so
the same file runs under Cog 0.23 (importing Cog's ``cog``) and under cog-pool (importing ours).
"""

import time

from cog import BasePredictor, Input


class Predictor(BasePredictor):
    def setup(self) -> None:
        pass

    def predict(
        self,
        sleep_ms: int = Input(default=0, ge=0, le=60_000, description="time to sleep, in ms"),
    ) -> str:
        if sleep_ms:
            time.sleep(sleep_ms / 1000.0)
        return "ok"
