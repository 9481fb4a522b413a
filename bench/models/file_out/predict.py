"""Large-payload benchmark: returns a file of ``size_mb`` MiB (Cog and cog-pool alike encode it
as a data: URI in the response). Only the API both SDKs share."""

import os
import tempfile

from cog import BasePredictor, Input, Path


class Predictor(BasePredictor):
    def predict(self, size_mb: int = Input(default=100, ge=1, le=1024)) -> Path:
        fd, path = tempfile.mkstemp(suffix=".bin")
        block = os.urandom(1 << 20)
        with os.fdopen(fd, "wb") as f:
            for _ in range(size_mb):
                f.write(block)
        return Path(path)
