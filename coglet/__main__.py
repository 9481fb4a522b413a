"""``python -m coglet --working-dir DIR``: one runner process (see coglet.runner)."""

from __future__ import annotations

import sys

from coglet.runner import main

if __name__ == "__main__":
    sys.exit(main())
