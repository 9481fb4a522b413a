"""Base classes model authors subclass."""

from __future__ import annotations

from typing import Any

from cog.scope import Scope, current_scope

__all__ = ["BasePredictor", "BaseRunner"]


class _ScopeAccess:
    """``self.scope`` and ``self.record_metric()`` inside predict()/run(), as in Cog 0.23."""

    @property
    def scope(self) -> Scope:
        """The scope of the prediction running now (``cog.current_scope()``)."""
        return current_scope()

    def record_metric(self, key: str, value: Any, mode: str = "replace") -> None:
        """Record a metric of the prediction running now."""
        current_scope().record_metric(key, value, mode)


class BasePredictor(_ScopeAccess):
    """A Cog predictor: ``setup()`` once, then ``predict(**inputs)`` per prediction."""

    def setup(self, weights: Any = None) -> None:
        """Load the model; called once before any prediction. ``weights`` is optional."""

    def predict(self, **kwargs: Any) -> Any:
        """Run one prediction; subclasses declare typed parameters and a return type."""
        raise NotImplementedError("predict() must be implemented by the predictor")


class BaseRunner(_ScopeAccess):
    """The newer spelling of a predictor: ``setup()`` once, then ``run(**inputs)``."""

    def setup(self, weights: Any = None) -> None:
        """Load the model; called once before any prediction. ``weights`` is optional."""

    def run(self, **kwargs: Any) -> Any:
        """Run one prediction; subclasses declare typed parameters and a return type."""
        raise NotImplementedError("run() must be implemented by the runner")
