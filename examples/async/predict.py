"""An async model: waits (as if on a remote call or a GPU queue), then reverses the text."""

import asyncio

from cog import BasePredictor, Input


class Predictor(BasePredictor):
    async def setup(self) -> None:
        # Anything bound to the event loop (clients, queues) is made here, on the loop that
        # will run the predictions.
        self.in_flight = 0

    async def predict(
        self,
        text: str = Input(description="Text to reverse"),
        delay_ms: int = Input(description="Simulated work", default=100, ge=0, le=60000),
    ) -> str:
        self.in_flight += 1
        try:
            print(f"working on {text!r} ({self.in_flight} in flight)")
            await asyncio.sleep(delay_ms / 1000)
            return text[::-1]
        finally:
            self.in_flight -= 1
