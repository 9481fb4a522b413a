"""``python -m cogpool`` is ``cog-pool``."""

from cogpool.cli import main

raise SystemExit(main())
