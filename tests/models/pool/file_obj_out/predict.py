# Returns a file object (Cog's File output): the runner copies it to a temporary file, the
# pool encodes it and then removes that copy.
import io

from cog import BasePredictor, File


class Predictor(BasePredictor):
    def predict(self, text: str = "hello") -> File:
        buffer = io.BytesIO(text.encode())
        buffer.name = "greeting.txt"
        return buffer
