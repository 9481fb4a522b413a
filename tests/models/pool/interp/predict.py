import os
import sys

from cog import BasePredictor, Input


class Predictor(BasePredictor):
    def predict(self, what: str = Input(default="version")) -> str:
        # Which interpreter serves the model, where cog was imported from, and whether the
        # pool's own packages leak onto the model's path.
        import importlib.util

        import cog

        leaked = [m for m in ("pool", "ingest", "aiohttp", "yaml") if importlib.util.find_spec(m)]
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        return f"{version} {sys.prefix} {os.path.realpath(cog.__file__)} {','.join(leaked) or '-'}"
