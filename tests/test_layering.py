"""The packages import downwards only: ``cogpool`` (the command line) -> ``ingest`` -> ``pool``.

``pool`` is the runtime; ``ingest`` (queue consumers) uses it through a typed port, and only
the ``cogpool`` application wires the two together. An AST scan of every import (also the
ones inside functions) keeps ``pool`` from reaching back up, and a fresh interpreter proves
that importing all of ``pool`` loads neither ``ingest`` nor ``cogpool``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_zero_dependency import _imports

ROOT = Path(__file__).resolve().parents[1]
UPPER = {"ingest", "cogpool"}


def _imported_packages(path: Path) -> set[str]:
    return _imports(path, dunder_import=True)


def test_no_module_of_pool_imports_ingest_or_cogpool():
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_packages(path) & UPPER)
        for path in sorted((ROOT / "pool").rglob("*.py"))
        if _imported_packages(path) & UPPER
    }
    assert offenders == {}


def test_the_scan_sees_an_import_inside_a_function(tmp_path):
    # The scan must not be blind to the lazy import pool/cli.py used to have.
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from ingest.submit import submit_main\n    import cogpool\n")
    assert _imported_packages(sample) >= UPPER


def test_importing_all_of_pool_loads_neither_ingest_nor_cogpool():
    modules = sorted(p.stem for p in (ROOT / "pool").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module('pool.' + m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ingest', 'cogpool')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
