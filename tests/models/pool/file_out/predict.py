# Returns a file: the pool must turn it into a data: URI before anyone sees the output.
import tempfile

from cog import BasePredictor, Path


class Predictor(BasePredictor):
    def predict(self, text: str = "hello") -> Path:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(text)
        return Path(f.name)
