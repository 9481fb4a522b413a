from typing import List, Optional

from cog import BasePredictor, File, Input, Path, Secret


class Predictor(BasePredictor):
    def predict(
        self,
        text: str = Input(description="Text", min_length=1, max_length=100, regex="^[a-z ]+$"),
        count: int = Input(default=3, ge=1, le=10, description="How many"),
        ratio: float = Input(default=2, ge=0.5),
        plain: str = "hello",
        enabled: bool = True,
        image: Path = Input(description="An image"),
        legacy: File = Input(description="old style"),
        token: Secret = Input(default="abc"),
        note: Optional[str] = None,
        maybe_paths: Optional[List[Path]] = None,
        numbers: List[int] = Input(default_factory=lambda: [1, 2], ge=0),
        words: list[str] = Input(description="Words"),
        old: str = Input(default="x", deprecated=True),
    ) -> str:
        return text
