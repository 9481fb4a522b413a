# A predictor whose setup and predictions wait for gate files the test creates, so a test can
# hold the pool in STARTING or hold a prediction in flight without timing guesses.
import os
import time

from cog import BasePredictor

GATE_DEADLINE_S = 120.0


def _wait_for(path: str) -> None:
    deadline = time.time() + GATE_DEADLINE_S
    while not os.path.exists(path):
        if time.time() > deadline:
            raise RuntimeError(f"gate file {path} never appeared")
        time.sleep(0.01)


class Predictor(BasePredictor):
    def setup(self) -> None:
        gate = os.environ.get("SETUP_GATE_FILE")
        if gate:
            _wait_for(gate)

    def predict(self, text: str = "", hold_file: str = "") -> str:
        if hold_file:
            _wait_for(hold_file)
        return "hello " + text
