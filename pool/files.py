"""File inputs and outputs: URLs and ``data:`` URIs in, ``data:`` URIs or uploads out.

Inputs: a ``Path``/``File`` input (schema ``format: uri``, also as array items) may be an
``http(s)://`` URL, downloaded with a timeout and a size cap, or a ``data:`` URI, decoded. Each
becomes a file in its own fresh directory under ``dest_dir``, named from a sanitised last URL
segment (never the URL path itself, so no traversal). Like Cog, nothing else is accepted: a
plain path would let a client read any file the pool can read.

A download that fails raises :class:`FileFetchError` naming the input, the URL and the HTTP
status; the manager fails the prediction with that message. A value that is not a URL at all
raises :class:`pool.errors.InvalidInput` (HTTP 422).

Outputs: ``{PATH_MARKER: path}`` anywhere in the output becomes ``data:<mime>;base64,...``, or,
with ``files.upload_url``, is PUT to ``<upload_url>/<file name>`` and replaced by the response's
``Location`` header, else by the PUT URL without its query string. A file over
``INLINE_FILE_MAX_BYTES`` (about 192 KiB) is not encoded at all: the prediction record takes it
into a directory of its own (:class:`OutputFiles`; a file the runner spilled is moved there, a
file of the model's is copied, since the model may write the same path again) and the output
holds a :class:`FileOutput` (path, mime type, size), whose ``data:`` URI each writer makes from
the file a slice at a time. The directory lives while anything may still serve it (see
:class:`OutputFiles`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import logging
import mimetypes
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import aiohttp
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from coglet import protocol
from pool.config import FilesConfig, NetworkConfig
from pool.errors import InvalidInput, PoolError
from pool.jsonstream import LargeValue, RawText
from pool.network import (
    NetworkPolicy,
    NetworkRefused,
    client_session,
    redact_text,
    redact_url,
    refusal,
)

__all__ = [
    "INLINE_FILE_MAX_BYTES",
    "FileFetchError",
    "FileOutput",
    "FileUploadError",
    "OutputFiles",
    "data_uri_for_file",
    "decode_data_uri",
    "encode_outputs",
    "file_input_fields",
    "has_path",
    "prepare_inputs",
    "safe_file_name",
    "upload_file",
]

log = logging.getLogger(__name__)

_CHUNK = 1 << 16
_NAME_MAX = 100
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_UPLOAD_ATTEMPTS = 3
# data: URIs longer than this are decoded in a worker thread: a 93 MB one took 1.34 s of the
# event loop, during which /health-check and every other prediction waited.
DECODE_INLINE_MAX_CHARS = 256 * 1024


class FileFetchError(PoolError):
    """An input file could not be fetched; the message names the input, URL and status."""

    def __init__(self, field: str, url: str, reason: str, *, status: int | None = None) -> None:
        super().__init__(f"failed to fetch input {field!r} from {redact_url(url)}: {reason}")
        self.field = field
        self.url = url
        self.status = status


class FileUploadError(PoolError):
    """An output file could not be uploaded to ``files.upload_url``."""


class _RetryableUpload(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


# --- the schema ------------------------------------------------------------------------------
def file_input_fields(schema: dict[str, Any]) -> dict[str, bool]:
    """Names of the schema's Path/File inputs -> True when the input is a list of them."""
    try:
        props = schema["components"]["schemas"]["Input"]["properties"]
    except (KeyError, TypeError):
        return {}
    fields: dict[str, bool] = {}
    for name, prop in props.items():
        if not isinstance(prop, dict):
            continue
        if prop.get("format") == "uri":
            fields[name] = False
        elif prop.get("type") == "array" and isinstance(prop.get("items"), dict):
            if prop["items"].get("format") == "uri":
                fields[name] = True
    return fields


