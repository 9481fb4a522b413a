"""healthcheck() steered per runner process: the file ``$HEALTH_DIR/<pid>`` holds "ok" (the
default, also when the file is missing), "false" (returns False) or "raise" (raises
RuntimeError). predict() returns this runner's pid, so a test sees which runner served."""

import os

from cog import BasePredictor


class Predictor(BasePredictor):
    def predict(self) -> int:
        return os.getpid()

    def healthcheck(self) -> bool:
        try:
            with open(os.path.join(os.environ["HEALTH_DIR"], str(os.getpid()))) as f:
                mode = f.read().strip()
        except (KeyError, OSError):
            mode = "ok"
        if mode == "raise":
            raise RuntimeError("database unreachable")
        return mode != "false"
