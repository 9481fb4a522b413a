"""LoadedPredictor: setup, input preparation, outputs; and cog/coglet under 3.9 and 3.13."""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import cog
from coglet import protocol
from coglet.predictor import LoadedPredictor, encode_output, load_predictor
from coglet.validation import InputValidationError

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "models" / "schema"


@pytest.fixture
def fixtures_cwd(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(FIXTURES)
    monkeypatch.delenv("COG_WEIGHTS", raising=False)
    return FIXTURES


def load(name: str) -> LoadedPredictor:
    return load_predictor(f"sch_behaviour.py:{name}")


def base_input(tmp_path: Path) -> dict:
    (tmp_path / "in.png").write_bytes(b"png")
    (tmp_path / "doc.txt").write_bytes(b"document")
    return {"image": str(tmp_path / "in.png"), "doc": str(tmp_path / "doc.txt"), "token": "s3cr3t"}


def test_flags(fixtures_cwd: Path) -> None:
    p = load("Predictor")
    assert (p.is_async, p.is_iterator, p.is_concatenate) == (False, False, False)
    p = load("AsyncSetup")
    assert (p.is_async, p.is_iterator, p.is_concatenate) == (True, True, False)
    p = load("Streamer")
    assert (p.is_async, p.is_iterator, p.is_concatenate) == (False, True, True)
    p = load("Plain")
    assert (p.is_async, p.is_iterator, p.is_concatenate) == (False, True, False)


def test_setup_weights_none_without_env_or_dir(fixtures_cwd: Path) -> None:
    p = load("Predictor")
    assert p.setup() is None
    assert p.instance.weights is None


def test_setup_weights_from_env(fixtures_cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COG_WEIGHTS", "/data/weights.bin")
    p = load("Predictor")
    p.setup()
    assert p.instance.weights == cog.Path("/data/weights.bin")
    assert isinstance(p.instance.weights, cog.Path)
    monkeypatch.setenv("COG_WEIGHTS", "https://example.com/w.tar")
    p.setup()
    assert p.instance.weights == "https://example.com/w.tar"


def test_setup_weights_from_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COG_WEIGHTS", raising=False)
    (tmp_path / "sch_behaviour.py").write_text((FIXTURES / "sch_behaviour.py").read_text())
    (tmp_path / "weights").mkdir()
    monkeypatch.chdir(tmp_path)
    p = load("Predictor")
    p.setup()
    assert p.instance.weights == cog.Path("weights")


def test_async_setup_returns_awaitable(fixtures_cwd: Path) -> None:
    p = load("AsyncSetup")
    result = p.setup()
    assert inspect.isawaitable(result)
    asyncio.run(result)  # type: ignore[arg-type]
    assert p.instance.ready is True


def test_prepare_input_coerces_types(fixtures_cwd: Path, tmp_path: Path) -> None:
    p = load("Predictor")
    raw = {
        **base_input(tmp_path),
        "color": "green",
        "paths": [str(tmp_path / "a"), str(tmp_path / "b")],
        "scale": 2,
        "box": {"width": 3},
        "unknown": 1,
    }
    kwargs, warnings = p.prepare_input(raw)
    assert warnings == ["unknown input field ignored: 'unknown'"]
    assert isinstance(kwargs["image"], cog.Path) and str(kwargs["image"]) == raw["image"]
    assert kwargs["doc"].read() == b"document"
    kwargs["doc"].close()
    assert isinstance(kwargs["token"], cog.Secret)
    assert kwargs["token"].get_secret_value() == "s3cr3t"
    assert kwargs["color"] is kwargs["color"].__class__.GREEN
    assert all(isinstance(x, cog.Path) for x in kwargs["paths"])
    assert kwargs["scale"] == 2.0 and isinstance(kwargs["scale"], float)
    assert type(kwargs["box"]).__name__ == "Box" and kwargs["box"].width == 3
    assert kwargs["box"].label is None
    assert kwargs["note"] is None
    assert "unknown" not in kwargs


def test_prepare_input_rejects_invalid(fixtures_cwd: Path) -> None:
    p = load("Predictor")
    with pytest.raises(InputValidationError) as info:
        p.prepare_input({"color": "blue"})
    assert [e["field"] for e in info.value.errors] == ["image", "doc", "token", "color"]
    assert info.value.errors[3]["msg"] == (
        "invalid input value: color='blue' does not match choices ['red', 'green']"
    )


def test_defaults_are_fresh_per_prediction(fixtures_cwd: Path, tmp_path: Path) -> None:
    p = load("Predictor")
    first, _ = p.prepare_input(base_input(tmp_path))
    p.predict(first)  # appends to its `tags`
    assert first["tags"] == ["a", "mutated"]
    second, _ = p.prepare_input(base_input(tmp_path))
    assert second["tags"] == ["a"]
    assert second["paths"] == [] and second["paths"] is not first["paths"]
    assert second["seed"] == first["seed"] + 1  # default_factory runs per prediction
    assert second["color"].value == "red"
    assert second["scale"] == 1.0 and isinstance(second["scale"], float)
    for kwargs in (first, second):
        kwargs["doc"].close()


def test_predict_and_encode_output(fixtures_cwd: Path, tmp_path: Path) -> None:
    p = load("Predictor")
    kwargs, _ = p.prepare_input({**base_input(tmp_path), "box": {"width": 2, "label": "x"}})
    scope = cog.Scope()
    with cog.use_scope(scope):
        out = p.predict(kwargs)
    kwargs["doc"].close()
    assert scope.metrics == {"seen": 2}
    encoded = p.encode_output(out)
    assert encoded == {
        "path": {protocol.PATH_MARKER: str(tmp_path / "in.png")},
        "token": "**********",
        "color": "red",
        "boxes": [{"width": 2, "label": "x"}],
        "note": None,
    }
    assert json.loads(json.dumps(encoded)) == encoded


def test_encode_output_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert encode_output(cog.Path("rel.txt")) == {protocol.PATH_MARKER: str(tmp_path / "rel.txt")}
    assert encode_output(cog.Secret("x")) == "**********"
    assert encode_output({"a": (1, 2.5, None, True), 3: [cog.Secret("y")]}) == {
        "a": [1, 2.5, None, True],
        "3": ["**********"],
    }
    with pytest.raises(TypeError, match="cannot encode output of type object"):
        encode_output(object())


def test_an_output_dict_cannot_forge_a_path() -> None:
    # A model that echoes a client's dict must not make the pool read a file of its choice.
    forged = {"result": {protocol.PATH_MARKER: "/etc/hostname"}}
    with pytest.raises(TypeError, match="reserved"):
        encode_output(forged)


def test_encode_file_output_spills_to_a_temp_file(
    fixtures_cwd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # spill here, not into /tmp
    p = load("FileOut")
    encoded = p.encode_output(p.predict({}))
    path = encoded[protocol.PATH_MARKER]
    assert os.path.isabs(path)
    with open(path, "rb") as f:
        assert f.read() == b"payload"
    named = io.BytesIO(b"abc")
    named.name = "/somewhere/result.bin"  # type: ignore[attr-defined]
    spilled = encode_output(named)[protocol.PATH_MARKER]
    assert os.path.basename(spilled) == "result.bin"
    # Each spill gets its own directory, named so the pool knows it may remove it.
    assert os.path.dirname(os.path.dirname(spilled)) == str(tmp_path)
    assert os.path.basename(os.path.dirname(spilled)).startswith(protocol.SPILL_DIR_PREFIX)


async def test_async_iterator_predict(fixtures_cwd: Path) -> None:
    p = load("AsyncSetup")
    await p.setup()  # type: ignore[misc]
    kwargs, _ = p.prepare_input({"n": 3})
    items = [p.encode_output(x) async for x in p.predict(kwargs)]  # type: ignore[attr-defined]
    assert items == [0, 1, 2]


def test_function_and_runner_predictors(fixtures_cwd: Path) -> None:
    fn = load_predictor("sch_runner.py:predict")
    assert fn.setup() is None
    kwargs, _ = fn.prepare_input({"text": "ab"})
    assert fn.predict(kwargs) == "abab"
    runner = load_predictor("sch_runner.py:Runner")
    assert runner.is_async
    asyncio.run(runner.setup())  # type: ignore[arg-type]
    kwargs, _ = runner.prepare_input({"prompt": "hi"})
    assert asyncio.run(runner.predict(kwargs)) == "HI"  # type: ignore[arg-type]


# --- other interpreters ------------------------------------------------------------------------
SCRIPT = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
os.chdir(sys.argv[2])
from coglet.predictor import load_predictor
from coglet.validation import InputValidationError
import cog
p = load_predictor("predict.py:Predictor")
p.setup()
kwargs, warnings = p.prepare_input({"text": "hi", "token": "t", "count": 2, "color": "green"})
out = p.predict(kwargs)
try:
    p.prepare_input({"text": "hi", "token": "t", "count": 0})
    error = None
except InputValidationError as e:
    error = e.errors[0]["msg"]
scope = cog.Scope()
with cog.use_scope(scope):
    cog.current_scope().record_metric("m", 1)
from typing import Optional
class Result(cog.BaseModel):
    path: cog.Path
    note: Optional[str]
model = p.encode_output(Result(path=cog.Path("/x")))
print(json.dumps({
    "version": list(sys.version_info[:2]),
    "output": p.encode_output(out),
    "error": error,
    "secret": repr(kwargs["token"]),
    "color": kwargs["color"].value,
    "metrics": scope.metrics,
    "model": model,
    "schema_keys": sorted(p.openapi_schema()["components"]["schemas"]),
}))
"""

PYTHONS = {
    "3.9": "/root/.pyenv/versions/3.9.18/bin/python",
    "3.13": "/root/.pyenv/versions/3.13.0/bin/python",
}


@pytest.mark.parametrize("version", sorted(PYTHONS))
def test_loads_under_other_interpreters(version: str) -> None:
    python = PYTHONS[version]
    assert os.path.exists(python), f"{python} is required: the runner supports 3.9-3.13"
    result = subprocess.run(
        [python, "-I", "-c", SCRIPT, str(ROOT), str(FIXTURES / "basic")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["version"] == [int(x) for x in version.split(".")]
    assert report["output"] == "hi*2"
    assert report["error"] == "invalid input value: count=0 fails constraint >= 1"
    assert report["secret"] == "Secret('**********')"
    assert report["color"] == "green"
    assert report["metrics"] == {"m": 1}
    assert report["model"] == {"path": {protocol.PATH_MARKER: "/x"}, "note": None}
    assert "Input" in report["schema_keys"] and "color" in report["schema_keys"]


def test_same_schema_on_every_interpreter() -> None:
    script = (
        "import json, os, sys; sys.path.insert(0, sys.argv[1]); os.chdir(sys.argv[2]);"
        "from coglet.predictor import load_predictor;"
        "print(json.dumps(load_predictor('predict.py:Predictor').openapi_schema(),"
        " sort_keys=True))"
    )
    outputs = set()
    for python in [sys.executable, *PYTHONS.values()]:
        result = subprocess.run(
            [python, "-I", "-c", script, str(ROOT), str(FIXTURES / "basic")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        outputs.add(result.stdout)
    assert len(outputs) == 1
