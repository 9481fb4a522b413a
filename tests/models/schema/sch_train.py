"""Schema fixtures for trainings (cog.yaml train:): a function and a class."""

from typing import List

from cog import BaseModel, Input, Path


class TrainingResult(BaseModel):
    weights: Path
    losses: List[float]


def train(
    data: Path = Input(description="training data"),
    epochs: int = Input(default=3, ge=1, le=100),
    schedule: str = Input(default="cosine", choices=["cosine", "linear"]),
) -> TrainingResult:
    raise NotImplementedError


class Trainer:
    def setup(self) -> None:
        pass

    def train(self, steps: int = 10) -> Path:
        raise NotImplementedError