def safe_file_name(candidate: str, *, mime_type: str | None = None) -> str:
    """A file name made only of ``[A-Za-z0-9._-]``, never hidden, never ``..``, bounded."""
    base = candidate.replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_CHARS.sub("_", base).lstrip(".")
    if not name.strip("_"):
        name = "file"
    if "." not in name and mime_type:
        ext = mimetypes.guess_extension(mime_type.split(";")[0].strip()) or ""
        name += ext
    if len(name) > _NAME_MAX:
        stem, dot, ext = name.rpartition(".")
        name = (stem[: _NAME_MAX - len(ext) - 1] + dot + ext) if dot and len(ext) < 16 else name
        name = name[:_NAME_MAX]
    return name


# --- inputs ----------------------------------------------------------------------------------
async def prepare_inputs(
    schema: dict[str, Any],
    values: dict[str, Any],
    dest_dir: str,
    config: FilesConfig,
    *,
    session: aiohttp.ClientSession | None = None,
    network: NetworkConfig | NetworkPolicy | None = None,
) -> dict[str, Any]:
    """Return ``values`` with every Path/File URL replaced by a local file path.

    Downloads go through ``session``, which must come from :func:`pool.network.client_session`
    (the caller's network policy); without one, a guarded session for ``network`` (default:
    the default policy) is made for this call.

    Raises :class:`InvalidInput` for a value that is neither an http(s) URL nor a ``data:``
    URI (or a malformed ``data:`` URI), :class:`FileFetchError` when a download fails or the
    network policy refuses its address.
    """
    fields = file_input_fields(schema)
    jobs: list[_Job] = []
    for name, is_list in fields.items():
        value = values.get(name)
        if value is None:
            continue
        if is_list and isinstance(value, list):
            jobs.extend(_job(name, i, item) for i, item in enumerate(value))
        else:
            jobs.append(_job(name, None, value))
    if not jobs:
        return values
    # Every data: URI is decoded before any download starts, so a bad one fails first.
    jobs = [await _decoded(job, dest_dir, config) for job in jobs]
    os.makedirs(dest_dir, exist_ok=True)
    own_session = session is None
    client = session or client_session(network or NetworkConfig())
    try:
        paths = await _gather_all([_fetch_one(client, job, dest_dir, config) for job in jobs])
    finally:
        if own_session:
            await client.close()
    result = dict(values)
    for job, path in zip(jobs, paths, strict=True):
        if job.index is None:
            result[job.field] = path
        else:
            if result[job.field] is values[job.field]:
                result[job.field] = list(values[job.field])
            result[job.field][job.index] = path
    return result


@dataclass(frozen=True)
class _Job:
    field: str
    index: int | None  # position in a list input, None for a single file
    url: str | RawText
    data: tuple[str, bytes] | None = None  # (mime type, bytes) of a data: URI, decoded
    # A data: URI kept as a slice of the request body, decoded straight to this file, and
    # whether it decoded to more than files.max_download_bytes (refused when fetched).
    path: str | None = None
    too_large: bool = False


def _job(field: str, index: int | None, value: Any) -> _Job:
    """Check one value (its data: URI is decoded by :func:`_decoded`)."""
    _check_file_value(field, value)
    if isinstance(value, RawText) and not value.startswith("data:"):
        value = value.text()  # a URL over 1 MiB: downloaded as any other
    return _Job(field, index, value)


async def _decoded(job: _Job, dest_dir: str, config: FilesConfig) -> _Job:
    if not job.url.startswith("data:"):
        return job
    if isinstance(job.url, RawText):
        path, too_large = await asyncio.to_thread(
            _decode_raw_to_file, job.field, job.url, dest_dir, config.max_download_bytes
        )
        if path is not None:
            return dataclasses.replace(job, path=path, too_large=too_large)
        job = dataclasses.replace(job, url=job.url.text())  # not plain base64 (rare): whole
    assert isinstance(job.url, str)
    if len(job.url) <= DECODE_INLINE_MAX_CHARS:
        data = decode_data_uri(job.field, job.url)
    else:
        data = await asyncio.to_thread(decode_data_uri, job.field, job.url)
    return dataclasses.replace(job, data=data)


