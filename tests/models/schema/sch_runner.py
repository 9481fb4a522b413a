from cog import BaseRunner, Input


class Runner(BaseRunner):
    async def setup(self) -> None:
        self.ready = True

    async def run(self, prompt: str = Input(description="Prompt")) -> str:
        return prompt.upper()


def predict(text: str, times: int = 2) -> str:
    return text * times
