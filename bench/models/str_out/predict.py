"""Large-payload benchmark: returns a string of ``size_mb`` MiB (the response carries it as is).
Only the API both SDKs share."""

from cog import BasePredictor, Input


class Predictor(BasePredictor):
    def predict(self, size_mb: int = Input(default=100, ge=1, le=1024)) -> str:
        return "x" * (size_mb << 20)
