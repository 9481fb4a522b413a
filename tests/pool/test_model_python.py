"""`model.python`: runners use the model's own interpreter, and cog/coglet import there.

Scenario: make a bare virtualenv of an older CPython (no packages at all, not even pip), point
`model.python` at it, start a pool, predict. The prediction must run under that interpreter,
inside that virtualenv, with `cog` from this project and nothing else of the pool's.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pool_helpers import PROJECT, make_config, running_pool

from coglet import protocol
from pool.prediction import Prediction, PredictionRequest

# pyenv on these machines carries CPython 3.8-3.13 (DESIGN §2).
OLD_PYTHON = "/root/.pyenv/versions/3.9.18/bin/python"



OUR_COG = os.path.realpath(PROJECT / "cog" / "__init__.py")


@pytest.fixture
def old_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "model-venv"
    subprocess.run([OLD_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
    return venv


async def test_runner_uses_the_models_own_interpreter(tmp_path: Path, old_venv: Path) -> None:
    python = old_venv / "bin" / "python"
    config = make_config(tmp_path, model="interp", model__python=str(python))
    async with running_pool(config) as manager:
        prediction: Prediction = await manager.submit(PredictionRequest(id=None, input={}))
        await prediction.wait(30)
        assert prediction.status == protocol.STATUS_SUCCEEDED, prediction.error
        version, prefix, cog_file, leaked = prediction.output.split(" ")
        assert version == "3.9"
        assert prefix == str(old_venv)
        assert cog_file == OUR_COG
        # Only cog and coglet are added: the pool's packages and dependencies stay out.
        assert leaked == "-"
