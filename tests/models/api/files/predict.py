# Reads Path inputs (one, and a list) and returns a Path holding what it read, upper-cased.
import os
import tempfile
from typing import List

from cog import BasePredictor, Input, Path


class Predictor(BasePredictor):
    def predict(
        self,
        doc: Path = Input(description="a text file"),
        extra: List[Path] = Input(default=[]),
    ) -> Path:
        parts = [doc.read_text()] + [p.read_text() for p in extra]
        names = [os.path.basename(str(doc))] + [os.path.basename(str(p)) for p in extra]
        print("read " + " ".join(names))
        out_dir = tempfile.mkdtemp()
        out = os.path.join(out_dir, "result.txt")
        with open(out, "w") as f:
            f.write("|".join(parts).upper())
        return Path(out)