def _check_file_value(field: str, value: Any) -> None:
    if isinstance(value, str | RawText) and value.startswith(("http://", "https://", "data:")):
        return
    if isinstance(value, RawText):
        value = value.head(81)  # its message shows the first 80 characters, as a str's
    shown = value if not isinstance(value, str) or len(value) <= 80 else value[:80] + "..."
    raise InvalidInput(
        [
            {
                "loc": ["body", "input", field],
                "msg": f"invalid input value: {field}={shown!r} is not an http(s) URL or a "
                "data: URI",
                "type": "value_error.url",
            }
        ]
    )


async def _gather_all(jobs: list[Coroutine[Any, Any, str]]) -> list[str]:
    """Run all jobs at once; on the first failure cancel the rest and re-raise it."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _fetch_one(
    session: aiohttp.ClientSession, job: _Job, dest_dir: str, config: FilesConfig
) -> str:
    # A fresh directory per file keeps the (sanitised) original name without collisions.
    if job.path is not None:
        if job.too_large:
            raise _too_large(job.field, _shown_url(job.url), config, None)
        return job.path
    assert isinstance(job.url, str)
    directory = tempfile.mkdtemp(prefix="input-", dir=dest_dir)
    if job.data is None:
        return await _download(session, job.field, job.url, directory, config)
    mime_type, data = job.data
    if len(data) > config.max_download_bytes:
        raise _too_large(job.field, job.url, config, None)
    path = os.path.join(directory, safe_file_name("", mime_type=mime_type))
    await asyncio.to_thread(_write_file, path, data)
    return path


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def decode_data_uri(field: str, uri: str) -> tuple[str, bytes]:
    """(mime type, bytes) of a ``data:`` URI, base64 or percent-encoded (RFC 2397).

    Base64 is decoded in slices of ``CODEC_CHUNK`` characters: the C calls behind it hold the
    GIL, so even in a worker thread one call over 93 MB stalled the event loop for seconds;
    a slice holds it for a few milliseconds.
    """
    header, comma, payload = uri[len("data:") :].partition(",")
    if not comma:
        raise _bad_data_uri(field, "no ',' separates the header from the data")
    params = [p.strip() for p in header.split(";")]
    mime_type = params[0] or "text/plain"
    if "base64" not in (p.lower() for p in params[1:]):
        return mime_type, urllib.parse.unquote_to_bytes(payload)
    try:
        return mime_type, _b64decode_chunked(_payload_chunks(payload))
    except (binascii.Error, ValueError) as e:
        raise _bad_data_uri(field, f"invalid base64: {e}") from None


def _shown_url(url: str | RawText) -> str:
    """What an error shows of a data: URI (``redact_url`` keeps its first 32 characters)."""
    return url.head(64) if isinstance(url, RawText) else url


_DATA_URI_HEADER_MAX = 64 * 1024  # a data: URI whose ',' comes later is decoded as a str


def _decode_raw_to_file(
    field: str, uri: RawText, dest_dir: str, max_bytes: int
) -> tuple[str | None, bool]:
    """Decode a base64 ``data:`` URI kept as a slice of the request body into a file of its
    own under ``dest_dir``, a ``CODEC_CHUNK`` slice at a time (no whole copy of the URI or
    the file in memory); ``(path, decoded more than max_bytes)``, or ``(None, False)`` when
    it is not plain base64 (the caller decodes it as a ``str``, with the usual messages).

    Past ``max_bytes`` nothing more is written but the rest is still decoded, so a bad
    payload is refused as invalid (422) before a size (a failed prediction), as it is when
    the URI is decoded whole. For a worker thread: the GIL is free between slices.
    """
    comma = uri.find(",", 0, _DATA_URI_HEADER_MAX)
    if comma == -1 or uri.find("%", comma) != -1:
        return None, False
    params = [p.strip() for p in uri.head(comma)[len("data:") :].split(";")]
    if "base64" not in (p.lower() for p in params[1:]):
        return None, False
    mime_type = params[0] or "text/plain"
    os.makedirs(dest_dir, exist_ok=True)
    directory = tempfile.mkdtemp(prefix="input-", dir=dest_dir)
    path = os.path.join(directory, safe_file_name("", mime_type=mime_type))
    size = 0
    try:
        with open(path, "wb") as f:
            for piece in _b64decode_slices(uri.byte_slices(CODEC_CHUNK, comma + 1)):
                size += len(piece)
                if size <= max_bytes:
                    f.write(piece)
                # The event loop, if it waits for the GIL, takes it now (a waiting thread
                # otherwise gets it only after the 5 ms switch interval).
                time.sleep(0)
    except (binascii.Error, ValueError) as e:
        shutil.rmtree(directory, ignore_errors=True)
        raise _bad_data_uri(field, f"invalid base64: {e}") from None
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return path, size > max_bytes


CODEC_CHUNK = 1 << 20
_B64_WHITESPACE = b" \t\n\r\x0b\x0c"


def _payload_chunks(payload: str) -> Iterator[bytes]:
    if "%" in payload:  # percent-escapes may straddle a slice: unquote it whole (rare)
        raw = urllib.parse.unquote_to_bytes(payload)
        for start in range(0, len(raw), CODEC_CHUNK):
            yield raw[start : start + CODEC_CHUNK]
        return
    for start in range(0, len(payload), CODEC_CHUNK):
        yield payload[start : start + CODEC_CHUNK].encode("utf-8")


def _b64decode_chunked(chunks: Iterable[bytes]) -> bytes:
    """Strict base64 (whitespace ignored), decoded four characters' quanta at a time.

    From the first ``=`` on, the rest is decoded in one call, so padding is judged exactly as
    ``base64.b64decode(..., validate=True)`` judges it (only a hostile payload has a long rest).
    """
    return b"".join(_b64decode_slices(chunks))


def _b64decode_slices(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """:func:`_b64decode_chunked`'s bytes, a slice per chunk (nothing is valid until the
    iterator ends without raising)."""
    pending = b""
    rest = iter(chunks)
    for chunk in rest:
        data = pending + chunk.translate(None, _B64_WHITESPACE)
        if b"=" in data:
            tail = data + b"".join(c.translate(None, _B64_WHITESPACE) for c in rest)
            yield base64.b64decode(tail, validate=True)
            return
        # The last whole quantum waits: excess '=' after it is judged together with it.
        cut = max(0, len(data) - len(data) % 4 - 4)
        yield base64.b64decode(data[:cut], validate=True)
        pending = data[cut:]
    if pending:
        yield base64.b64decode(pending, validate=True)  # raises on an incomplete quantum


def _bad_data_uri(field: str, why: str) -> InvalidInput:
    return InvalidInput(
        [
            {
                "loc": ["body", "input", field],
                "msg": f"invalid input value: {field} is not a valid data: URI ({why})",
                "type": "value_error.data_uri",
            }
        ]
    )


async def _download(
    session: aiohttp.ClientSession, field: str, url: str, directory: str, config: FilesConfig
) -> str:
    timeout = aiohttp.ClientTimeout(total=config.download_timeout_s)
    name = safe_file_name(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    try:
        async with session.get(url, timeout=timeout) as resp:
            if resp.status >= 400:
                raise FileFetchError(
                    field,
                    url,
                    f"HTTP {resp.status} {resp.reason or ''}".strip(),
                    status=resp.status,
                )
            if resp.content_length is not None and resp.content_length > config.max_download_bytes:
                raise _too_large(field, url, config, resp.status)
            if "." not in name:
                name = safe_file_name(name, mime_type=resp.content_type)
            path = os.path.join(directory, name)
            await _stream_to_file(resp, path, field, url, config)
    except FileFetchError:
        raise
    except NetworkRefused as e:
        raise FileFetchError(field, url, f"refused by the network policy: {e.reason}") from None
    except TimeoutError:
        raise FileFetchError(field, url, f"timed out after {config.download_timeout_s}s") from None
    except (aiohttp.ClientError, OSError) as e:
        refused = refusal(e, url)
        if refused is not None:
            raise FileFetchError(
                field, url, f"refused by the network policy: {refused.reason}"
            ) from None
        raise FileFetchError(field, url, f"{type(e).__name__}: {redact_text(str(e))}") from None
    log.info("input_downloaded field=%s url=%s", field, redact_url(url))
    return path


async def _stream_to_file(
    resp: aiohttp.ClientResponse, path: str, field: str, url: str, config: FilesConfig
) -> None:
    size = 0
    with open(path, "wb") as f:  # noqa: ASYNC230 -- chunks are small; the network dominates
        async for chunk in resp.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > config.max_download_bytes:
                raise _too_large(field, url, config, resp.status)
            f.write(chunk)


def _too_large(field: str, url: str, config: FilesConfig, status: int | None) -> FileFetchError:
    return FileFetchError(
        field,
        url,
        f"larger than files.max_download_bytes={config.max_download_bytes}",
        status=status,
    )


# --- outputs ---------------------------------------------------------------------------------
INLINE_FILE_MAX_BYTES = 192 * 1024 - 256
"""Output files up to this size become ``data:`` URIs at once (under 256 KiB of text, so the
recent store keeps such a value whole by default); larger ones are kept on disk as
:class:`FileOutput`."""


class FileOutput(LargeValue):
    """An output file kept on disk by its prediction record; its JSON value is the ``data:``
    URI, made from the file a slice at a time by whoever writes it out."""

    __slots__ = ("mime_type", "path", "size")

    def __init__(self, path: str, mime_type: str, size: int) -> None:
        self.path = path
        self.mime_type = mime_type
        self.size = size

    @property
    def prefix(self) -> str:
        return f"data:{self.mime_type};base64,"

    @property
    def json_chars(self) -> int:
        return len(self.prefix) + 4 * ((self.size + 2) // 3) + 2

    @property
    def memory_bytes(self) -> int:
        return len(self.path) + len(self.mime_type) + 64

    def pieces(self, slice_chars: int) -> Iterator[str]:
        # The file is opened before the first piece: a reader holds it from then on, even if
        # its record lets it go meanwhile (an unlinked file stays readable through its fd).
        f = self._open()
        with f:
            yield json.dumps(self.prefix)[:-1]  # the opening quote and the prefix
            block = max(3, slice_chars // 4 * 3)  # whole base64 quanta: slices concatenate
            while data := f.read(block):
                yield base64.b64encode(data).decode("ascii")
            yield '"'

    def text(self) -> str:
        return data_uri_for_file(self.path, self.mime_type)

    def _open(self) -> BinaryIO:
        try:
            return open(self.path, "rb")  # closed by pieces()
        except OSError as e:
            raise FileUploadError(f"output file {self.path} cannot be read: {e}") from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FileOutput):
            return NotImplemented
        return (self.path, self.mime_type, self.size) == (other.path, other.mime_type, other.size)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"FileOutput({self.path!r}, {self.mime_type!r}, size={self.size})"


class OutputFiles:
    """The output files one prediction record keeps on disk, and who still needs them.

    Each holder counts once: the live record until the router has recorded its end, the recent
    store while it keeps the record's slim copy, and each reader (a sync HTTP response, a
    ``GET``, a webhook sender, a queue publisher) from before it may read until it is done.
    When the last one lets go, ``remove`` is handed the directories (the manager removes them
    in a worker thread). A reader that already opened a file keeps reading it after that.
    """

    def __init__(self, root: str, name: str, remove: Callable[[list[str]], None]) -> None:
        self._root = root
        self._name = name
        self._remove = remove
        self.dirs: list[str] = []
        self.bytes = 0  # on disk, in all
        self.holds = 0
        self.closed = False  # its last holder let go: its directories are (being) removed
        self.sealed = False  # its record ended: a file kept after that is in no output
        self._made = 0

    def new_dir(self) -> str:
        """A fresh directory path for one file (:func:`adopt_file` makes it; :meth:`settled`
        makes it this set's)."""
        self._made += 1
        return os.path.join(self._root, f"{self._name}-{self._made - 1}")

    def hold(self) -> None:
        self.holds += 1

    def release(self) -> None:
        self.holds -= 1
        if self.holds <= 0:
            self.closed = True
            dirs, self.dirs = self.dirs, []
            if dirs:
                self._remove(dirs)

    def settled(self, path: str, kept: FileOutput | None, *, failed: bool = False) -> None:
        """The worker thread that filled ``path`` is done (``kept``: the file it kept). The
        directory becomes this set's; if the record ended or every holder let go meanwhile,
        or the thread failed half-way, it is removed at once."""
        if kept is not None and not (self.closed or self.sealed):
            self.dirs.append(path)
            self.bytes += kept.size
        elif kept is not None or failed:
            self._remove([path])


async def encode_outputs(
    output: Any,
    config: FilesConfig,
    *,
    session: aiohttp.ClientSession | None = None,
    keep: Callable[[], OutputFiles | None] | None = None,
    movable: Callable[[str], bool] = lambda path: False,
) -> Any:
    """Replace every ``{PATH_MARKER: path}`` in ``output`` by a data: URI, an uploaded URL, or
    (a file over ``INLINE_FILE_MAX_BYTES``, when ``keep`` gives the record's files) a
    :class:`FileOutput` the record keeps. ``movable(path)``: the runner's own copy (moved,
    not copied)."""
    if not has_path(output):
        return output
    own_session = session is None and config.upload_url is not None
    client = session
    if own_session:
        client = aiohttp.ClientSession()
    try:
        return await _encode(output, config, client, keep, movable)
    finally:
        if own_session and client is not None:
            await client.close()


def _is_path_marker(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and len(value) == 1
        and isinstance(value.get(protocol.PATH_MARKER), str)
    )


def has_path(value: Any) -> bool:
    """True when ``value`` holds a ``{PATH_MARKER: path}`` anywhere (iterative)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if _is_path_marker(item):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


async def _encode(
    value: Any,
    config: FilesConfig,
    session: aiohttp.ClientSession | None,
    keep: Callable[[], OutputFiles | None] | None,
    movable: Callable[[str], bool],
) -> Any:
    if _is_path_marker(value):
        path = value[protocol.PATH_MARKER]
        if config.upload_url is not None and session is not None:
            return await upload_file(session, path, config.upload_url)
        files = keep() if keep is not None else None
        if files is None:
            return await asyncio.to_thread(data_uri_for_file, path)
        # The runner's own copies left behind (file objects it spilled) are removed by the
        # runner handle.
        dest_dir = files.new_dir()
        job = asyncio.ensure_future(
            asyncio.to_thread(adopt_file, path, dest_dir, move=movable(path))
        )
        # Whatever happens to the record meanwhile, what the thread made is the set's (or is
        # removed) when the thread is really done: the wait below is shielded, so a cancel
        # (the record ended) stops the wait, not the thread.
        job.add_done_callback(lambda j: _settled(j, files, dest_dir))
        return await asyncio.shield(job)
    if isinstance(value, list):
        return [await _encode(v, config, session, keep, movable) for v in value]
    if isinstance(value, dict):
        return {k: await _encode(v, config, session, keep, movable) for k, v in value.items()}
    return value


def _settled(job: asyncio.Future[Any], files: OutputFiles, dest_dir: str) -> None:
    if job.cancelled() or job.exception() is not None:  # (retrieved: the await reports it)
        files.settled(dest_dir, None, failed=True)
        return
    result = job.result()
    files.settled(dest_dir, result if isinstance(result, FileOutput) else None)


def adopt_file(path: str, dest_dir: str, *, move: bool) -> str | FileOutput:
    """A small file's ``data:`` URI; a larger one moved (``move``) or copied into ``dest_dir``
    (created here, 0700) as a :class:`FileOutput`. Runs in a worker thread (the copy is the
    kernel's ``sendfile``: no Python memory, no GIL)."""
    try:
        size = os.stat(path).st_size
        if size <= INLINE_FILE_MAX_BYTES:
            return data_uri_for_file(path)
        os.mkdir(dest_dir, 0o700)
        dest = os.path.join(dest_dir, safe_file_name(os.path.basename(path)))
        if move:
            try:
                os.rename(path, dest)
            except OSError:  # another filesystem (EXDEV): copy; the runner removes its own
                shutil.copyfile(path, dest)
        else:
            shutil.copyfile(path, dest)
        size = os.stat(dest).st_size
    except OSError as e:
        raise FileUploadError(f"output file {path} cannot be read: {e}") from None
    return FileOutput(dest, _mime_type(path), size)


def _mime_type(path: str) -> str:
    return mimetypes.guess_type(path)[0] or "application/octet-stream"


def data_uri_for_file(path: str, mime_type: str | None = None) -> str:
    """``data:<mime>;base64,<content>`` of one output file, encoded a slice at a time (the
    mime type guessed from the name unless given)."""
    parts = [f"data:{mime_type or _mime_type(path)};base64,"]
    block = CODEC_CHUNK // 4 * 3  # whole base64 quanta: the slices concatenate exactly
    try:
        with open(path, "rb") as f:
            while data := f.read(block):
                parts.append(base64.b64encode(data).decode("ascii"))
    except OSError as e:
        raise FileUploadError(f"output file {path} cannot be read: {e}") from None
    return "".join(parts)


async def upload_file(session: aiohttp.ClientSession, path: str, upload_url: str) -> str:
    """PUT one output file to ``<upload_url>/<name>``; return where it now lives."""
    name = safe_file_name(os.path.basename(path))
    url = upload_url.rstrip("/") + "/" + urllib.parse.quote(name)
    retrying = AsyncRetrying(
        stop=stop_after_attempt(_UPLOAD_ATTEMPTS),
        wait=wait_exponential(multiplier=0.1, max=2.0) + wait_random(0, 0.1),
        retry=retry_if_exception_type((aiohttp.ClientError, TimeoutError, _RetryableUpload)),
        reraise=True,
    )
    try:
        location: str = await retrying(_put_file, session, path, url)
    except (aiohttp.ClientError, TimeoutError, _RetryableUpload, OSError) as e:
        raise FileUploadError(
            f"failed to upload output file {name} to {redact_url(url)}: {redact_text(str(e))}"
        ) from None
    log.info("output_uploaded file=%s url=%s", name, redact_url(location))
    return location


async def _put_file(session: aiohttp.ClientSession, path: str, url: str) -> str:
    data = await asyncio.to_thread(_read_file, path)
    async with session.put(url, data=data, headers={"Content-Type": _mime_type(path)}) as resp:
        await resp.read()
        if resp.status in (429, 500, 502, 503, 504):
            raise _RetryableUpload(resp.status)
        if resp.status >= 400:
            raise FileUploadError(
                f"failed to upload output file to {redact_url(url)}: HTTP {resp.status}"
            )
        location = resp.headers.get("Location")
    if location:
        return urllib.parse.urljoin(url, location)
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(query="", fragment=""))


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
