"""JSON text of a large value, a piece at a time, byte-for-byte what ``json.dumps`` writes.

A finished prediction with a 100 MB output used to become one ``json.dumps`` (one C call
holding the GIL for ~0.4 s, so the loop and ``/health-check`` stalled) and then one bytes
object beside it: about four copies of the output at once. :func:`json_pieces` walks the value
instead: a small subtree is one ``json.dumps``; a large string is encoded ``SLICE_CHARS`` code
points at a time (``json.dumps`` of a slice, quotes stripped, is valid JSON string content, and
a ``str`` slice never splits a surrogate pair); lists and dicts are written around their items
with ``json.dumps``'s own default separators. The caller writes each piece and yields to the
loop between them, so no step holds the GIL long and no copy of the whole output is built.

Values too large to hold (or to encode) as one Python string are :class:`LargeValue` objects
in an output: a file output kept on disk (``pool.files.FileOutput``: its ``data:`` URI is made
from the file a slice at a time, when it is written out) and a long string kept as the slices
it was read in (:class:`TextSlices`), and a long string of a request body kept as a read-only
slice of the body's bytes (:class:`RawText`, made by :mod:`pool.jsonbody`). Every writer of a
prediction goes through this module: :func:`json_pieces` / :func:`json_chunks` stream them,
:func:`dumps` writes a small value whole
(a large value inside becomes its whole string), :func:`dumps_bytes` builds one UTF-8 text a
slice at a time (for a worker thread: a queue result).
"""

from __future__ import annotations

import abc
import asyncio
import io
import json
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

__all__ = [
    "SLICE_CHARS",
    "LargeValue",
    "RawText",
    "TextSlices",
    "dumps",
    "dumps_bytes",
    "is_large",
    "json_chunks",
    "json_pieces",
    "large_text",
]

SLICE_CHARS = 1 << 20
"""Code points of a large string encoded per ``json.dumps`` call."""

_COMPACT = (",", ":")
_DEFAULT = (", ", ": ")


class LargeValue(abc.ABC):
    """A JSON string too large to hold or encode as one piece; written a slice at a time."""

    __slots__ = ()

    @property
    @abc.abstractmethod
    def json_chars(self) -> int:
        """Length of its JSON text, quotes included (about: for bounds and decisions)."""

    @property
    @abc.abstractmethod
    def memory_bytes(self) -> int:
        """About how much memory it holds (a file kept on disk: only its name)."""

    @abc.abstractmethod
    def pieces(self, slice_chars: int) -> Iterator[str]:
        """Its JSON text (quotes included), at most about ``slice_chars`` of content a piece."""

    @abc.abstractmethod
    def text(self) -> str:
        """The whole string, at once (small values and fallbacks only)."""


class TextSlices(LargeValue):
    """A long string kept as the slices it was decoded in: never joined into one ``str`` (the
    join is one C call over the whole string, and a second copy of it for a moment).

    Equal to the string it holds, and to another ``TextSlices`` of the same text.
    """

    __slots__ = ("_length", "slices", "surrogate")

    def __init__(self, slices: Iterable[str]) -> None:
        self.slices: tuple[str, ...] = tuple(s for s in slices if s)
        self._length = sum(len(s) for s in self.slices)
        # Looked for here, where the slices are made (a worker thread): a lone surrogate cannot
        # be written as UTF-8 JSON, and the record refuses such an output.
        self.surrogate = any(not s.isascii() and _SURROGATE.search(s) for s in self.slices)

    def __len__(self) -> int:
        return self._length

    @property
    def json_chars(self) -> int:
        return self._length + 2

    @property
    def memory_bytes(self) -> int:
        return self._length

    def pieces(self, slice_chars: int) -> Iterator[str]:
        yield '"'
        for s in self.slices:
            for start in range(0, len(s), slice_chars):
                yield json.dumps(s[start : start + slice_chars])[1:-1]
        yield '"'

    def text(self) -> str:
        return "".join(self.slices)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TextSlices):
            return self._length == other._length and self.text() == other.text()
        if isinstance(other, str):
            return self._length == len(other) and self.text() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TextSlices(<{self._length} characters in {len(self.slices)} slices>)"


class RawText(LargeValue):
    """A long string of a request body, kept as a read-only slice of the body's bytes (no
    ``str`` of it is made): printable ASCII without ``"`` or ``\\``, so its bytes are its
    characters and its JSON text is itself between quotes (:mod:`pool.jsonbody` makes these).

    It keeps the whole body alive, so :attr:`memory_bytes` is the body's size. Equal to the
    string it holds, and to another ``RawText`` of the same text.
    """

    __slots__ = ("_body", "_end", "_start", "view")

    def __init__(self, body: bytes | bytearray, start: int, end: int) -> None:
        self._body, self._start, self._end = body, start, end
        self.view = memoryview(body).toreadonly()[start:end]

    def __len__(self) -> int:
        return self._end - self._start

    @property
    def json_chars(self) -> int:
        return len(self) + 2

    @property
    def memory_bytes(self) -> int:
        return len(self._body)

    def pieces(self, slice_chars: int) -> Iterator[str]:
        yield '"'
        for start in range(0, len(self), slice_chars):
            yield str(self.view[start : start + slice_chars], "ascii")
        yield '"'

    def byte_slices(self, slice_bytes: int, start: int = 0) -> Iterator[bytes]:
        """Its bytes from ``start`` on, ``slice_bytes`` at a time (one copy of each slice)."""
        for at in range(start, len(self), slice_bytes):
            yield self.view[at : at + slice_bytes].tobytes()

    def head(self, chars: int) -> str:
        return str(self.view[:chars], "ascii")

    def startswith(self, prefix: str | tuple[str, ...]) -> bool:
        prefixes = (prefix,) if isinstance(prefix, str) else prefix
        return any(
            self._body.startswith(p.encode("ascii"), self._start, self._end) for p in prefixes
        )

    def find(self, sub: str, start: int = 0, end: int | None = None) -> int:
        """``str.find`` over its text (``bytes.find`` over its part of the body: no copy)."""
        stop = self._end if end is None else min(self._start + end, self._end)
        at = self._body.find(sub.encode("ascii"), self._start + start, stop)
        return -1 if at == -1 else at - self._start

    def text(self) -> str:
        return str(self.view, "ascii")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RawText):
            return self.view == other.view
        if isinstance(other, str):
            return len(self) == len(other) and other.isascii() and self.view == other.encode()
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RawText(<{len(self)} characters of a request body>)"


