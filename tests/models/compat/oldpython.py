"""The issue-9 shapes spelled for CPython 3.9 (``typing.Union``, no ``X | Y``), with a
healthcheck and a trainer: loaded under the oldest and newest Python we support."""

from typing import Any, Dict, List, Literal, Optional, Union

import cog
from cog import BaseModel, BasePredictor, Input, Path, Secret
from cog.coder import json_coder  # noqa: F401


class Result(BaseModel):
    weights: Path


class Predictor(BasePredictor):
    @cog.streaming
    def predict(
        self,
        u: Union[str, float, None] = Input(default=None),
        rows: List[List[float]] = Input(default=[[1.5]]),
        key: Secret = Input(default=None),
        mode: Literal["a", "b"] = "a",
        data: Dict[str, Any] = Input(default={}),
    ) -> List[List[float]]:
        print(f"u={u!r} key={key!r} mode={mode} data={data}")
        return rows

    def healthcheck(self) -> bool:
        return False


def train(steps: Optional[int] = None) -> Result:
    path = Path("/tmp") / f"oldpython-train-{steps}.txt"
    path.write_text(str(steps))
    return Result(weights=path)
