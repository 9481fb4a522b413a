"""bench/cog_compat.py's own pieces (the script itself needs a Cog venv and is not run in CI):
every case names a real model, the model directory it builds, and what it compares."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from coglet.predictor import load_predictor

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "cog_compat.py"


@pytest.fixture(scope="module")
def compat() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_cog_compat", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_cog_compat"] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


def test_every_case_names_a_model_that_loads(
    compat: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(compat.MODELS)
    for case in compat.CASES:
        loaded = load_predictor(case.ref)
        assert loaded.ref == case.ref


def test_model_dir_holds_the_module_and_a_cog_yaml(compat: ModuleType, tmp_path: Path) -> None:
    case = compat.Case("t", "errors.py:SlowSetup", [], environment=["COG_SETUP_TIMEOUT=1"])
    directory = Path(compat.model_dir_for(case, str(tmp_path)))
    assert (directory / "errors.py").exists()
    cog_yaml = yaml.safe_load((directory / "cog.yaml").read_text())
    assert cog_yaml == {"predict": "errors.py:SlowSetup", "environment": ["COG_SETUP_TIMEOUT=1"]}


def test_summaries_compare_what_both_servers_share(compat: ModuleType) -> None:
    # A 422 is compared by its code only: each server words its own detail.
    assert compat.summarize(422, {"detail": [{"msg": "ours"}]}) == {"http": 422}
    body = {"status": "failed", "output": None, "error": "x", "id": "p1", "logs": "..."}
    assert compat.summarize(200, body) == {
        "http": 200,
        "status": "failed",
        "output": None,
        "error": "x",
    }
    health = {"status": "SETUP_FAILED", "setup": {"status": "failed", "logs": "a\nlast\n"}}
    assert compat.summarize_health(health) == {
        "status": "SETUP_FAILED",
        "setup": "failed",
        "setup_last_log_line": "last",
        "user_healthcheck_error": None,
    }
