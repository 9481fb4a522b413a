"""Large inputs end to end (issue 7, findings 5 and 6): a long string of a request body (a
``data:`` URI) stays a slice of the body's bytes (``pool.jsonbody``), is decoded to its file
from there and echoed from there; every other body, and every bad one, is parsed and answered
exactly as before.

Real socket, real PoolManager, real coglet runner processes. Inputs of a few MiB (over the
1 MiB threshold and slice size) keep the suite fast; bench/large_payloads.py measures 72 MiB.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from test_api_e2e import Api, Receiver, serving, wait_until

import pool.api
from pool import files
from pool.jsonbody import LARGE_LITERAL_MIN_BYTES, loads_large
from pool.jsonstream import RawText

MIB = 1 << 20


def data_uri(content: bytes, mime: str = "application/octet-stream") -> str:
    return f"data:{mime};base64," + base64.b64encode(content).decode("ascii")


def digest(content: bytes) -> list[Any]:
    return [len(content), hashlib.sha256(content).hexdigest()]


async def post_raw(api: Api, path: str, raw: bytes, **headers: str) -> tuple[int, bytes]:
    """POST ``raw`` as the body, with its Content-Length; the answer read in chunks."""
    async with api.session.post(
        api.url(path), data=raw, headers={"Content-Type": "application/json", **headers}
    ) as resp:
        chunks = [chunk async for chunk in resp.content.iter_chunked(MIB)]
        return resp.status, b"".join(chunks)


def without_the_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """The HTTP API parses every body whole, as before pool.jsonbody."""
    monkeypatch.setattr(pool.api, "loads_large", lambda raw, loads: (False, None))


def answer_without_ids(status: int, raw: bytes) -> tuple[int, Any]:
    body = json.loads(raw)
    if isinstance(body, dict):
        for key in ("id", "created_at", "started_at", "completed_at", "metrics", "logs"):
            body.pop(key, None)
    return status, body


async def test_a_large_data_uri_reaches_the_model_byte_for_byte_and_is_echoed_whole(
    tmp_path: Path, receiver: Receiver
) -> None:
    content = os.urandom(3 * MIB + 7)
    extra = os.urandom(2 * MIB)
    text = "plain text, not a URI " * (MIB // 16)  # a long str input, not a file
    body = {
        "id": "big-in",
        "input": {"data": data_uri(content), "extras": [data_uri(extra), "data:,x"], "text": text},
        "webhook": receiver.url("/hook/big"),
        "webhook_events_filter": ["completed"],
    }
    raw = json.dumps(body).encode()
    async with serving(
        tmp_path, model="digest", predictions__recent_value_max_bytes=64 * MIB
    ) as api:
        # Steps: a sync prediction with a 3 MiB file, a list of two files and a 1.4 MiB
        # string; then GET of the finished prediction; then the webhook.
        status, answer = await post_raw(api, "/predictions", raw)
        assert status == 200, answer[:500]
        prediction = json.loads(answer)
        assert prediction["status"] == "succeeded", prediction["error"]
        seen = json.loads(prediction["output"])
        # The model read the very bytes that were sent, and the very string.
        assert seen["data"] == digest(content)
        assert seen["extras"] == [digest(extra)[1], digest(b"x")[1]]
        assert seen["text"] == digest(text.encode())
        # The echo is the input as sent, byte for byte.
        assert prediction["input"] == body["input"]
        assert json.dumps(prediction["input"]).encode() in raw
        # The recent store keeps the finished record (its value limit was raised) and counts
        # the whole body its slices keep alive.
        assert api.manager._router.recent_bytes >= len(raw)
        status, got = await api.call("GET", "/predictions/big-in")
        assert status == 200 and got["input"] == body["input"]
        hooks = await wait_until(lambda: receiver.hooks.get("big"), "the completed webhook")
        assert hooks[-1]["input"] == body["input"]
        assert hooks[-1]["status"] == "succeeded"


async def test_the_recent_store_drops_a_large_input_by_default(tmp_path: Path) -> None:
    content = os.urandom(2 * MIB)
    raw = json.dumps({"id": "dropped", "input": {"data": data_uri(content)}}).encode()
    async with serving(tmp_path, model="digest") as api:
        status, answer = await post_raw(api, "/predictions", raw)
        assert status == 200 and json.loads(answer)["input"]["data"] == data_uri(content)
        # Past predictions.recent_value_max_bytes (256 KiB): the kept copy omits it, with the
        # size of what it kept alive (the whole body), and holds no slice of the body.
        status, got = await api.call("GET", "/predictions/dropped")
        assert status == 200 and got["input"] == {"data": None}
        assert got["omitted"]["input.data"] >= len(raw)
        assert api.manager._router.recent_bytes < MIB


async def test_bad_large_inputs_get_the_answers_a_whole_parse_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = data_uri(os.urandom(2 * MIB))
    cases = {
        # a Path input that is no URL at all (422 naming it, its first 80 characters shown)
        "not a url": {"input": {"data": "x" * (2 * MIB)}},
        # a data: URI whose base64 is broken in its middle (422: invalid base64)
        "bad base64": {"input": {"data": good[:MIB] + "!" + good[MIB:]}},
        # bad padding at its end
        "bad padding": {"input": {"data": good + "="}},
        # a long str input that fails its regex (validated on the real string: same message)
        "regex": {"input": {"data": "data:,x", "word": "A" * (2 * MIB)}},
        # a file past files.max_download_bytes: a failed prediction naming the limit
        "too large": {"input": {"data": data_uri(os.urandom(3 * MIB))}},
        # a list of files, one not a URL
        "list": {"input": {"data": "data:,x", "extras": [good, "y" * (2 * MIB)]}},
        # long strings where no slice is kept: context, webhook, an unknown input
        "context": {"input": {"data": "data:,x"}, "context": {"k": "v" * (2 * MIB)}},
        "webhook": {"input": {"data": "data:,x"}, "webhook": "http://" + "h" * (2 * MIB)},
        "unknown": {"input": {"data": "data:,x", "nope": "n" * (2 * MIB)}},
    }
    answers: dict[str, Any] = {}
    async with serving(tmp_path, model="digest", files__max_download_bytes=2 * MIB + 1) as api:
        for name, body in cases.items():
            answers[name] = answer_without_ids(
                *await post_raw(api, "/predictions", json.dumps(body).encode())
            )
        without_the_parser(monkeypatch)
        for name, body in cases.items():
            whole = answer_without_ids(
                *await post_raw(api, "/predictions", json.dumps(body).encode())
            )
            assert answers[name] == whole, name
    assert answers["not a url"][0] == 422
    assert "is not an http(s) URL or a data: URI" in json.dumps(answers["not a url"][1])
    assert answers["bad base64"][0] == 422 and "invalid base64" in json.dumps(answers["bad base64"])
    assert answers["regex"][0] == 422 and "does not match regex" in json.dumps(answers["regex"])
    status, too_large = answers["too large"]
    assert status == 200 and too_large["status"] == "failed"
    assert "files.max_download_bytes" in too_large["error"]
    assert answers["context"][0] == 200 and answers["unknown"][0] == 200
    assert answers["webhook"][0] == 422


HOSTILE = {
    "truncated": b'{"input": {"data": "data:,' + b"a" * (2 * MIB),
    "truncated after": b'{"input": {"data": "data:,' + b"a" * (2 * MIB) + b'"',
    "lone surrogate": b'{"input": {"data": "data:,' + b"a" * (2 * MIB) + b'\\ud800"}}',
    "bad utf-8": b'{"input": {"data": "data:,' + b"a" * (2 * MIB) + b'\xff\xfe"}}',
    "bad utf-8 after": b'{"input": {"data": "data:,' + b"a" * (2 * MIB) + b'"}, "x": "\xc3"}',
    "escapes": b'{"input": {"data": "data:,' + b"a\\n" * MIB + b'"}}',
    "escaped quote": b'{"input": {"data": "data:,' + b"a" * MIB + b'\\"' + b"b" * MIB + b'"}}',
    "huge key": b'{"input": {"' + b"k" * (2 * MIB) + b'": "data:,x"}}',
    "deep": b'{"input": {"data": "'
    + b"a" * (2 * MIB)
    + b'"}, "x": '
    + b"[" * 200
    + b"]" * 200
    + b"}",
    "very deep": b'{"input": {"data": "' + b"a" * (2 * MIB) + b'"}, "x": ' + b"[" * 100_000 + b"}",
    "nan": b'{"input": {"data": "data:,' + b"a" * (2 * MIB) + b'", "x": NaN}}',
    "1e309": b'{"input": {"data": "data:,' + b"a" * (2 * MIB) + b'", "n": 1e309}}',
    "control char": b'{"input": {"data": "data:,' + b"a" * (2 * MIB) + b'\x01"}}',
    "not an object": b'["data:,' + b"a" * (2 * MIB) + b'"]',
    "top string": b'"' + b"a" * (2 * MIB) + b'"',
    "two values": b'{"input": {"data": "data:,' + b"a" * (2 * MIB) + b'"}} {}',
    "bare run": b'{"input": {"data": "data:,x"}, "n": [' + b"1," * MIB + b'1], "s": "t"}',
}


async def test_hostile_large_bodies_get_the_answers_a_whole_parse_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = {}
    async with serving(tmp_path, model="digest") as api:
        for name, raw in HOSTILE.items():
            answers[name] = answer_without_ids(*await post_raw(api, "/predictions", raw))
        without_the_parser(monkeypatch)
        for name, raw in HOSTILE.items():
            assert answers[name] == answer_without_ids(*await post_raw(api, "/predictions", raw)), (
                name
            )
        # The pool still serves.
        status, answer = await post_raw(
            api, "/predictions", json.dumps({"input": {"data": "data:,ok"}}).encode()
        )
        assert status == 200 and json.loads(answer)["status"] == "succeeded"
    for name in (
        "truncated",
        "truncated after",
        "bad utf-8",
        "bad utf-8 after",
        "very deep",
        "nan",
        "control char",
        "two values",
    ):
        assert answers[name][0] == 400, name
    for name in ("lone surrogate", "1e309", "not an object"):
        assert answers[name][0] == 422, name


def test_a_long_literal_is_kept_as_a_slice_of_the_body_not_copied() -> None:
    payload = "data:application/octet-stream;base64," + "QUJD" * (4 * MIB)  # 16 MiB
    raw = json.dumps({"input": {"data": payload, "n": 1}, "context": {"a": "b"}}).encode()
    tracemalloc.start()
    try:
        body = pool.api._parse_json(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    value = body["input"]["data"]
    assert isinstance(value, RawText) and value.view.obj is raw
    assert value == payload and body["input"]["n"] == 1 and body["context"] == {"a": "b"}
    # A 1 MiB slice at a time is looked at; no copy of the 16 MiB literal (a whole parse
    # makes a 16 MiB str beside the body: peak >= 16 MiB).
    assert peak < 3 * MIB, peak


def test_a_data_uri_slice_is_decoded_to_its_file_a_slice_at_a_time(tmp_path: Path) -> None:
    content = os.urandom(12 * MIB + 5)
    raw = json.dumps({"input": {"data": data_uri(content)}}).encode()
    split, body = loads_large(raw, json.loads)
    assert split
    tracemalloc.start()
    try:
        path, too_large = files._decode_raw_to_file(
            "data", body["input"]["data"], str(tmp_path), 1 << 30
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert path is not None and not too_large
    assert Path(path).read_bytes() == content
    assert Path(path).name == "file.bin" or Path(path).suffix  # named from its mime type
    assert peak < 5 * MIB, peak  # decoded whole: 12 MiB of bytes, and a join of them


def test_small_bodies_are_not_scanned() -> None:
    raw = json.dumps({"input": {"data": "x" * 1000}}).encode()
    assert loads_large(raw, json.loads) == (False, None)
    assert LARGE_LITERAL_MIN_BYTES == MIB
