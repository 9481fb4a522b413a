"""The pool tests import the project from the checkout (it is not pip-installed into .venv)."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture
async def receiver() -> AsyncIterator[Any]:
    """A webhook receiver (test_api_e2e.Receiver) listening on a free loopback port."""
    from test_api_e2e import listening_receiver

    async with listening_receiver() as rec:
        yield rec
