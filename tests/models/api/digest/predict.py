# Large inputs end to end: says what it was given (sizes and SHA-256s), never echoes it.
import hashlib
import json
from typing import List

from cog import BasePredictor, Input, Path


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Predictor(BasePredictor):
    def predict(
        self,
        data: Path = Input(description="a file, usually a data: URI"),
        extras: List[Path] = Input(default=[]),
        text: str = Input(default=""),
        word: str = Input(default="a", regex="^[a-z]+$"),
    ) -> str:
        with open(data, "rb") as f:
            content = f.read()
        extra_digests = []
        for path in extras:
            with open(path, "rb") as f:
                extra_digests.append(_digest(f.read()))
        return json.dumps(
            {
                "data": [len(content), _digest(content)],
                "extras": extra_digests,
                "text": [len(text), _digest(text.encode())],
                "word": len(word),
            }
        )
