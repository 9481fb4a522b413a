"""``from cog.coder import json_coder`` (issue 9): ``dict[str, Any]`` inputs and outputs.

Kept apart from shapes.py: Cog 0.23.1 itself has no ``cog.coder.json_coder`` (older Cog
releases did), so this module does not import under it.
"""

from typing import Any

from cog import BasePredictor
from cog.coder import json_coder  # noqa: F401  (importing json_coder registers it)


class JsonDicts(BasePredictor):
    def predict(self, data: dict[str, Any]) -> dict[str, Any]:
        return {"keys": sorted(data), "echo": data}
