"""Make the project importable when pytest runs from the repository root; runner fixtures.

The project is not installed into .venv (no `pip install -e .`), and `.venv/bin/pytest`
does not put the cwd on sys.path.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

if TYPE_CHECKING:
    from tests.coglet.harness import RunnerHarness

RUNNER_MODELS = os.path.join(ROOT, "tests", "models", "runner")


@pytest.fixture
def spawn() -> Iterator[Callable[..., RunnerHarness]]:
    """Start runners: ``spawn("sync_models.py:Hello")``; each is killed and reaped at the end."""
    from tests.coglet.harness import RunnerHarness

    made: list[RunnerHarness] = []

    def _spawn(ref: str, *, model_dir: str = RUNNER_MODELS, **kwargs: Any) -> RunnerHarness:
        harness = RunnerHarness(model_dir, ref, **kwargs)
        made.append(harness)
        return harness.start()

    yield _spawn
    for harness in made:
        harness.close()
