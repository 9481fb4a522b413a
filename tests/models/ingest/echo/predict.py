# The queue tests' model: echoes n, can record each run, sleep, or kill its own process.
import os
import time

from cog import BasePredictor, Input


class Predictor(BasePredictor):
    def setup(self) -> None:
        pass

    def predict(
        self,
        n: int = Input(default=0),
        sleep_s: float = Input(default=0.0, ge=0),
        exit_now: bool = False,
        runs_file: str = "",
        payload: str = "",
    ) -> str:
        if runs_file:
            # One line per run, appended atomically (O_APPEND, one write): the tests count
            # how many times each n really ran.
            fd = os.open(runs_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{n}\n".encode())
            finally:
                os.close(fd)
        if exit_now:
            os._exit(17)
        if sleep_s:
            time.sleep(sleep_s)
        return f"echo {n}"
