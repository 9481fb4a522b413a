"""``python -m pool`` is ``cog-pool``."""

from pool.cli import main

raise SystemExit(main())
