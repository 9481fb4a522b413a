# A predictor whose code carries a version: the reload tests copy it, edit VERSION (or make
# setup fail) and check which code answered. Reports its pid and CUDA_VISIBLE_DEVICES.
import json
import os
import time

from cog import BasePredictor, Input

VERSION = "v1"
SETUP_FAILS = False


class Predictor(BasePredictor):
    def setup(self) -> None:
        if SETUP_FAILS:
            raise RuntimeError(f"broken model {VERSION}")

    def predict(self, sleep_s: float = Input(default=0.0, ge=0, le=10)) -> str:
        time.sleep(sleep_s)
        out = {
            "version": VERSION,
            "pid": os.getpid(),
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
        return json.dumps(out)
