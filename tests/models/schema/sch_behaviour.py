import io
from dataclasses import dataclass
from enum import Enum
from typing import AsyncIterator, Iterator, List, Optional

from cog import (
    BaseModel,
    BasePredictor,
    ConcatenateIterator,
    File,
    Input,
    Path,
    Secret,
    current_scope,
)

CALLS = {"factory": 0}


def make_seed() -> int:
    CALLS["factory"] += 1
    return CALLS["factory"]


class Color(str, Enum):
    RED = "red"
    GREEN = "green"


@dataclass
class Box:
    width: int
    label: Optional[str] = None


class Out(BaseModel):
    path: Path
    token: Secret
    color: Color
    boxes: List[Box]
    note: Optional[str]


class Predictor(BasePredictor):
    def setup(self, weights: Optional[Path] = None) -> None:
        self.weights = weights

    def predict(
        self,
        image: Path,
        doc: File,
        token: Secret,
        color: Color = Color.RED,
        paths: List[Path] = Input(default_factory=list),
        tags: List[str] = Input(default=["a"]),
        seed: int = Input(default_factory=make_seed),
        scale: float = 1,
        box: Optional[Box] = None,
        note: Optional[str] = None,
    ) -> Out:
        tags.append("mutated")
        current_scope().record_metric("seen", len(tags))
        return Out(path=image, token=token, color=color, boxes=[box] if box else [], note=note)


class AsyncSetup(BasePredictor):
    async def setup(self) -> None:
        self.ready = True

    async def predict(self, n: int = 2) -> AsyncIterator[int]:
        for i in range(n):
            yield i


class Streamer(BasePredictor):
    def predict(self, text: str) -> ConcatenateIterator[str]:
        yield from text.split()


class Plain(BasePredictor):
    def predict(self) -> Iterator[str]:
        yield "x"


class FileOut(BasePredictor):
    def predict(self) -> File:
        return io.BytesIO(b"payload")
