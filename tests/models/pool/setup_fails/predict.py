# setup() fails: the runner reports SETUP_FAILED and the pool must not restart-loop it.
from cog import BasePredictor


class Predictor(BasePredictor):
    def setup(self) -> None:
        print("loading weights from /nowhere")
        raise RuntimeError("weights missing")

    def predict(self, x: int = 1) -> int:
        return x
