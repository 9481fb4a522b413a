"""Cog 0.23's new spelling: ``run: "runner.py:Runner"`` in cog.yaml."""

from cog import BaseRunner


class Runner(BaseRunner):
    def setup(self) -> None:
        self.prefix = "ran"

    def run(self, text: str = "x") -> str:
        return f"{self.prefix} {text}"
