# A predictor whose setup() prints 8 MiB: more than a small tmpfs state dir holds.
import sys

from cog import BasePredictor


class Predictor(BasePredictor):
    def setup(self) -> None:
        line = "x" * 1023 + "\n"
        for _ in range(8 * 1024):
            sys.stdout.write(line)
        print("setup done")

    def predict(self) -> str:
        return "ok"
