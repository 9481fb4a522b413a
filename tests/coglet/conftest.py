"""Make the project importable when pytest runs from the repository root.

The project is not installed into .venv (no `pip install -e .`), and `.venv/bin/pytest`
does not put the cwd on sys.path.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
