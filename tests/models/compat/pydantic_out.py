"""A model whose output is its own pydantic model (Cog 0.23 serves it); pydantic is the
model environment's, never coglet's."""

from typing import List, Optional

from pydantic import BaseModel, ConfigDict

from cog import BasePredictor, Path


class Output(BaseModel):
    # cog.Path has no pydantic schema (in Cog 0.23 neither): allowed as an arbitrary type.
    model_config = ConfigDict(arbitrary_types_allowed=True)

    text: str
    scores: List[float]
    file: Path
    note: Optional[str] = None


class Predictor(BasePredictor):
    def predict(self, text: str = "hi") -> Output:
        path = Path("/tmp") / "pydantic-out.txt"
        path.write_text(text)
        return Output(text=text.upper(), scores=[0.5, 1], file=path)
