"""JSON text of a large value, a piece at a time, byte-for-byte what ``json.dumps`` writes.

A finished prediction with a 100 MB output used to become one ``json.dumps`` (one C call
holding the GIL for ~0.4 s, so the loop and ``/health-check`` stalled) and then one bytes
object beside it: about four copies of the output at once. :func:`json_pieces` walks the value
instead: a small subtree is one ``json.dumps``; a large string is encoded ``SLICE_CHARS`` code
points at a time (``json.dumps`` of a slice, quotes stripped, is valid JSON string content, and
a ``str`` slice never splits a surrogate pair); lists and dicts are written around their items
with ``json.dumps``'s own default separators. The caller writes each piece and yields to the
loop between them, so no step holds the GIL long and no copy of the whole output is built.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

SLICE_CHARS = 1 << 20
"""Code points of a large string encoded per ``json.dumps`` call."""


def json_pieces(value: Any, *, slice_chars: int = SLICE_CHARS) -> Iterator[str]:
    """Pieces whose concatenation equals ``json.dumps(value)`` (default arguments)."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Raw):
            yield item.text
        elif isinstance(item, str):
            if len(item) <= slice_chars:
                yield json.dumps(item)
                continue
            yield '"'
            for start in range(0, len(item), slice_chars):
                yield json.dumps(item[start : start + slice_chars])[1:-1]
            yield '"'
        elif not _large(item, slice_chars):
            yield json.dumps(item)
        elif isinstance(item, list):
            todo: list[Any] = [_Raw("[")]
            run: list[Any] = []  # consecutive scalars: one json.dumps per _RUN of them
            for element in item:
                if isinstance(element, _SCALARS) and not (
                    isinstance(element, str) and len(element) > _SHORT_CHARS
                ):
                    run.append(element)
                    if len(run) < _RUN:
                        continue
                    element = _Raw(json.dumps(run)[1:-1])
                    run = []
                elif run:
                    todo.extend((_Raw(", " if len(todo) > 1 else ""), _Raw(json.dumps(run)[1:-1])))
                    run = []
                todo.extend((_Raw(", " if len(todo) > 1 else ""), element))
            if run:
                todo.extend((_Raw(", " if len(todo) > 1 else ""), _Raw(json.dumps(run)[1:-1])))
            todo.append(_Raw("]"))
            stack.extend(reversed(todo))
        elif isinstance(item, dict):
            todo = [_Raw("{")]
            for index, (key, element) in enumerate(item.items()):
                todo.append(_Raw((", " if index else "") + _key(key) + ": "))
                todo.append(element)
            todo.append(_Raw("}"))
            stack.extend(reversed(todo))
        else:  # a tuple or another type json.dumps handles (or refuses) itself
            yield json.dumps(item)


_SCALARS = (str, int, float, bool, type(None))
_SHORT_CHARS = 1024
_RUN = 1024


class _Raw:
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _key(key: Any) -> str:
    """A dict key as ``json.dumps`` writes it (non-str keys are converted as it converts them)."""
    if isinstance(key, str):
        return json.dumps(key)
    return json.dumps({key: 0})[1:-4]  # '{"1": 0}' -> '"1"'


def is_large(value: Any, limit: int, max_nodes: int = 10_000) -> bool:
    """Whether ``value``'s strings add up to more than ``limit`` characters (a bounded look:
    a value with more than ``max_nodes`` nodes counts as large)."""
    return _large(value, limit, max_nodes)


def _large(value: Any, limit: int, max_nodes: int = 10_000) -> bool:
    total = 0
    stack = [value]
    while stack and max_nodes > 0:
        max_nodes -= 1
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
            if total > limit:
                return True
        elif isinstance(item, dict):
            total += len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            total += len(item)
            stack.extend(item)
    return bool(stack)
