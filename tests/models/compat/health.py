"""Predictors with a user healthcheck(); the test steers it through the file named by
HEALTH_MODE_FILE: "ok", "false", "none", "raise" or "slow" (sleeps SLOW_CHECK_S seconds)."""

import os
import time

from cog import BasePredictor


def _mode() -> str:
    try:
        with open(os.environ["HEALTH_MODE_FILE"]) as f:
            return f.read().strip()
    except (KeyError, OSError):
        return "ok"


def _check() -> object:
    mode = _mode()
    if mode == "false":
        return False
    if mode == "none":
        return None
    if mode == "raise":
        raise RuntimeError("database unreachable")
    if mode == "slow":
        time.sleep(float(os.environ.get("SLOW_CHECK_S", "7")))
    print("healthcheck ran")  # the runner's log, never a prediction's
    return True


class SyncCheck(BasePredictor):
    def predict(self, sleep_s: float = 0.0) -> str:
        time.sleep(sleep_s)
        return "done"

    def healthcheck(self) -> bool:
        return _check()  # type: ignore[return-value]


class AsyncCheck(BasePredictor):
    async def predict(self) -> str:
        return "done"

    async def healthcheck(self) -> bool:
        return _check()  # type: ignore[return-value]


class NoCheck(BasePredictor):
    def predict(self) -> str:
        return "done"
