"""Input and output shapes Cog 0.23 serves (issue 9): unions, nested lists, optional secrets,
Literal choices, a custom coder, @cog.streaming and BaseRunner.run().

Each predictor echoes what it received with the Python type names, so a test (or the
side-by-side script) sees the wire type the model got.
"""

from typing import Any, Iterator, List, Literal, Optional, Union

import cog
from cog import BasePredictor, BaseRunner, Input, Secret
from cog.coder import Coder


def _typed(value: Any) -> Any:
    """``value`` with each leaf as [type name, value]."""
    if isinstance(value, list):
        return [_typed(v) for v in value]
    if isinstance(value, Secret):
        return ["Secret", value.get_secret_value()]
    return [type(value).__name__, value]


class Unions(BasePredictor):
    def predict(
        self,
        u: str | float | None = Input(default=None),
        nums: list[int] | list[float] = Input(default=[1]),
        v: Union[int, str] = Input(default=0),
    ) -> str:
        return repr([_typed(u), _typed(nums), _typed(v)])


class Embeddings(BasePredictor):
    def predict(
        self, n: int = 2, rows: List[List[float]] = Input(default=[[0.5]])
    ) -> List[List[float]]:
        return [[float(i), float(i) / 2] for i in range(n)] + rows


class OptionalSecret(BasePredictor):
    def predict(self, key: Secret = Input(default=None)) -> str:
        return "no key" if key is None else f"key of length {len(key.get_secret_value())}"


class Choices(BasePredictor):
    def predict(self, mode: Literal["fast", "slow"] = "fast", level: Literal[1, 2, 3] = 1) -> str:
        return f"{mode}:{level}"


class Point:
    def __init__(self, x: float, y: float) -> None:
        self.x, self.y = x, y


class PointCoder(Coder):
    @staticmethod
    def factory(tpe: Any) -> Optional["PointCoder"]:
        return PointCoder() if tpe is Point else None

    def encode(self, x: Point) -> dict:
        return {"x": x.x, "y": x.y}

    def decode(self, x: dict) -> Point:
        return Point(float(x["x"]), float(x["y"]))


class Points(BasePredictor):
    def predict(self, p: Point) -> List[Point]:
        return [p, Point(p.y, p.x)]


class Streamer(BasePredictor):
    @cog.streaming
    def predict(self, n: int = 3) -> Iterator[str]:
        for i in range(n):
            yield f"token{i} "


class Runner(BaseRunner):
    def setup(self) -> None:
        self.greeting = "hello"

    def run(self, name: str = "world") -> str:
        return f"{self.greeting} {name}"
