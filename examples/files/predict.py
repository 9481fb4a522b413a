"""Files in and out: returns the text file it is given, upper-cased."""

import tempfile

from cog import BasePredictor, Input, Path


class Predictor(BasePredictor):
    def predict(self, file: Path = Input(description="A UTF-8 text file")) -> Path:
        text = file.read_text(encoding="utf-8")
        # Outputs go to a fresh temp dir, never into the model's directory.
        out = Path(tempfile.mkdtemp(prefix="upper-")) / f"upper-{file.name}"
        out.write_text(text.upper(), encoding="utf-8")
        return out
