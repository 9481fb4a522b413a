"""pool.jsonstream: the pieces concatenate to exactly what json.dumps writes."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pool.jsonstream import is_large, json_pieces

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
