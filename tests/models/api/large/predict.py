# The HTTP API's large-output model: strings and files of a few MiB (streamed responses).
import os
import tempfile
from typing import Any

from cog import BasePredictor, Input, Path

# Quotes, backslashes, control characters, non-ASCII and a non-BMP character: every escape.
PATTERN = 'a"b\\c\n\x01\u00e9\u4e2d\U0001f600 '


def text(size_kb: int, seed: str) -> str:
    unit = seed + PATTERN
    return (unit * ((size_kb << 10) // len(unit) + 1))[: size_kb << 10]


class Predictor(BasePredictor):
    def predict(
        self,
        kind: str = Input(default="nested", choices=["string", "file", "nested"]),
        size_kb: int = Input(default=3072, ge=1, le=65536),
    ) -> Any:
        if kind == "string":
            return text(size_kb, "s")
        fd, path = tempfile.mkstemp(suffix=".txt")
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(range(256)) * ((size_kb << 10) // 256 + 1))
        if kind == "file":
            return Path(path)
        return {
            "big": text(size_kb, "n"),
            "parts": [text(size_kb, "p"), "small", 1, 2.5, None, True, {"k": text(8, "k")}],
            "file": Path(path),
        }