_SURROGATE = re.compile("[\ud800-\udfff]")


def json_pieces(
    value: Any, *, slice_chars: int = SLICE_CHARS, separators: tuple[str, str] | None = None
) -> Iterator[str]:
    """Pieces whose concatenation equals ``json.dumps(value, separators=separators)``, with
    each :class:`LargeValue` written as its string."""
    item_sep, key_sep = separators or _DEFAULT
    dump = _dumper(separators)
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Raw):
            yield item.text
        elif isinstance(item, LargeValue):
            yield from item.pieces(slice_chars)
        elif isinstance(item, str):
            if len(item) <= slice_chars:
                yield json.dumps(item)
                continue
            yield '"'
            for start in range(0, len(item), slice_chars):
                yield json.dumps(item[start : start + slice_chars])[1:-1]
            yield '"'
        elif not _large(item, slice_chars):
            yield dump(item)
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
                    element = _Raw(dump(run)[1:-1])
                    run = []
                elif run:
                    todo.extend((_Raw(item_sep if len(todo) > 1 else ""), _Raw(dump(run)[1:-1])))
                    run = []
                todo.extend((_Raw(item_sep if len(todo) > 1 else ""), element))
            if run:
                todo.extend((_Raw(item_sep if len(todo) > 1 else ""), _Raw(dump(run)[1:-1])))
            todo.append(_Raw("]"))
            stack.extend(reversed(todo))
        elif isinstance(item, dict):
            todo = [_Raw("{")]
            for index, (key, element) in enumerate(item.items()):
                todo.append(_Raw((item_sep if index else "") + _key(key) + key_sep))
                todo.append(element)
            todo.append(_Raw("}"))
            stack.extend(reversed(todo))
        else:  # a tuple or another type json.dumps handles (or refuses) itself
            yield dump(item)


def _dumper(separators: tuple[str, str] | None) -> Callable[[Any], str]:
    if separators is None:
        return _dumps_default
    return json.JSONEncoder(separators=separators, default=large_text).encode


def large_text(value: Any) -> str:
    """A ``default=`` hook for ``json``: a :class:`LargeValue` as its whole string."""
    if isinstance(value, LargeValue):
        return value.text()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_dumps_default = json.JSONEncoder(default=large_text).encode


def dumps(value: Any, *, separators: tuple[str, str] | None = None) -> str:
    """``json.dumps(value)``; a :class:`LargeValue` inside is written as its whole string
    (for small values: a large one goes through :func:`json_pieces`)."""
    return _dumper(separators)(value)


def dumps_bytes(
    value: Any, *, separators: tuple[str, str] | None = None, slice_chars: int = SLICE_CHARS
) -> bytes:
    """The UTF-8 JSON text of ``value``, built a slice at a time into one buffer (no second
    whole copy: ``BytesIO.getvalue`` hands its buffer over). For a worker thread: the GIL is
    free between slices."""
    out = io.BytesIO()
    for piece in json_pieces(value, slice_chars=slice_chars, separators=separators):
        out.write(piece.encode("utf-8"))
    return out.getvalue()


async def json_chunks(
    value: Any,
    *,
    chunk_chars: int = SLICE_CHARS,
    pieces: Callable[[Any], Iterable[str]] = json_pieces,
) -> AsyncIterator[bytes]:
    """``value``'s JSON text as UTF-8 chunks of about ``chunk_chars``, yielding to the loop
    after each: a fast reader never makes a write wait, so without the yield a 100 MB body
    would be produced in one loop turn."""
    pending: list[str] = []
    pending_chars = 0
    for piece in pieces(value):
        pending.append(piece)
        pending_chars += len(piece)
        if pending_chars >= chunk_chars:
            yield "".join(pending).encode()
            pending, pending_chars = [], 0
            await asyncio.sleep(0)
    if pending:
        yield "".join(pending).encode()


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


_NUMBERS_AND_NONE = (type(None), bool, int, float)


def _large(value: Any, limit: int, max_nodes: int = 10_000) -> bool:
    # On every response and queue result, most of them small: a container's scalar members
    # are counted in place (only nested containers go on the stack), and the node budget is
    # charged a container's length at once. Counted: string lengths (keys included),
    # container lengths, a LargeValue's JSON length.
    total = 0
    nodes = max_nodes
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            nodes -= 2 * len(item)
            total += len(item)
            for key, member in item.items():
                if isinstance(key, str):
                    total += len(key)
                if isinstance(member, str):
                    total += len(member)
                elif not isinstance(member, _NUMBERS_AND_NONE):
                    stack.append(member)
        elif isinstance(item, list):
            nodes -= len(item)
            total += len(item)
            for member in item:
                if isinstance(member, str):
                    total += len(member)
                elif not isinstance(member, _NUMBERS_AND_NONE):
                    stack.append(member)
        elif isinstance(item, LargeValue):
            total += item.json_chars
        if total > limit:
            return True
        if nodes < 0:
            return True  # too many to look at: treat it as large
    return False
