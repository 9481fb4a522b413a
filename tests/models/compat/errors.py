"""Predictors that fail in each way Cog names differently (issue 9, error text)."""

from typing import AsyncIterator, Iterator

from cog import BasePredictor


class Sync(BasePredictor):
    def predict(self, kind: str = "value") -> str:
        if kind == "value":
            raise ValueError("this is a value error")
        if kind == "exit":
            raise SystemExit(1)
        if kind == "empty":
            raise RuntimeError()
        return "ok"


class Gen(BasePredictor):
    def predict(self, fail_at: int = 1) -> Iterator[str]:
        for i in range(3):
            if i == fail_at:
                raise RuntimeError(f"failed at item {i}")
            yield f"item{i}"


class AsyncErr(BasePredictor):
    async def predict(self, kind: str = "value") -> str:
        raise ValueError("async value error")


class AsyncGen(BasePredictor):
    async def predict(self) -> AsyncIterator[str]:
        yield "first"
        raise RuntimeError("async generator failed")


class SlowSetup(BasePredictor):
    """setup() takes SLOW_SETUP_S seconds (default: longer than any test waits)."""

    def setup(self) -> None:
        import os
        import time

        print("setup begins")
        time.sleep(float(os.environ.get("SLOW_SETUP_S", "3600")))

    def predict(self) -> str:
        return "ready"
