"""Fixture predictors whose definition or setup fails."""

import os
import sys

from cog import BasePredictor


class SetupRaises(BasePredictor):
    def setup(self) -> None:
        print("loading weights")
        raise RuntimeError("weights are missing")

    def predict(self) -> str:
        return "never"


class SetupExits(BasePredictor):
    def setup(self) -> None:
        print("leaving abruptly")
        sys.stdout.flush()
        os._exit(7)

    def predict(self) -> str:
        return "never"


class MissingAnnotation(BasePredictor):
    def predict(self, s) -> str:  # noqa: ANN001 - the point of this fixture
        return s
