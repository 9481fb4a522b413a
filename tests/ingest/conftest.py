"""Shared fixtures of the ingest tests."""

from __future__ import annotations

import os
import sys

# The project is not installed into .venv (no `pip install -e .`): make it importable when
# pytest is run as `.venv/bin/pytest tests/ingest` from the repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
