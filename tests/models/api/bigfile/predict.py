# The large file output model: seeded random bytes of size_kb KiB, returned by path (the
# model's own file, which it may write again) or as a file object (the runner spills it).
import io
import os
import random
import tempfile
from typing import Any

from cog import BasePredictor, Input, Path


def content(size_kb: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size_kb << 10)


class Predictor(BasePredictor):
    def predict(
        self,
        size_kb: int = Input(default=4096, ge=0, le=1 << 20),
        seed: int = 0,
        as_object: bool = False,
        path: str = Input(default="", description="write the file here (else a temp file)"),
    ) -> Any:
        data = content(size_kb, seed)
        if as_object:
            buffer = io.BytesIO(data)
            buffer.name = "blob.bin"
            return buffer
        if path:
            target = path
        else:
            fd, target = tempfile.mkstemp(suffix=".bin")
            os.close(fd)
        with open(target, "wb") as f:
            f.write(data)
        return Path(target)
