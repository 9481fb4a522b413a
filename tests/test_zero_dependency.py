"""cog/ and coglet/ run on the standard library alone, under CPython 3.9 through 3.13.

They are imported by the *model's* interpreter, which has none of the pool's packages: a
quiet dependency would only show up in production. So: an AST scan of every import, a real
runner started with only a copy of cog/ and coglet/ on an isolated ``sys.path`` (``-I -S``:
no site-packages at all), and real predictions under the oldest and newest Python we support.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.coglet.harness import RunnerHarness  # noqa: E402

PACKAGES = ("cog", "coglet")
MODELS = str(ROOT / "tests" / "models" / "runner")
PYTHONS = {
    "3.9": "/root/.pyenv/versions/3.9.18/bin/python",
    "3.13": "/root/.pyenv/versions/3.13.0/bin/python",
}
# Put the copied packages first, drop everything else that is not the stdlib, then run the
# runner as `python -m coglet` would.
BOOTSTRAP = """
import sys
sys.path[:] = [{lib!r}] + [p for p in sys.path if p and "site-packages" not in p]
assert not any("site-packages" in p for p in sys.path), sys.path
import runpy
sys.argv = ["coglet"] + sys.argv[1:]
runpy.run_module("coglet", run_name="__main__", alter_sys=True)
"""


def _imports(path: Path, *, dunder_import: bool = False) -> set[str]:
    """Top-level names of the absolute imports in one file (and of ``__import__("name")``
    calls, with ``dunder_import``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif dunder_import and isinstance(node, ast.Call):
            if getattr(node.func, "id", None) == "__import__" and node.args:
                if isinstance(node.args[0], ast.Constant):
                    names.add(str(node.args[0].value).split(".")[0])
    return names


def test_cog_and_coglet_import_only_the_stdlib_and_each_other() -> None:
    allowed = set(sys.stdlib_module_names) | set(PACKAGES)
    offenders = {}
    files = [f for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 5  # the scan really looked at the packages
    for path in files:
        bad = _imports(path) - allowed
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_the_scan_would_catch_a_third_party_import(tmp_path) -> None:
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("import os\nfrom aiohttp import web\nimport yaml.loader\n")
    assert _imports(sneaky) - set(sys.stdlib_module_names) == {"aiohttp", "yaml"}


@pytest.fixture
def isolated_lib(tmp_path) -> Path:
    """A directory holding copies of cog/ and coglet/ and nothing else."""
    lib = tmp_path / "lib"
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, lib / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return lib


def test_every_module_imports_in_an_isolated_interpreter(isolated_lib) -> None:
    code = (
        "import sys, pkgutil, importlib\n"
        f"sys.path[:] = [{str(isolated_lib)!r}] + "
        "[p for p in sys.path if p and 'site-packages' not in p]\n"
        "import cog, coglet\n"
        "names = ['cog', 'coglet']\n"
        "for pkg in (cog, coglet):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if m.name != 'coglet.__main__':\n"
        "            importlib.import_module(m.name); names.append(m.name)\n"
        "print(' '.join(sorted(names)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code],
        cwd=str(isolated_lib.parent),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    imported = out.stdout.split()
    assert {"cog", "coglet", "coglet.runner", "coglet.protocol", "coglet.predictor"} <= set(
        imported
    )


def test_a_real_prediction_with_only_the_stdlib(spawn_isolated) -> None:
    runner = spawn_isolated
    runner.wait_ready()
    runner.submit("iso-1", {"text": "stdlib"})
    assert runner.wait_done("iso-1").output == "hello stdlib"


@pytest.fixture
def spawn_isolated(isolated_lib):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    harness = RunnerHarness(
        MODELS,
        "sync_models.py:Hello",
        command=[sys.executable, "-I", "-S", "-c", BOOTSTRAP.format(lib=str(isolated_lib))],
        env=env,
    )
    harness.start()
    yield harness
    harness.close()


@pytest.mark.parametrize("version", sorted(PYTHONS))
def test_real_predictions_under_python(version: str, tmp_path) -> None:
    python = PYTHONS[version]
    assert os.path.exists(python), f"CPython {version} is expected at {python} (pyenv)"
    reported = subprocess.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    assert reported == version

    with RunnerHarness(MODELS, "sync_models.py:Gated", python=python) as runner:
        runner.wait_ready()
        (tmp_path / "ack-0").touch()
        (tmp_path / "ack-1").touch()
        runner.submit("it", {"gate_dir": str(tmp_path), "n": 2})
        state = runner.wait_done("it")
        assert state.output == ["item-0", "item-1"], (state.error, state.logs)
        assert "yielding 1\n" in state.logs

    with RunnerHarness(MODELS, "async_models.py:Overlap", python=python, max_concurrency=2) as r:
        r.wait_ready()
        r.submit("a", {"tag": "a", "want": 2})
        r.submit("b", {"tag": "b", "want": 2})
        assert [r.wait_done(i).status for i in ("a", "b")] == ["succeeded", "succeeded"]

    with RunnerHarness(MODELS, "sync_models.py:Sleeper", python=python) as runner:
        runner.wait_ready()
        runner.submit("sl", {"seconds": 120})
        runner.wait_for(
            lambda: "sleeping" in runner.predictions["sl"].logs, timeout_s=30, what="start"
        )
        runner.cancel("sl")
        assert runner.wait_done("sl").status == "canceled"
        assert runner.stop() == 0


@pytest.mark.parametrize("version", sorted(PYTHONS))
def test_cog_023_shapes_under_python(version: str) -> None:
    """Unions, nested lists, an optional Secret, Literal, json_coder, @cog.streaming, a
    healthcheck and a trainer (issue 9) load and run under the oldest and newest Python."""
    models = str(ROOT / "tests" / "models" / "compat")
    config = {
        "predictor_ref": "oldpython.py:Predictor",
        "max_concurrency": 1,
        "train_ref": "oldpython.py:train",
        "healthcheck_interval_s": 0.2,
    }
    with RunnerHarness(models, "", python=PYTHONS[version], config=config) as runner:
        result = runner.wait_ready()
        assert result["features"] == {"streaming": True, "training": True, "healthcheck": True}
        runner.submit("p", {"u": 1, "rows": [[1, 2.5]], "mode": "b", "data": {"k": [1]}})
        state = runner.wait_done("p")
        assert state.output == [[1.0, 2.5]], (state.error, state.logs)
        assert "u=1 key=None mode=b data={'k': [1]}\n" in state.logs
        runner.submit(
            "t", {"steps": 2}, body={"id": "t", "input": {"steps": 2}, "kind": "training"}
        )
        state = runner.wait_done("t")
        assert state.status == "succeeded", (state.error, state.logs)
        assert state.output["weights"]["__cog_path__"].endswith("oldpython-train-2.txt")
        runner.wait_for(
            lambda: os.path.exists(runner.path("health.json")), timeout_s=30, what="health.json"
        )
        health = json.loads(Path(runner.path("health.json")).read_text())
        assert health["error"] == "Healthcheck failed: user-defined healthcheck returned False"
