"""Base classes model authors subclass."""

from __future__ import annotations

from typing import Any

__all__ = ["BasePredictor", "BaseRunner"]


class BasePredictor:
    """A Cog predictor: ``setup()`` once, then ``predict(**inputs)`` per prediction."""

    def setup(self, weights: Any = None) -> None:
        """Load the model; called once before any prediction. ``weights`` is optional."""

    def predict(self, **kwargs: Any) -> Any:
        """Run one prediction; subclasses declare typed parameters and a return type."""
        raise NotImplementedError("predict() must be implemented by the predictor")


class BaseRunner:
    """The newer spelling of a predictor: ``setup()`` once, then ``run(**inputs)``."""

    def setup(self, weights: Any = None) -> None:
        """Load the model; called once before any prediction. ``weights`` is optional."""

    def run(self, **kwargs: Any) -> Any:
        """Run one prediction; subclasses declare typed parameters and a return type."""
        raise NotImplementedError("run() must be implemented by the runner")
