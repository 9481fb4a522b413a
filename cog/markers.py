"""``cog.Opaque`` and ``cog.ExperimentalFeatureWarning``: names Cog 0.23 models import."""

from __future__ import annotations

__all__ = ["ExperimentalFeatureWarning", "Opaque"]


class _OpaqueMarker:
    """``Annotated[T, cog.Opaque]``: take ``T`` as an opaque JSON object (no type checks, no
    coder), as Cog 0.23 does."""

    def __repr__(self) -> str:
        return "cog.Opaque"


Opaque = _OpaqueMarker()


class ExperimentalFeatureWarning(FutureWarning):
    """Kept for models that still filter it (``warnings.filterwarnings("ignore",
    category=ExperimentalFeatureWarning)``); nothing here emits it any more, as in Cog 0.23."""
