"""The Cog SDK: what a model's ``predict.py`` imports.

Standard library only; runs under the model's own interpreter (CPython 3.9-3.13).
"""

from __future__ import annotations

from cog.coder import Coder
from cog.decorators import concurrent, streaming
from cog.exceptions import CancelationException
from cog.input import FieldInfo, Input
from cog.markers import ExperimentalFeatureWarning, Opaque
from cog.model import BaseModel
from cog.predictor import BasePredictor, BaseRunner
from cog.scope import Scope, current_scope, emit_metric, use_scope
from cog.types import AsyncConcatenateIterator, ConcatenateIterator, File, Path, Secret

# The runtime's own version: cog and coglet ship with cog-pool (the pool reports it too).
__version__ = "0.1.0"

__all__ = [
    "AsyncConcatenateIterator",
    "BaseModel",
    "BasePredictor",
    "BaseRunner",
    "CancelationException",
    "Coder",
    "ConcatenateIterator",
    "ExperimentalFeatureWarning",
    "FieldInfo",
    "File",
    "Input",
    "Opaque",
    "Path",
    "Scope",
    "Secret",
    "__version__",
    "concurrent",
    "current_scope",
    "emit_metric",
    "streaming",
    "use_scope",
]
