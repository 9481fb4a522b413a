# The HTTP API's end-to-end model: echoes text, can log, fail or run until canceled.
import time

from cog import BasePredictor, Input


class Predictor(BasePredictor):
    def setup(self) -> None:
        self.prefix = "hello "

    def predict(
        self,
        text: str = Input(description="what to echo", min_length=1),
        sleep_s: float = Input(default=0.0, ge=0, le=600),
        fail: bool = False,
    ) -> str:
        print(f"echoing {text}")
        if fail:
            raise ValueError(f"asked to fail on {text}")
        # a long sleep stands for a long model call; a cancel interrupts it
        time.sleep(sleep_s)
        return self.prefix + text
