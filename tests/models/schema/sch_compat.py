"""Schema fixtures for the shapes Cog 0.23 serves (issue 9)."""

from typing import Any, List, Literal, Optional, Union

from cog import BasePredictor, Input, Secret
from cog.coder import Coder, json_coder  # noqa: F401


class Point:
    pass


class PointCoder(Coder):
    @staticmethod
    def factory(tpe: Any) -> Optional["PointCoder"]:
        return PointCoder() if tpe is Point else None

    def encode(self, x: Any) -> dict:
        return {}

    def decode(self, x: dict) -> Any:
        return Point()


class Inputs(BasePredictor):
    def predict(
        self,
        u: str | float | None = Input(default=None, description="a union"),
        nums: list[int] | list[float] = Input(default=[1]),
        v: Union[int, str, dict] = 0,
        rows: List[List[float]] = Input(default=[[0, 1.5]]),
        key: Secret = Input(default=None),
        mode: Literal["fast", "slow"] = "fast",
        level: Optional[Literal[1, 2]] = None,
        data: dict[str, Any] = Input(default={}),
        p: Point = Input(description="a coder's type"),
    ) -> str:
        raise NotImplementedError


class NestedOut(BasePredictor):
    def predict(self) -> List[List[float]]:
        raise NotImplementedError


class UnionOut(BasePredictor):
    def predict(self) -> Union[str, int]:
        raise NotImplementedError


class CoderOut(BasePredictor):
    def predict(self) -> List[Point]:
        raise NotImplementedError
