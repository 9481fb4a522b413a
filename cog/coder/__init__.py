"""Custom coders: how a type Cog does not know becomes JSON and back (Cog's ``Coder`` API).

A model makes a type legal by defining (or importing) a ``Coder`` subclass whose ``factory``
answers for that type; the runner registers every ``Coder`` subclass found in the model's
module, or in a module it imports (``from cog.coder import json_coder``), before it checks
predict()'s types. Standard library only.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Dict, Optional, Set, Type

__all__ = ["Coder"]


class Coder:
    """Base class of a custom type's encoder/decoder.

    ``factory(tpe)`` returns a coder instance when it handles ``tpe``, else None;
    ``encode(value)`` turns a value into a JSON object, ``decode(obj)`` turns it back.
    """

    _coders: Set[Type[Coder]] = set()

    @staticmethod
    def register(coder: Type[Coder]) -> None:
        """Make ``coder`` available to :meth:`lookup`."""
        Coder._coders.add(coder)

    @staticmethod
    def lookup(tpe: Any) -> Optional[Coder]:
        """A coder for ``tpe`` from the registered ones, or None."""
        # Sorted by name: a set's order would make the choice between two matching coders
        # differ from one run to the next.
        for cls in sorted(Coder._coders, key=lambda c: (c.__module__, c.__qualname__)):
            try:
                found = cls.factory(tpe)
            except TypeError:  # issubclass() on a generic alias, in a coder's own check
                found = None
            if found is not None:
                return found
        return None

    @staticmethod
    @abstractmethod
    def factory(tpe: Type[Any]) -> Optional[Coder]:
        """A coder instance when this coder handles ``tpe``, else None."""

    @abstractmethod
    def encode(self, x: Any) -> Dict[str, Any]:
        """A value as a JSON-serializable dict."""

    @abstractmethod
    def decode(self, x: Dict[str, Any]) -> Any:
        """A JSON dict back into the value."""


from cog.coder import json_coder  # noqa: E402  (it subclasses Coder, defined above)

__all__ += ["json_coder"]
