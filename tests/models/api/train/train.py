"""A trainer returning a BaseModel with a Path field (the weights), as fine-tuning models do.

``steps == 13`` raises; ``hold_s`` sleeps in slices so a cancel lands while it trains.
"""

import os
import tempfile
import time

from cog import BaseModel, Input, Path


class TrainingOutput(BaseModel):
    weights: Path
    steps: int


def train(
    steps: int = Input(default=2, ge=1, description="training steps"),
    mode: str = Input(default="lora", choices=["lora", "full"]),
    hold_s: float = 0.0,
) -> TrainingOutput:
    print(f"training {steps} steps ({mode})")
    if steps == 13:
        raise ValueError("unlucky step count")
    deadline = time.monotonic() + hold_s
    while time.monotonic() < deadline:
        time.sleep(0.01)
    directory = tempfile.mkdtemp(prefix="train-test-")
    path = os.path.join(directory, "weights.txt")
    with open(path, "w") as f:
        f.write(f"{mode}:{steps}")
    return TrainingOutput(weights=Path(path), steps=steps)
