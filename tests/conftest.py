"""Suite-wide switches.

``COGPOOL_TEST_LOOP=uvloop`` (or ``asyncio``) runs the suite on that event loop: every async
test and fixture (pytest-asyncio takes its loops from the event loop policy set here), every
``asyncio.run`` in a test, and every pool a test starts as a process (through
``COG_POOL_EVENT_LOOP``). Unset: asyncio's own loop in the test process, and the pools'
default (``event_loop: auto``).
"""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

# pytest puts this directory (tests/) on sys.path for this file: tests/cog/ would then be
# found as a namespace package `cog` before the editable install's finder looks for the SDK.
# The repository root first: the real packages (cog, coglet, pool, ingest) win.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TEST_LOOP_ENV = "COGPOOL_TEST_LOOP"
TEST_LOOPS = ("asyncio", "uvloop")


def pytest_configure(config: pytest.Config) -> None:
    loop = os.environ.get(TEST_LOOP_ENV, "")
    if not loop:
        return
    if loop not in TEST_LOOPS:
        raise pytest.UsageError(f"{TEST_LOOP_ENV} must be one of {', '.join(TEST_LOOPS)}: {loop!r}")
    if loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    os.environ["COG_POOL_EVENT_LOOP"] = loop


def pytest_report_header(config: pytest.Config) -> str:
    return f"event loop: {os.environ.get(TEST_LOOP_ENV) or 'asyncio (pools: event_loop auto)'}"
