"""``from cog.coder import json_coder``: ``dict[str, Any]`` and dict subclasses as JSON objects."""

from __future__ import annotations

import typing
from typing import Any, Dict, Optional, Type

from cog.coder import Coder

__all__ = ["JsonCoder"]


class JsonCoder(Coder):
    """Passes JSON objects through unchanged."""

    @staticmethod
    def factory(cls: Type[Any]) -> Optional[Coder]:
        if typing.get_origin(cls) in (dict, Dict):
            args = typing.get_args(cls)
            if args and args[0] is str:
                return JsonCoder()
        if isinstance(cls, type) and issubclass(cls, dict):
            return JsonCoder()
        return None

    def encode(self, x: Any) -> Dict[str, Any]:
        return typing.cast(Dict[str, Any], x)

    def decode(self, x: Dict[str, Any]) -> Any:
        return x
