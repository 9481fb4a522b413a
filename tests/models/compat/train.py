"""Trainings (cog.yaml train:): a function, and a class with setup() and train().

Each returns a BaseModel with a Path field, as fine-tuning models do.
"""

import os
import tempfile
from typing import AsyncIterator, Iterator

from cog import BaseModel, BasePredictor, Input, Path


class TrainingOutput(BaseModel):
    weights: Path
    steps: int


def _write_weights(text: str) -> Path:
    directory = tempfile.mkdtemp(prefix="train-test-")
    path = os.path.join(directory, "weights.txt")
    with open(path, "w") as f:
        f.write(text)
    return Path(path)


def train(
    steps: int = Input(default=2, ge=1, description="training steps"),
    mode: str = Input(default="lora", choices=["lora", "full"]),
) -> TrainingOutput:
    print(f"training {steps} steps ({mode})")
    if steps == 13:
        raise ValueError("unlucky step count")
    return TrainingOutput(weights=_write_weights(f"{mode}:{steps}"), steps=steps)


class Trainer:
    def setup(self) -> None:
        self.base = "base-weights"

    def train(self, steps: int = 1) -> TrainingOutput:
        return TrainingOutput(weights=_write_weights(f"{self.base}+{steps}"), steps=steps)


class Predictor(BasePredictor):
    """The predict side of the same model."""

    def predict(self, text: str = "x", mode: str = Input(default="a", choices=["a", "b"])) -> str:
        return f"predicted {text}"


class Streamer(BasePredictor):
    def predict(self) -> Iterator[str]:
        yield "x"


async def async_train(steps: int = 1) -> TrainingOutput:
    return TrainingOutput(weights=_write_weights("async"), steps=steps)


class BrokenTrainer:
    def setup(self) -> None:
        raise RuntimeError("base weights missing")

    def train(self, steps: int = 1) -> TrainingOutput:
        raise NotImplementedError


class AsyncSetupTrainer:
    async def setup(self) -> None:
        print("async trainer setup")
        self.base = "async-base"

    def train(self, steps: int = 1) -> TrainingOutput:
        return TrainingOutput(weights=_write_weights(f"{self.base}+{steps}"), steps=steps)


class CountingTrainer:
    """setup() fails until the file named by TRAINER_READY exists; counts its runs."""

    setups = 0

    def setup(self) -> None:
        CountingTrainer.setups += 1
        print(f"trainer setup #{CountingTrainer.setups}")
        if not os.path.exists(os.environ.get("TRAINER_READY", "/nonexistent")):
            raise RuntimeError("base weights missing")

    def train(self, steps: int = 1) -> TrainingOutput:
        return TrainingOutput(
            weights=_write_weights(f"setups={CountingTrainer.setups}"), steps=steps
        )


async def async_train_fails(steps: int = 1) -> TrainingOutput:
    raise ValueError("async training failed here")


class AsyncPredictor(BasePredictor):
    async def predict(self) -> str:
        return "async predicted"


async def slow_async_train(seconds: float = 3600.0) -> TrainingOutput:
    import asyncio

    print("async training started")
    await asyncio.sleep(seconds)
    return TrainingOutput(weights=_write_weights("slow"), steps=1)


async def async_gen_train(n: int = 3) -> AsyncIterator[str]:
    for i in range(n):
        yield f"epoch{i}"
