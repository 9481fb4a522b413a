from enum import Enum
from typing import List, Optional

from cog import BasePredictor, Input, Path, Secret


class Color(str, Enum):
    RED = "red"
    GREEN = "green"


class Predictor(BasePredictor):
    def setup(self, weights: Optional[Path] = None) -> None:
        self.weights = weights

    def predict(
        self,
        text: str = Input(description="Text to echo"),
        count: int = Input(default=1, ge=1, le=10),
        scale: float = 1.5,
        flag: bool = False,
        image: Optional[Path] = None,
        token: Secret = Input(description="API token"),
        tags: List[str] = Input(default=["a"]),
        mode: str = Input(default="fast", choices=["fast", "slow"]),
        color: Color = Color.RED,
    ) -> str:
        return f"{text}*{count}"
