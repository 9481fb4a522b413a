"""Stand-in for sentence-transformers: the calls predict.py makes, with a tiny encoder.

Like the real one, a model directory's modules.json names the pipeline (the packaged model
ends with Normalize); the "encoder" hashes character trigrams into DIMENSIONS buckets, so equal
sentences get equal vectors and different ones (almost always) differ.
"""

import hashlib
import json
import math
import os

DIMENSIONS = 8


class Transformer:
    pass


class Pooling:
    pass


class Normalize:
    pass


_MODULES = {
    "sentence_transformers.models.Transformer": Transformer,
    "sentence_transformers.models.Pooling": Pooling,
    "sentence_transformers.models.Normalize": Normalize,
}


class Matrix(list):
    """What encode(convert_to_numpy=True) hands back, as far as predict.py uses it."""

    def tolist(self):
        return [list(row) for row in self]


def _unit(row):
    norm = math.sqrt(sum(x * x for x in row))
    return [x / norm for x in row] if norm else row


class SentenceTransformer:
    def __init__(self, model_name_or_path, device=None, local_files_only=False):
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            if os.environ.get(name) != "1":
                raise RuntimeError(f"{name} is not 1: the model would try the hub")
        if not local_files_only:
            raise RuntimeError("local_files_only is not set: the model would try the hub")
        with open(os.path.join(model_name_or_path, "modules.json")) as f:
            self._modules = [_MODULES[m["type"]]() for m in json.load(f)]
        self.device = device or "cpu"

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, index):
        return self._modules[index]

    def __delitem__(self, index):
        del self._modules[index]

    def get_sentence_embedding_dimension(self):
        return DIMENSIONS

    def encode(
        self,
        sentences,
        batch_size=32,
        normalize_embeddings=False,
        convert_to_numpy=True,
        show_progress_bar=None,
    ):
        if not isinstance(sentences, list) or batch_size < 1 or not convert_to_numpy:
            raise TypeError("encode: a list of sentences, batch_size >= 1, numpy output")
        rows = Matrix()
        for sentence in sentences:
            row = [0.0] * DIMENSIONS
            text = f"  {sentence} "
            for i in range(len(text) - 2):
                digest = hashlib.sha256(text[i : i + 3].encode()).digest()
                row[digest[0] % DIMENSIONS] += 1.0 + digest[1] / 255
            if normalize_embeddings or any(isinstance(m, Normalize) for m in self._modules):
                row = _unit(row)
            rows.append(row)
        return rows
