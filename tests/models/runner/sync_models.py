"""Sync fixture predictors for the runner's protocol tests (tests/coglet/test_runner*.py)."""

import logging
import os
import sys
import threading
import time
from typing import Iterator

from cog import BasePredictor, Input, current_scope


class Hello(BasePredictor):
    def setup(self) -> None:
        print("setup says hi")
        logging.getLogger("hello").info("setup logged")

    def predict(self, text: str = Input(description="who to greet")) -> str:
        return "hello " + text


class Printer(BasePredictor):
    """Prints, logs and draws a progress bar, then returns right after a last print."""

    def predict(self, n: int = Input(default=3)) -> str:
        for i in range(n):
            print(f"line {i}")
        logging.getLogger("printer").info("an info record")
        sys.stderr.write("\r 50%|#####     |")
        sys.stderr.write("\r100%|##########|\n")
        print("last words", end="")  # no newline, and nothing after it but return
        return "done"


class FdWriter(BasePredictor):
    """Writes below Python (fd 1) and at Python level."""

    def predict(self, text: str) -> str:
        os.write(1, f"fd-level {text}\n".encode())
        print(f"python-level {text}")
        return text


class ThreadPrinter(BasePredictor):
    """Prints from a thread it starts (a thread has an empty context)."""

    def predict(self, text: str) -> str:
        t = threading.Thread(target=print, args=(f"from a thread: {text}",))
        t.start()
        t.join()
        return text


class Failing(BasePredictor):
    def predict(self, text: str) -> str:
        print("about to fail")
        raise ValueError(f"bad text: {text}")


class Sleeper(BasePredictor):
    """Sleeps (a blocking C call) until canceled."""

    def predict(self, seconds: float = Input(default=120.0)) -> str:
        print("sleeping")
        time.sleep(seconds)
        return "woke up"


class Spinner(BasePredictor):
    """Spins in pure Python until canceled; records that the cancel arrived."""

    def predict(self, seconds: float = Input(default=120.0)) -> str:
        print("spinning")
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                pass
        except BaseException as e:
            print(f"interrupted by {type(e).__name__}")
            raise
        return "spun out"


class ScopeEcho(BasePredictor):
    def predict(self, key: str) -> str:
        scope = current_scope()
        scope.record_metric("tokens", 42)
        return scope.context.get(key, "<missing>")


class Numbers(BasePredictor):
    def predict(self, a: int = Input(ge=1, le=10), b: float = Input(default=0.5)) -> float:
        return a + b


class Gated(BasePredictor):
    """Yields one item, then waits for the parent's ack-<i> file before the next."""

    def predict(self, gate_dir: str, n: int = Input(default=3)) -> Iterator[str]:
        for i in range(n):
            print(f"yielding {i}")
            yield f"item-{i}"
            _wait_for_file(os.path.join(gate_dir, f"ack-{i}"))


class Burst(BasePredictor):
    """Yields many items as fast as it can: they must all arrive, in order."""

    def predict(self, n: int = Input(default=500)) -> Iterator[int]:
        yield from range(n)


class Empty(BasePredictor):
    def predict(self) -> Iterator[str]:
        yield from ()


def _wait_for_file(path: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path} after {timeout_s}s")
        time.sleep(0.002)
