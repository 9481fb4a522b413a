from enum import Enum
from typing import List

from cog import BasePredictor, Input


class Color(str, Enum):
    RED = "red"
    GREEN = "green"


class Size(int, Enum):
    SMALL = 1
    LARGE = 2


class Predictor(BasePredictor):
    def predict(
        self,
        mode: str = Input(default="fast", choices=["fast", "slow"], description="Speed"),
        steps: int = Input(choices=[10, 20, 50]),
        color: Color = Color.GREEN,
        size: Size = Input(description="Size"),
        shade: str = Input(default=Color.RED, choices=[Color.RED, Color.GREEN]),
        modes: List[str] = Input(default=["a"], choices=["a", "b"]),
    ) -> str:
        return mode
