"""Large-payload benchmark: takes a file (sent as a data: URI) and returns its size in bytes.
Only the API both SDKs share."""

import os

from cog import BasePredictor, Path


class Predictor(BasePredictor):
    def predict(self, data: Path) -> int:
        return os.path.getsize(data)
