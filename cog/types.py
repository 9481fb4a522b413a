"""Input and output types of the Cog SDK."""

from __future__ import annotations

import base64
import io
import os
import pathlib
import urllib.parse
from typing import Any, AsyncIterator, Iterator, TypeVar

__all__ = [
    "AsyncConcatenateIterator",
    "ConcatenateIterator",
    "File",
    "Path",
    "Secret",
]

_T = TypeVar("_T")

SECRET_MASK = "**********"


class Path(pathlib.PosixPath):
    """A file path input or output. Inputs arrive as local paths (the pool downloads URLs)."""

    @classmethod
    def validate(cls, value: Any) -> Path:
        """Turn a path string or path-like into a ``cog.Path``."""
        if isinstance(value, cls):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls(os.fspath(value))
        raise TypeError(f"cannot make a Path from {type(value).__name__}")


class File(io.IOBase):
    """Deprecated file input/output type: a readable binary file object. Prefer ``Path``."""

    @classmethod
    def validate(cls, value: Any) -> io.IOBase:
        """Open a local path or decode a ``data:`` URI into a readable binary file object."""
        if isinstance(value, io.IOBase):
            return value
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise TypeError(f"cannot make a File from {type(value).__name__}")
        if value.startswith("data:"):
            return _decode_data_uri(value)
        if value.startswith("file://"):
            value = urllib.parse.unquote(urllib.parse.urlparse(value).path)
        return open(value, "rb")


def _decode_data_uri(uri: str) -> io.BytesIO:
    header, _, payload = uri.partition(",")
    if header.endswith(";base64"):
        data = base64.b64decode(payload)
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    return io.BytesIO(data)


class Secret:
    """A string input that never shows in logs, reprs or outputs."""

    __slots__ = ("_secret_value",)

    def __init__(self, secret_value: Any = None) -> None:
        if isinstance(secret_value, Secret):
            secret_value = secret_value.get_secret_value()
        self._secret_value = secret_value

    def get_secret_value(self) -> Any:
        """The real value; keep it out of logs."""
        return self._secret_value

    def __repr__(self) -> str:
        return f"Secret('{SECRET_MASK}')" if self._secret_value else "Secret('')"

    def __str__(self) -> str:
        return SECRET_MASK if self._secret_value else ""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._secret_value == self._secret_value

    def __hash__(self) -> int:
        return hash(self._secret_value)


class ConcatenateIterator(Iterator[_T]):
    """Output annotation: an iterator of strings shown concatenated (token streaming)."""

    def __next__(self) -> _T:  # pragma: no cover - an annotation, never instantiated
        raise StopIteration


class AsyncConcatenateIterator(AsyncIterator[_T]):
    """Output annotation: an async iterator of strings shown concatenated."""

    async def __anext__(self) -> _T:  # pragma: no cover - an annotation, never instantiated
        raise StopAsyncIteration
