"""A token stream, like a language model's: echoes the prompt's words one at a time.

``@cog.streaming`` lets a client ask for Server-Sent Events (``Accept: text/event-stream``) and
read each token as it is yielded."""

import time

import cog
from cog import BasePredictor, ConcatenateIterator, Input


class Predictor(BasePredictor):
    @cog.streaming
    def predict(
        self,
        prompt: str = Input(description="Words to stream back"),
        max_tokens: int = Input(description="How many tokens to emit", default=16, ge=1, le=1024),
        delay_ms: int = Input(description="Pause before each token", default=0, ge=0, le=5000),
    ) -> ConcatenateIterator[str]:
        words = prompt.split() or ["..."]
        for i in range(max_tokens):
            if delay_ms:
                time.sleep(delay_ms / 1000)
            yield words[i % len(words)] + " "
