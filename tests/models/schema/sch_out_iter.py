from typing import AsyncIterator, Iterator

from cog import AsyncConcatenateIterator, BaseModel, BasePredictor, ConcatenateIterator, Path


class Frame(BaseModel):
    index: int
    image: Path


class Iter(BasePredictor):
    def predict(self, n: int = 3) -> Iterator[Path]:
        for i in range(n):
            yield Path(f"{i}.png")


class AsyncIter(BasePredictor):
    async def predict(self, n: int = 3) -> AsyncIterator[int]:
        for i in range(n):
            yield i


class Concat(BasePredictor):
    def predict(self, prompt: str) -> ConcatenateIterator[str]:
        yield from prompt.split()


class AsyncConcat(BasePredictor):
    async def predict(self, prompt: str) -> AsyncConcatenateIterator[str]:
        for word in prompt.split():
            yield word


class Frames(BasePredictor):
    def predict(self) -> Iterator[Frame]:
        yield Frame(index=0, image=Path("0.png"))
