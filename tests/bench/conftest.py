"""Load bench/harness.py (a script, not a package) as the module ``bench_harness``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

HARNESS_PATH = Path(__file__).resolve().parents[2] / "bench" / "harness.py"


def _load_harness() -> ModuleType:
    if "bench_harness" in sys.modules:
        return sys.modules["bench_harness"]
    spec = importlib.util.spec_from_file_location("bench_harness", HARNESS_PATH)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {HARNESS_PATH}")
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve their module through sys.modules while the class is built.
    sys.modules["bench_harness"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def harness() -> ModuleType:
    return _load_harness()
