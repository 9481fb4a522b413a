"""pool/files.py: URL and data: URI inputs, data: URI and uploaded outputs, over real sockets."""
# ruff: noqa: ASYNC240 -- tests read back small files in tmp_path; blocking is harmless here

from __future__ import annotations

import base64
import os
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from coglet import protocol
from pool.config import FilesConfig, NetworkConfig
from pool.errors import InvalidInput
from pool.files import (
    INLINE_FILE_MAX_BYTES,
    FileFetchError,
    FileOutput,
    FileUploadError,
    OutputFiles,
    adopt_file,
    encode_outputs,
    file_input_fields,
    prepare_inputs,
    safe_file_name,
)

# The file servers here listen on loopback, which the default network policy refuses.
LOOPBACK = NetworkConfig(allow_cidrs=("127.0.0.1/32",))

SCHEMA: dict[str, Any] = {
    "components": {
        "schemas": {
            "Input": {
                "properties": {
                    "image": {"type": "string", "format": "uri"},
                    "images": {"type": "array", "items": {"type": "string", "format": "uri"}},
                    "maybe": {"type": "string", "format": "uri", "nullable": True},
                    "text": {"type": "string"},
                }
            }
        }
    }
}


class FileServer:
    """Serves /files/<name> from a dict, records uploads to PUT /upload/<name>."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {"cat.png": b"\x89PNG fake", "notes.txt": b"hello"}
        self.uploads: dict[str, tuple[bytes, str]] = {}
        self.upload_status: list[int] = []
        self.location: str | None = None
        self.server: TestServer | None = None

    def url(self, path: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    async def get(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name == "big":
            return web.Response(body=b"x" * 5000)
        if name not in self.files:
            raise web.HTTPNotFound()
        return web.Response(body=self.files[name])

    async def put(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.uploads[name] = (await request.read(), request.content_type)
        if self.upload_status:
            return web.Response(status=self.upload_status.pop(0))
        headers = {"Location": self.location} if self.location else {}
        return web.Response(status=201, headers=headers)


@pytest.fixture
async def fs() -> AsyncIterator[FileServer]:
    srv = FileServer()
    app = web.Application()
    app.router.add_get("/files/{name}", srv.get)
    app.router.add_put("/upload/{name}", srv.put)
    srv.server = TestServer(app)
    await srv.server.start_server()
    yield srv
    await srv.server.close()


def test_file_input_fields_finds_uri_inputs_and_lists() -> None:
    assert file_input_fields(SCHEMA) == {"image": False, "images": True, "maybe": False}
    assert file_input_fields({}) == {}


@pytest.mark.parametrize(
    "candidate",
    ["../../etc/passwd", "/abs/../..", "..", ".hidden", "a/b\\..\\..\\c", "", "\x00\n"],
)
def test_safe_file_name_never_escapes(candidate: str) -> None:
    name = safe_file_name(candidate)
    assert name and "/" not in name and "\\" not in name
    assert not name.startswith(".")
    assert name not in (".", "..")


async def test_url_inputs_are_downloaded_under_dest_dir(fs: FileServer, tmp_path: Path) -> None:
    values = {
        "image": fs.url("/files/cat.png"),
        "images": [fs.url("/files/notes.txt"), fs.url("/files/cat.png")],
        "maybe": None,
        "text": "not a file",
    }
    out = await prepare_inputs(SCHEMA, values, str(tmp_path), FilesConfig(), network=LOOPBACK)
    assert out["text"] == "not a file" and out["maybe"] is None
    assert Path(out["image"]).read_bytes() == b"\x89PNG fake"
    assert Path(out["image"]).name == "cat.png"
    assert [Path(p).read_bytes() for p in out["images"]] == [b"hello", b"\x89PNG fake"]
    for p in [out["image"], *out["images"]]:
        assert os.path.realpath(p).startswith(str(tmp_path.resolve()) + os.sep)
    assert values["images"][0].startswith("http")  # the caller's dict is not changed


async def test_traversal_in_url_path_stays_inside_dest_dir(fs: FileServer, tmp_path: Path) -> None:
    fs.files["../../escape"] = b"nope"  # the server decodes %2f in the match
    url = fs.url("/files/") + "..%2f..%2fescape"
    out = await prepare_inputs(
        SCHEMA, {"image": url}, str(tmp_path / "in"), FilesConfig(), network=LOOPBACK
    )
    assert os.path.realpath(out["image"]).startswith(str((tmp_path / "in").resolve()) + os.sep)
    assert Path(out["image"]).read_bytes() == b"nope"
    assert not (tmp_path / "escape").exists()


async def test_missing_file_names_the_url_and_the_status(fs: FileServer, tmp_path: Path) -> None:
    url = fs.url("/files/missing.png") + "?token=secret"
    with pytest.raises(FileFetchError) as err:
        await prepare_inputs(SCHEMA, {"image": url}, str(tmp_path), FilesConfig(), network=LOOPBACK)
    assert err.value.status == 404
    assert "404" in str(err.value) and "/files/missing.png" in str(err.value)
    assert "secret" not in str(err.value)
    assert err.value.field == "image"


async def test_download_over_the_size_cap_fails(fs: FileServer, tmp_path: Path) -> None:
    with pytest.raises(FileFetchError, match="max_download_bytes=1000"):
        await prepare_inputs(
            SCHEMA,
            {"image": fs.url("/files/big")},
            str(tmp_path),
            FilesConfig(max_download_bytes=1000),
            network=LOOPBACK,
        )


async def test_unreachable_host_fails_naming_the_url(tmp_path: Path) -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}/x.png"
    with pytest.raises(FileFetchError, match=f"127.0.0.1:{port}/x.png"):
        await prepare_inputs(SCHEMA, {"image": url}, str(tmp_path), FilesConfig(), network=LOOPBACK)


async def test_data_uris_base64_and_percent_encoded(tmp_path: Path) -> None:
    b64 = "data:image/png;base64," + base64.b64encode(b"\x00\x01binary").decode()
    pct = "data:text/plain," + urllib.parse.quote("hello, world\n")
    out = await prepare_inputs(
        SCHEMA, {"image": b64, "images": [pct]}, str(tmp_path), FilesConfig(), network=LOOPBACK
    )
    assert Path(out["image"]).read_bytes() == b"\x00\x01binary"
    assert Path(out["image"]).suffix == ".png"
    assert Path(out["images"][0]).read_bytes() == b"hello, world\n"


@pytest.mark.parametrize(
    "value",
    [
        "/etc/passwd",
        "file:///etc/passwd",
        "ftp://x/y",
        "relative.png",
        5,
        "data:image/png;base64,%%%",
    ],
)
async def test_other_values_are_invalid_input(value: Any, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as err:
        await prepare_inputs(
            SCHEMA, {"image": value}, str(tmp_path), FilesConfig(), network=LOOPBACK
        )
    assert err.value.detail[0]["loc"] == ["body", "input", "image"]
    assert list(tmp_path.iterdir()) == []


async def test_path_output_becomes_a_data_uri(tmp_path: Path) -> None:
    f = tmp_path / "out.png"
    f.write_bytes(b"PNGDATA")
    output = {"images": [{protocol.PATH_MARKER: str(f)}], "caption": "x"}
    encoded = await encode_outputs(output, FilesConfig())
    assert encoded == {
        "images": ["data:image/png;base64," + base64.b64encode(b"PNGDATA").decode()],
        "caption": "x",
    }


async def test_output_without_paths_is_returned_as_is() -> None:
    output = {"a": [1, 2, {"b": "c"}]}
    assert await encode_outputs(output, FilesConfig()) is output


async def test_path_output_is_uploaded_and_the_put_url_returned(
    fs: FileServer, tmp_path: Path
) -> None:
    f = tmp_path / "result.txt"
    f.write_bytes(b"uploaded text")
    config = FilesConfig(upload_url=fs.url("/upload/"))
    encoded = await encode_outputs({protocol.PATH_MARKER: str(f)}, config)
    assert encoded == fs.url("/upload/result.txt")
    assert fs.uploads["result.txt"] == (b"uploaded text", "text/plain")


async def test_upload_location_header_wins_and_5xx_is_retried(
    fs: FileServer, tmp_path: Path
) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"\x00")
    fs.upload_status = [503]
    fs.location = "https://cdn.example/a.bin"
    config = FilesConfig(upload_url=fs.url("/upload"))
    assert await encode_outputs([{protocol.PATH_MARKER: str(f)}], config) == [
        "https://cdn.example/a.bin"
    ]


async def test_upload_refused_raises(fs: FileServer, tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"\x00")
    fs.upload_status = [403]
    with pytest.raises(FileUploadError, match="403"):
        await encode_outputs(
            {protocol.PATH_MARKER: str(f)}, FilesConfig(upload_url=fs.url("/upload"))
        )


async def test_large_data_uris_are_decoded_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 93 MB data: URI decoded on the loop held /health-check for 1.34 s (issue 7, finding 6).
    import threading

    import pool.files

    threads: list[int] = []
    decode = pool.files.decode_data_uri

    def recording(field: str, uri: str) -> tuple[str, bytes]:
        threads.append(threading.get_ident())
        return decode(field, uri)

    monkeypatch.setattr(pool.files, "decode_data_uri", recording)
    payload = os.urandom(pool.files.DECODE_INLINE_MAX_CHARS)  # base64: 4/3 as many chars
    big = "data:application/octet-stream;base64," + base64.b64encode(payload).decode()
    small = "data:text/plain,small"
    out = await prepare_inputs(
        SCHEMA, {"image": big, "images": [small]}, str(tmp_path), FilesConfig()
    )
    assert Path(out["image"]).read_bytes() == payload
    loop_thread = threading.get_ident()
    assert threads[0] != loop_thread  # the big one, in a worker thread
    assert threads[1] == loop_thread  # a small one is not worth a thread hop


# --- output files the record keeps ---------------------------------------------------------------
def _removals() -> tuple[list[str], OutputFiles]:
    removed: list[str] = []
    return removed, OutputFiles("/unused", "p1-0", removed.extend)


def test_a_small_file_becomes_a_data_uri_and_a_large_one_is_kept(tmp_path: Path) -> None:
    small = tmp_path / "small.png"
    small.write_bytes(b"x" * INLINE_FILE_MAX_BYTES)
    big = tmp_path / "big.png"
    big.write_bytes(b"y" * (INLINE_FILE_MAX_BYTES + 1))
    assert adopt_file(str(small), str(tmp_path / "d1"), move=False) == (
        "data:image/png;base64," + base64.b64encode(small.read_bytes()).decode()
    )
    assert not (tmp_path / "d1").exists()  # nothing kept for an inline file
    kept = adopt_file(str(big), str(tmp_path / "d2"), move=False)
    # Result: the model's own file is copied (it stays, the model may write it again).
    assert kept == FileOutput(str(tmp_path / "d2" / "big.png"), "image/png", len(big.read_bytes()))
    assert big.exists() and (tmp_path / "d2" / "big.png").read_bytes() == big.read_bytes()
    assert (tmp_path / "d2").stat().st_mode & 0o777 == 0o700


def test_a_runners_own_file_is_moved(tmp_path: Path) -> None:
    spilled = tmp_path / "cog-output-x" / "blob.bin"
    spilled.parent.mkdir()
    spilled.write_bytes(os.urandom(INLINE_FILE_MAX_BYTES + 3))
    data = spilled.read_bytes()
    kept = adopt_file(str(spilled), str(tmp_path / "d"), move=True)
    assert isinstance(kept, FileOutput) and kept.mime_type == "application/octet-stream"
    assert not spilled.exists() and Path(kept.path).read_bytes() == data


def test_an_unreadable_output_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileUploadError, match="cannot be read"):
        adopt_file(str(tmp_path / "missing.bin"), str(tmp_path / "d"), move=False)


async def test_encode_outputs_keeps_large_files_in_the_records_set(tmp_path: Path) -> None:
    big = tmp_path / "out.bin"
    big.write_bytes(os.urandom(300_000))
    small = tmp_path / "out.txt"
    small.write_bytes(b"hi")
    root = tmp_path / "outputs"
    root.mkdir()
    removed: list[str] = []
    files = OutputFiles(str(root), "p1-0", removed.extend)
    files.holds = 1
    output = [{protocol.PATH_MARKER: str(big)}, {protocol.PATH_MARKER: str(small)}]
    encoded = await encode_outputs(output, FilesConfig(), keep=lambda: files)
    # Result: the large one is a FileOutput in the set's own dir; the small one inline.
    kept, inline = encoded
    assert isinstance(kept, FileOutput) and kept.size == 300_000
    assert [os.path.dirname(kept.path)] == files.dirs == [str(root / "p1-0-0")]
    assert inline == "data:text/plain;base64," + base64.b64encode(b"hi").decode()
    assert files.bytes == 300_000
    files.release()
    assert removed == [str(root / "p1-0-0")]


def test_output_files_go_when_the_last_holder_lets_go() -> None:
    removed, files = _removals()
    files.holds = 1  # the live record
    a = files.new_dir()
    files.settled(a, FileOutput(a + "/f", "image/png", 5))
    files.settled(files.new_dir(), None)  # an inline file: nothing was made
    files.hold()  # a reader
    files.release()  # the record ended
    assert removed == [] and not files.closed and files.bytes == 5
    files.release()  # the reader is done
    assert removed == [a] and files.closed
    # A file a worker thread finished after that is removed when the thread is done, and so
    # is whatever a thread that failed half-way made.
    late = files.new_dir()
    files.settled(late, FileOutput(late + "/f", "image/png", 5))
    files.settled("/failed", None, failed=True)
    assert removed == [a, late, "/failed"]


def test_a_file_kept_after_its_record_ended_is_removed_at_once() -> None:
    removed, files = _removals()
    files.holds = 2  # the live record and a reader
    files.sealed = True  # the record ended (a deadline) while a thread still copied a file
    path = files.new_dir()
    files.settled(path, FileOutput(path + "/f", "image/png", 5))
    # Result: the file is in no output: removed as soon as the thread is done, not counted.
    assert removed == [path] and files.dirs == [] and files.bytes == 0
