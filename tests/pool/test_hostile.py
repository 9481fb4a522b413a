"""Hostile request bodies against the real pool: each gets a clear 4xx, the pool keeps serving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_api_e2e import Api, serving


async def still_serving(api: Api) -> None:
    status, health = await api.call("GET", "/health-check")
    assert status == 200 and health["status"] == "READY"
    status, body = await api.call("POST", "/predictions", json={"input": {"text": "ok"}})
    assert status == 200 and body["output"] == "hello ok"


def raw(data: bytes | str) -> dict[str, Any]:
    return {"data": data, "headers": {"Content-Type": "application/json"}}


async def test_deep_nesting_is_400_never_a_crash(tmp_path: Path) -> None:
    async with serving(tmp_path) as api:
        for depth in (100, 10_000, 1_000_000):
            body = '{"input": {"text": ' + "[" * depth + "]" * depth + "}}"
            status, answer = await api.call("POST", "/predictions", **raw(body))
            assert status == 400, (depth, answer)
            assert "nested deeper" in answer["detail"]
        # Within the depth limit, a nested value of the wrong type is a plain 422.
        nested = '{"input": {"text": ' + "[" * 30 + "]" * 30 + "}}"
        status, answer = await api.call("POST", "/predictions", **raw(nested))
        assert status == 422 and answer["detail"][0]["loc"] == ["body", "input", "text"]
        await still_serving(api)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b'{"input": {"text": "\xff\xfe"}}', "not UTF-8"),
        ('{"input": {"text": "x"}, "n": NaN}', "NaN"),
        ('{"input": {"sleep_s": Infinity, "text": "x"}}', "Infinity"),
        ('{"input": {"text": "x"}, "n": ' + "9" * 5000 + "}", "a 5000-digit integer"),
        ("input=text", "a form body"),
        ('{"input": {"text": "x"}', "a truncated body"),
    ],
)
async def test_undecodable_bodies_are_400(tmp_path: Path, data: bytes | str, why: str) -> None:
    async with serving(tmp_path) as api:
        status, answer = await api.call("POST", "/predictions", **raw(data))
        assert status == 400, why
        assert isinstance(answer["detail"], str)
        await still_serving(api)


async def test_wrong_types_are_422_naming_the_field(tmp_path: Path) -> None:
    cases: list[tuple[Any, list[Any]]] = [
        ("just a string", ["body"]),
        (None, ["body"]),
        ({"input": ["text"]}, ["body", "input"]),
        ({"input": {"text": 123}}, ["body", "input", "text"]),
        ({"input": {"text": {"$gt": ""}}}, ["body", "input", "text"]),
        ({"input": {"text": "x", "sleep_s": "soon"}}, ["body", "input", "sleep_s"]),
        ({"input": {"text": "x"}, "id": 7}, ["body", "id"]),
        ({"input": {"text": "x"}, "id": "a/../../b"}, ["body", "id"]),
        ({"input": {"text": "x"}, "id": "x" * 500}, ["body", "id"]),
        (
            {"input": {"text": "x"}, "webhook_events_filter": "start"},
            ["body", "webhook_events_filter"],
        ),
        ({"input": {"text": "x"}, "context": {"k": 1}}, ["body", "context"]),
        ({"input": {"text": "x"}, "webhook": "file:///etc/passwd"}, ["body", "webhook"]),
    ]
    async with serving(tmp_path) as api:
        for body, loc in cases:
            status, answer = await api.call("POST", "/predictions", **raw(json.dumps(body)))
            assert status == 422, (body, answer)
            assert answer["detail"][0]["loc"] == loc, (body, answer)
        # A valid JSON number that overflows a float is out of range, not a crash.
        status, answer = await api.call(
            "POST", "/predictions", **raw('{"input": {"text": "x", "sleep_s": 1e999}}')
        )
        assert status == 422 and answer["detail"][0]["loc"] == ["body", "input", "sleep_s"]
        await still_serving(api)


async def test_traversal_ids_in_the_path_are_refused(tmp_path: Path) -> None:
    async with serving(tmp_path) as api:
        status, answer = await api.call("PUT", "/predictions/..%2F..%2Fetc", json={"input": {}})
        assert status == 422 and answer["detail"][0]["loc"] == ["path", "prediction_id"]
        status, answer = await api.call("GET", "/predictions/..%2F..%2Fetc")
        assert status == 404
        status, answer = await api.call("POST", "/predictions/..%2F..%2Fetc/cancel")
        assert status == 404
        await still_serving(api)


async def test_huge_strings_are_carried_through(tmp_path: Path) -> None:
    text = "x" * (4 * 1024 * 1024)
    async with serving(tmp_path) as api:
        status, body = await api.call(
            "POST", "/predictions", json={"input": {"text": text, "unknown": "y" * 1_000_000}}
        )
        assert status == 200 and body["output"] == "hello " + text
        await still_serving(api)


async def test_body_over_the_limit_is_413_json(tmp_path: Path) -> None:
    async with serving(tmp_path, http__max_body_bytes=64 * 1024) as api:
        status, answer = await api.call(
            "POST", "/predictions", json={"input": {"text": "x" * 100_000}}
        )
        assert status == 413 and "detail" in answer
        await still_serving(api)
