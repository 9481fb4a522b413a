# A sync predictor for the pool's tests: reports where it ran and when, can sleep, print to
# its fds, die, or fail.
import json
import os
import signal
import time

from cog import BasePredictor, Input


def _sleep_through_cancels(sleep_s: float) -> None:
    # A model that swallows CancelationException: only a kill stops it.
    deadline = time.time() + sleep_s
    while time.time() < deadline:
        try:
            time.sleep(max(0.0, deadline - time.time()))
        except BaseException:
            print("ignoring a cancel")


class Predictor(BasePredictor):
    def setup(self) -> None:
        print("worker setup done")

    def predict(
        self,
        sleep_s: float = Input(default=0.0, ge=0),
        die: bool = False,
        fail: bool = False,
        shout: str = "",
        stubborn: bool = False,
        n: int = Input(default=0, ge=0, le=1000),
    ) -> str:
        started = time.time()
        if shout:
            # straight to fd 1, like C code or a subprocess would: the pool reads the pipe
            os.write(1, (shout + "\n").encode())
        if die:
            os.kill(os.getpid(), signal.SIGKILL)
        if fail:
            raise RuntimeError("asked to fail")
        if stubborn:
            _sleep_through_cancels(sleep_s)
        else:
            time.sleep(sleep_s)
        out = {
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "pid": os.getpid(),
            "started": started,
            "ended": time.time(),
            "n": n,
        }
        return json.dumps(out)
