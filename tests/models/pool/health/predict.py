# A predictor whose healthcheck() prints: that text is the runner's, never a prediction's.
import time

from cog import BasePredictor


class Predictor(BasePredictor):
    def predict(self, sleep_s: float = 0.0) -> str:
        print("predicting")
        time.sleep(sleep_s)
        return "done"

    def healthcheck(self) -> bool:
        print("healthcheck ran")
        return True
