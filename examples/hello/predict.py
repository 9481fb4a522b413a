"""The smallest useful model: greets whoever it is given."""

from cog import BasePredictor, Input


class Predictor(BasePredictor):
    def setup(self) -> None:
        # Loading weights would go here; it runs once per runner, before any prediction.
        self.greeting = "hello "

    def predict(self, text: str = Input(description="Who to greet")) -> str:
        return self.greeting + text
