from dataclasses import dataclass
from typing import Dict, List, Optional, TypedDict

from cog import BaseModel, BasePredictor, Input, Path


@dataclass
class Box:
    width: int
    height: int = 1
    label: Optional[str] = None


class Meta(TypedDict):
    author: str
    year: int


class Result(BaseModel):
    text: str
    score: float
    image: Path
    tags: List[str]
    extra: Optional[str]


class Predictor(BasePredictor):
    def predict(
        self,
        box: Box,
        meta: Meta = Input(description="Metadata"),
        weights: Dict[str, float] = Input(default_factory=dict),
        anything: dict = Input(default_factory=dict),
    ) -> Result:
        raise NotImplementedError
