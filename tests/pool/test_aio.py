"""pool/aio.py: which event loop ``event_loop`` picks, and how a loop is named in the log."""

from __future__ import annotations

import asyncio
import sys

import pytest

from pool.aio import loop_factory, loop_name
from pool.errors import ConfigError


def made_by(event_loop: str) -> str:
    loop = loop_factory(event_loop)()
    try:
        return loop_name(loop)
    finally:
        loop.close()


def test_asyncio_is_the_standard_loop_whatever_policy_is_installed() -> None:
    # The suite may run with uvloop's policy installed (COGPOOL_TEST_LOOP=uvloop).
    assert made_by("asyncio") == "asyncio"


@pytest.mark.parametrize("event_loop", ["auto", "uvloop"])
def test_auto_and_uvloop_pick_uvloop_when_it_imports(event_loop: str) -> None:
    pytest.importorskip("uvloop")
    assert made_by(event_loop) == "uvloop"


def test_auto_falls_back_to_asyncio_when_uvloop_cannot_be_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert made_by("auto") == "asyncio"


def test_uvloop_asked_for_but_missing_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)
    with pytest.raises(ConfigError) as e:
        loop_factory("uvloop")
    assert e.value.key == "event_loop"
    assert "uvloop was asked for but cannot be imported" in str(e.value)
    assert "set event_loop to auto or asyncio" in str(e.value)


def test_an_unknown_loop_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown event loop 'trio'"):
        loop_factory("trio")


async def test_the_running_loop_is_named() -> None:
    running = asyncio.get_running_loop()
    expected = "uvloop" if type(running).__module__.startswith("uvloop") else "asyncio"
    assert loop_name() == expected == loop_name(running)
