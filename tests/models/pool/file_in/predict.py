# Reads a Path input: the pool downloads/decodes it first and hands the runner a local path.
from cog import BasePredictor, Path


class Predictor(BasePredictor):
    def predict(self, doc: Path) -> str:
        with open(doc) as f:
            return f.read()
