# A sync predictor for the pool's process tests: large outputs, children that outlive a
# prediction, files of its own, file objects, MemoryError, memory it keeps.
import io
import os
import subprocess
import tempfile
import time
from typing import Any

from cog import BasePredictor, Input, Path

_KEPT = []  # memory a leaky model never gives back


class Predictor(BasePredictor):
    def predict(
        self,
        big_mb: float = Input(default=0.0, ge=0),
        child: bool = False,
        own_file_in: str = "",
        file_object: bool = False,
        memory_error: bool = False,
        leak_mb: int = Input(default=0, ge=0),
        sleep_s: float = Input(default=0.0, ge=0),
        say: str = "",
        text: str = "",
    ) -> Any:
        if say:
            print(say)
        if text:
            return len(text)
        if memory_error:
            raise MemoryError()
        if leak_mb:
            _KEPT.append(bytearray(os.urandom(1)) * (leak_mb * 1024 * 1024))
        if child:
            # A grandchild of the pool, in the runner's process group: it must not outlive it.
            proc = subprocess.Popen(["sleep", "300"])
            time.sleep(sleep_s)
            return str(proc.pid)
        if own_file_in:
            # The model's own file, in a directory that happens to be named like a spill dir.
            directory = os.path.join(own_file_in, "cog-output-mine")
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, "keep.txt")
            with open(path, "w") as f:
                f.write("mine")
            return Path(path)
        if file_object:
            return io.BytesIO(b"spilled by the runner")
        time.sleep(sleep_s)
        if big_mb:
            return "x" * int(big_mb * 1024 * 1024)
        return "ok"
