# Streams items of item_kb KiB without end (n=0), or n of them: the pool's cap on streamed
# output (predictions.streamed_output_max_bytes) is what stops an endless one.
from typing import Iterator

from cog import BasePredictor, Input


class Predictor(BasePredictor):
    def predict(
        self,
        item_kb: int = Input(default=1, ge=0, le=65536),
        n: int = Input(default=0, ge=0),
    ) -> Iterator[str]:
        item = "x" * (item_kb * 1024)
        count = 0
        while n == 0 or count < n:
            yield item
            count += 1
