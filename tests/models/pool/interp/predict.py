import os
import sys

from cog import BasePredictor, Input


class Predictor(BasePredictor):
    def predict(self, what: str = Input(default="version")) -> str:
        # Which interpreter serves the model, and where cog was imported from.
        import cog

        return f"{sys.version_info[0]}.{sys.version_info[1]} {sys.prefix} {os.path.realpath(cog.__file__)}"
