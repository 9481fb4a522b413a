"""pool.jsonstream: the pieces concatenate to exactly what json.dumps writes."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import tempfile
import tracemalloc
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pool.files import FileOutput
from pool.jsonstream import (
    TextSlices,
    dumps,
    dumps_bytes,
    is_large,
    json_chunks,
    json_pieces,
)

# Every escape: quotes, backslashes, control characters, non-ASCII, non-BMP (surrogate pairs).
_TEXT = st.text(
    alphabet=st.sampled_from(
        ['"', "\\", "\n", "\x00", "\x1f", "a", "\u00e9", "\u4e2d", "\U0001f600"]
    )
    | st.characters(),
    max_size=60,
)
_SCALAR = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT
_VALUE = st.recursive(
    _SCALAR,
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(_TEXT, inner, max_size=6),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(value=_VALUE, slice_chars=st.integers(min_value=1, max_value=16))
def test_pieces_concatenate_to_json_dumps(value: Any, slice_chars: int) -> None:
    # A tiny slice puts every string and container of the value through the streaming path.
    pieces = list(json_pieces(value, slice_chars=slice_chars))
    assert "".join(pieces) == json.dumps(value)
    assert json.loads("".join(pieces)) == value


def test_a_large_string_is_encoded_a_slice_at_a_time() -> None:
    text = 'x"\u00e9\U0001f600\n' * 1000  # 5000 code points
    pieces = list(json_pieces({"output": [text, text], "id": "p"}, slice_chars=100))
    assert "".join(pieces) == json.dumps({"output": [text, text], "id": "p"})
    # No piece holds more than one slice's escapes (\ud83d\ude00 is 12 characters a code point).
    assert max(len(p) for p in pieces) <= 100 * 12


def test_long_runs_of_scalars_and_non_string_keys_match() -> None:
    value = {1: list(range(5000)), None: [0.5] * 3000 + ["s" * 2000, [1, 2]], 2.5: "t", False: "f"}
    assert "".join(json_pieces(value, slice_chars=64)) == json.dumps(value)


def test_is_large_counts_strings_and_bounds_the_look() -> None:
    assert not is_large({"a": "x" * 10}, 100)
    assert is_large({"a": ["x" * 60, "y" * 60]}, 100)
    assert is_large(list(range(20_000)), 10**9, max_nodes=1000)  # too many nodes: large


# --- large values: a file kept on disk, a string kept as slices ---------------------------------
def _file_output(data: bytes, mime_type: str = "image/png") -> FileOutput:
    fd, path = tempfile.mkstemp()
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return FileOutput(path, mime_type, len(data))


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=200),
    slices=st.lists(_TEXT, max_size=5),
    slice_chars=st.integers(min_value=1, max_value=16),
    compact=st.booleans(),
)
def test_large_values_write_the_json_of_their_whole_string(
    data: bytes, slices: list[str], slice_chars: int, compact: bool
) -> None:
    # Any file size (a multiple of 3 bytes or not) and any slicing of any text.
    file_output = _file_output(data)
    try:
        text = TextSlices(slices)
        uri = "data:image/png;base64," + base64.b64encode(data).decode()
        whole = "".join(slices)
        separators = (",", ":") if compact else None
        value = {"output": [file_output, text, {"f": file_output}], "n": [1, 2]}
        plain = {"output": [uri, whole, {"f": uri}], "n": [1, 2]}
        expected = json.dumps(plain, separators=separators)
        pieces = json_pieces(value, slice_chars=slice_chars, separators=separators)
        assert "".join(pieces) == expected
        assert dumps(value, separators=separators) == expected
        assert dumps_bytes(value, separators=separators, slice_chars=slice_chars) == (
            expected.encode()
        )
        assert file_output.json_chars == len(json.dumps(uri))
        assert text.json_chars == len(whole) + 2 and text == whole
    finally:
        os.unlink(file_output.path)


def test_a_file_is_read_a_slice_at_a_time_and_never_whole(tmp_path: Any) -> None:
    size = 16 << 20
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(size))
    file_output = FileOutput(str(path), "application/octet-stream", size)
    # Steps: write its JSON out a piece at a time, keeping none of them (as a response does).
    tracemalloc.start()
    try:
        total = 0
        biggest = 0
        for piece in json_pieces({"output": file_output}):
            total += len(piece)
            biggest = max(biggest, len(piece))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Result: the whole data: URI went out, in pieces of at most 1 MiB of base64, and the
    # most held at once was a few slices (read, base64, text), not the file, its base64 or
    # its text.
    assert total == len(json.dumps({"output": file_output.text()}))
    assert biggest <= 1 << 20
    assert peak < 5 << 20, f"peak {peak / (1 << 20):.1f} MiB"


def test_is_large_counts_large_values_by_their_json() -> None:
    small = FileOutput("/nonexistent", "image/png", 10)
    assert not is_large({"output": small}, 100)
    assert is_large({"output": FileOutput("/nonexistent", "image/png", 300)}, 100)
    assert is_large([TextSlices(["x" * 60, "y" * 60])], 100)


async def test_json_chunks_yield_to_the_loop_between_chunks() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    seen = []
    value = {"output": TextSlices(["a" * 1000] * 10)}
    pieces = lambda v: json_pieces(v, slice_chars=1000)  # noqa: E731
    async for chunk in json_chunks(value, chunk_chars=1000, pieces=pieces):
        seen.append((ticks, chunk))
    task.cancel()
    assert b"".join(c for _, c in seen) == json.dumps({"output": "a" * 10_000}).encode()
    assert len({t for t, _ in seen}) == len(seen) > 5  # the loop ran between every two


def _json_chars(value: object) -> int:
    """The count is_large compares with its limit, by recursion: string lengths (keys too)
    and container lengths."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        keys = sum(len(k) for k in value if isinstance(k, str))
        return len(value) + keys + sum(_json_chars(v) for v in value.values())
    if isinstance(value, list):
        return len(value) + sum(_json_chars(v) for v in value)
    return 0


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(value=_json_values, limit=st.integers(min_value=0, max_value=400))
def test_is_large_agrees_with_its_plain_definition(value: object, limit: int) -> None:
    assert is_large(value, limit) == (_json_chars(value) > limit)
