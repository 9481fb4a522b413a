# Streams n tokens with a log line each, so webhooks see many output/logs changes.
import time
from typing import Iterator

from cog import BasePredictor, Input


class Predictor(BasePredictor):
    def predict(
        self, n: int = Input(default=5, ge=0, le=1000), pause_s: float = 0.0
    ) -> Iterator[str]:
        for i in range(n):
            print(f"token {i}")
            yield f"t{i}"
            time.sleep(pause_s)
