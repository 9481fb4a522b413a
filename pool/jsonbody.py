"""A request body with a huge string in it, parsed without one huge ``json.loads``.

A prediction whose input is a 72 MiB file as a ``data:`` URI arrives as a 96 MiB body. Parsed
whole, it is one ``json.loads`` (a single C call holding the GIL for 100+ ms, so the event loop
and ``/health-check`` wait for it even from a worker thread) that also builds a 96 MiB ``str``
beside the body's bytes. :func:`loads_large` finds the body's long string literals instead,
parses the small rest with placeholders where they were, and leaves each long literal a
read-only slice of the body (:class:`pool.jsonstream.RawText`): its ``data:`` URI is decoded to
a file from that slice, and the input echo in a response is written from it, a slice at a time.

How the long literals are found, with no Python step per string (a body may hold millions of
short ones): the body is looked at in windows of half the threshold, one ``bytes.find`` of
``"`` each; a window without a quote lies inside a run of at least that many quote-free bytes,
and the quotes around that run are found with ``rfind``/``find``. Such a run is taken only when
it is printable ASCII with no ``\\`` (so its bytes are its characters: no escape, no UTF-8 to
decode, and ``json.dumps`` writes it back unchanged) and it sits where a value does (a key, a
run between two strings, anything else is left to ``json.loads``).

Correctness does not rest on those guesses: the rest, with each run replaced by a placeholder
string (``"\\u0000<nonce>:<n>"``), must parse, and every placeholder must come back as a value.
A run that was not a string (say the numbers between two strings) leaves a backslash outside
any string, which no JSON parser accepts. Whenever anything fails (a truncated body, bad UTF-8,
a NaN, deep nesting, a placeholder not found) the caller parses the whole body its ordinary way,
so every error and every message is exactly what it was.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from pool.jsonstream import RawText

__all__ = ["LARGE_LITERAL_MIN_BYTES", "KeepAt", "at_input_value", "loads_large"]

LARGE_LITERAL_MIN_BYTES = 1 << 20
"""String literals at least this long are kept as slices of the body."""

_SCAN_SLICE = 1 << 20  # bytes per C call while checking a literal's bytes (the GIL is held)
# Printable ASCII but '"' and '\': a literal made only of these is kept raw. (Deleting them
# with bytes.translate and finding nothing left is ~4x faster than a regex search.)
_RAW_BYTES = bytes(b for b in range(0x20, 0x7F) if b not in b'"\\')
_WHITESPACE = b" \t\n\r"
_BEFORE_VALUE = frozenset(b"[,:")
_AFTER_VALUE = frozenset(b",]}")

KeepAt = Callable[[tuple[Any, ...]], bool]
"""Whether a long literal at this path (keys and list indexes from the top) stays raw; one
kept elsewhere is made a ``str`` (from its slice, one copy) before the value is returned."""


def at_input_value(path: tuple[Any, ...]) -> bool:
    """A prediction body's ``input.<name>`` or ``input.<name>[i]``: where file inputs and
    long string inputs are. Everything else (``context``, ``webhook``, ``id``, an input nested
    in an object) must be a real ``str`` where it is checked."""
    return len(path) in (2, 3) and path[0] == "input" and (len(path) == 2 or type(path[2]) is int)


def loads_large(
    raw: bytes | bytearray,
    loads: Callable[[str], Any],
    *,
    keep_at: KeepAt = at_input_value,
    min_bytes: int = LARGE_LITERAL_MIN_BYTES,
) -> tuple[bool, Any]:
    """``(True, value)``: ``raw`` parsed as ``loads(raw.decode("utf-8"))`` would parse it, with
    its long string literals at ``keep_at`` paths as :class:`RawText`; ``(False, None)`` when
    the body has none or anything is off: then the caller parses it whole, its ordinary way.

    Runs in a worker thread for a large body: every C call in it covers at most about
    ``min_bytes`` of the body, so the GIL is free between them.
    """
    if len(raw) < min_bytes:
        return False, None
    spans = _long_literals(raw, min_bytes)
    if not spans:
        return False, None
    nonce = os.urandom(8).hex()
    parts: list[bytes | bytearray] = []
    slots: dict[str, tuple[int, int]] = {}
    previous = 0
    for index, (start, end) in enumerate(spans):
        name = f"{nonce}:{index}"
        slots["\x00" + name] = (start, end)
        parts.append(raw[previous:start])
        parts.append(b"\\u0000" + name.encode("ascii"))
        previous = end
    parts.append(raw[previous:])
    try:
        value = loads(b"".join(parts).decode("utf-8"))
        found = _put_back(value, raw, slots, keep_at)
    except (ValueError, RecursionError):  # the caller's own parse gives the exact error
        return False, None
    if found != len(slots):
        return False, None
    return True, value


def _long_literals(raw: bytes | bytearray, min_bytes: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each quote-free run of at least ``min_bytes`` that looks like a
    string value made only of printable ASCII without ``\\``."""
    size = len(raw)
    step = max(1, min_bytes // 2)  # a run of 2*step bytes holds a whole window
    spans: list[tuple[int, int]] = []
    window = 0
    while window + step <= size:
        window_end = window + step
        if raw.find(b'"', window, window_end) != -1:
            window = window_end
            continue
        opening = raw.rfind(b'"', 0, window)
        closing = _find_quote(raw, window_end, step)
        if closing == -1:
            break  # the body ends inside a string: json.loads says how
        start, end = opening + 1, closing
        if (
            opening != -1
            and end - start >= min_bytes
            and _before(raw, opening) in _BEFORE_VALUE
            and _after(raw, closing + 1) in _AFTER_VALUE
            and _printable(raw, start, end)
        ):
            spans.append((start, end))
        window = closing + 1
    return spans


def _find_quote(raw: bytes | bytearray, start: int, step: int) -> int:
    """The first ``"`` at or after ``start``, looked for ``step`` bytes per call."""
    size = len(raw)
    while start < size:
        found = raw.find(b'"', start, start + step)
        if found != -1:
            return found
        start += step
    return -1


def _before(raw: bytes | bytearray, position: int) -> int:
    """The byte before ``position``, whitespace skipped (``[`` at the body's start)."""
    position -= 1
    while position >= 0 and raw[position] in _WHITESPACE:
        position -= 1
    return raw[position] if position >= 0 else -1


def _after(raw: bytes | bytearray, position: int) -> int:
    """The byte at or after ``position``, whitespace skipped (``]`` past the end)."""
    size = len(raw)
    while position < size and raw[position] in _WHITESPACE:
        position += 1
    return raw[position] if position < size else -1


def _printable(raw: bytes | bytearray, start: int, end: int) -> bool:
    for at in range(start, end, _SCAN_SLICE):
        if raw[at : min(end, at + _SCAN_SLICE)].translate(None, _RAW_BYTES):
            return False
        time.sleep(0)  # lets a waiting event loop take the GIL now, not after 5 ms
    return True


def _put_back(
    value: Any, raw: bytes | bytearray, slots: dict[str, tuple[int, int]], keep_at: KeepAt
) -> int:
    """Replace each placeholder in ``value`` by its literal (in place); how many were found.
    Iterative: the depth was not checked yet."""
    found = 0
    if not isinstance(value, dict | list):
        return found
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        keys: Any = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in keys:
            if type(child) is str:
                span = slots.get(child) if child.startswith("\x00") else None
                if span is None:
                    continue
                found += 1
                text = RawText(raw, *span)
                item[key] = text if keep_at((*path, key)) else text.text()
            elif isinstance(child, dict | list):
                stack.append((child, (*path, key)))
        if isinstance(item, dict) and any(type(k) is str and k in slots for k in item):
            raise ValueError("a placeholder became a key")
    return found
