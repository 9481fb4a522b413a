"""SSE for @cog.streaming models through a real socket and a real runner (issue 9).

Framing checked against Cog 0.23.1 serving tests/models/api/sse (with the schema file `cog
build` writes): ``event: <name>\\ndata: <compact JSON>\\n\\n``; ``start``, one ``output``
``{"chunk", "index"}`` per item, ``metric`` ``{"mode", "name", "value"}``, ``completed`` with
the final prediction; 406 with Cog's words for a model without @cog.streaming; a second PUT
replays the history then continues live, or, past the history's capacity, gets Cog's
``event: error`` and the stream ends.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
from test_api_e2e import PROJECT, Api, serving, wait_until

from pool.config import load_config
from pool.sse import NOT_STREAMING, REPLAY_TRUNCATED

SSE = {"Accept": "text/event-stream"}
DEADLINE_S = 30.0  # a stream that stalls fails the test instead of hanging it


class Events:
    """An open event stream, read one event at a time."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.seen: list[tuple[str, Any]] = []

    async def next(self) -> tuple[str, Any] | None:
        """The next event, or None at the end of the stream."""
        name, data = None, None
        while True:
            line = await asyncio.wait_for(self.resp.content.readline(), DEADLINE_S)
            if not line:
                return None
            text = line.decode().rstrip("\n")
            if text.startswith("event: "):
                name = text[len("event: ") :]
            elif text.startswith("data: "):
                data = json.loads(text[len("data: ") :])
            elif text == "" and name is not None:
                self.seen.append((name, data))
                return name, data

    async def until(self, count: int) -> list[tuple[str, Any]]:
        while len(self.seen) < count:
            if await self.next() is None:
                raise AssertionError(f"stream ended after {self.seen}")
        return self.seen

    async def until_outputs(self, count: int) -> list[tuple[str, Any]]:
        """Read on until ``count`` output events have come (metric events come between)."""
        while len(outputs(self.seen)) < count:
            if await self.next() is None:
                raise AssertionError(f"stream ended after {self.seen}")
        return self.seen

    async def rest(self) -> list[tuple[str, Any]]:
        while await self.next() is not None:
            pass
        return self.seen


async def open_stream(api: Api, method: str, path: str, body: dict[str, Any]) -> Events:
    resp = await asyncio.wait_for(
        api.session.request(method, api.url(path), json=body, headers=SSE), DEADLINE_S
    )
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == "text/event-stream"
    return Events(resp)


def outputs(events: list[tuple[str, Any]]) -> list[Any]:
    return [data for name, data in events if name == "output"]


async def test_a_stream_has_start_outputs_metrics_and_completed(tmp_path: Path) -> None:
    async with serving(tmp_path, "sse") as api:
        stream = await open_stream(api, "POST", "/predictions", {"input": {"n": 3}})
        events = await stream.rest()
    names = [name for name, _ in events]
    assert names[0] == "start" and names[-1] == "completed", names
    assert events[0][1]["status"] == "processing"
    assert outputs(events) == [{"chunk": f"tok{i}", "index": i} for i in range(3)]
    metrics = {d["name"]: d for name, d in events if name == "metric"}
    assert metrics == {
        "temperature": {"mode": "replace", "name": "temperature", "value": 0.5},
        "tokens": {"mode": "replace", "name": "tokens", "value": 3},
    }
    final = events[-1][1]
    assert final["status"] == "succeeded" and final["output"] == ["tok0", "tok1", "tok2"]
    assert final["id"] == events[0][1]["id"] and "predict_time" in final["metrics"]


async def test_chunks_reach_the_client_while_the_model_still_runs(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    async with serving(tmp_path, "sse") as api:
        body = {"id": "live", "input": {"n": 4, "gate": str(gate), "gate_after": 2}}
        stream = await open_stream(api, "PUT", "/predictions/live", body)
        events = await stream.until_outputs(2)  # tok0, tok1: the model now waits on the gate
        assert outputs(events) == [{"chunk": "tok0", "index": 0}, {"chunk": "tok1", "index": 1}]
        assert api.manager.get("live").status == "processing"  # not buffered to the end
        gate.touch()
        events = await stream.rest()
    assert [o["index"] for o in outputs(events)] == [0, 1, 2, 3]
    assert events[-1][0] == "completed"


async def test_the_stream_example_streams_its_tokens(tmp_path: Path) -> None:
    # examples/README.md: curl -N -H 'Accept: text/event-stream' ... against examples/stream.
    async with serving(tmp_path, str(PROJECT / "examples" / "stream")) as api:
        assert api.manager.streaming
        body = {"input": {"prompt": "the quick fox", "max_tokens": 4}}
        stream = await open_stream(api, "POST", "/predictions", body)
        events = await stream.rest()
    chunks = [o["chunk"] for o in outputs(events)]
    assert chunks == ["the ", "quick ", "fox ", "the "]
    assert events[0][0] == "start" and events[-1][0] == "completed"
    assert events[-1][1]["output"] == chunks


async def test_metrics_reach_the_client_while_the_model_still_runs(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    async with serving(tmp_path, "sse") as api:
        body = {"id": "m", "input": {"n": 4, "gate": str(gate), "gate_after": 2}}
        stream = await open_stream(api, "PUT", "/predictions/m", body)
        live: dict[str, Any] = {}
        while live.get("tokens", {}).get("value") != 2:  # the model waits on the gate now
            event = await stream.next()
            assert event is not None and event[0] != "completed", stream.seen
            if event[0] == "metric":
                live[event[1]["name"]] = event[1]
        assert api.manager.get("m").status == "processing"
        assert live["temperature"] == {"mode": "replace", "name": "temperature", "value": 0.5}
        gate.touch()
        events = await stream.rest()
    tokens = [d["value"] for name, d in events if name == "metric" and d["name"] == "tokens"]
    assert tokens[-1] == 4 and tokens == sorted(tokens)  # each sent once per change, in order
    assert len([d for name, d in events if name == "metric" and d["name"] == "temperature"]) == 1


async def test_a_model_without_cog_streaming_answers_406(tmp_path: Path) -> None:
    # An undecorated iterator (tests/models/api/stream) answers JSON without the header.
    async with serving(tmp_path, "stream") as api:
        status, body = await api.call("POST", "/predictions", json={"input": {"n": 2}}, headers=SSE)
        assert status == 406 and body == {"error": NOT_STREAMING}
        assert NOT_STREAMING.startswith("This model does not support streaming responses")
        status, body = await api.call("PUT", "/predictions/x", json={"input": {}}, headers=SSE)
        assert status == 406, body
        status, body = await api.call("POST", "/predictions", json={"input": {"n": 2}})
        assert status == 200 and body["output"] == ["t0", "t1"], body
        status, doc = await api.call("GET", "/openapi.json")
        assert status == 200 and "x-cog-streaming" not in doc["paths"]["/predictions"]["post"]


async def test_a_second_put_replays_the_history_then_continues_live(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    async with serving(tmp_path, "sse") as api:
        body = {"input": {"n": 4, "gate": str(gate), "gate_after": 2}}
        first = await open_stream(api, "PUT", "/predictions/twice", body)
        await first.until(3)
        second = await open_stream(api, "PUT", "/predictions/twice", body)
        replayed = await second.until(3)
        assert [n for n, _ in replayed] == ["start", "output", "output"]
        assert outputs(replayed) == outputs(first.seen)
        gate.touch()
        a, b = await first.rest(), await second.rest()
    assert a == b  # the same events, the replayed ones and the live ones
    assert [o["index"] for o in outputs(b)] == [0, 1, 2, 3]
    # One prediction ran, not two.
    assert a[-1][1]["output"] == ["tok0", "tok1", "tok2", "tok3"]


async def test_a_replay_past_the_capacity_ends_with_cogs_error(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    async with serving(tmp_path, "sse", http__stream_history_capacity=2) as api:
        body = {"input": {"n": 4, "gate": str(gate), "gate_after": 2}}
        first = await open_stream(api, "PUT", "/predictions/lost", body)
        await first.until_outputs(2)  # start, 2 outputs, 2 metrics: 5 events > 2
        second = await open_stream(api, "PUT", "/predictions/lost", body)
        events = await second.rest()
        assert events == [("error", {"error": REPLAY_TRUNCATED, "skipped": 3})]
        assert REPLAY_TRUNCATED.startswith("SSE stream replay truncated")
        gate.touch()
        full = await first.rest()  # the creator's stream is not bounded by it
    assert [o["index"] for o in outputs(full)] == [0, 1, 2, 3]


async def test_capacity_zero_gives_a_second_subscriber_only_live_events(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    async with serving(tmp_path, "sse", http__stream_history_capacity=0) as api:
        body = {"input": {"n": 4, "gate": str(gate), "gate_after": 2}}
        first = await open_stream(api, "PUT", "/predictions/zero", body)
        await first.until_outputs(2)
        second = await open_stream(api, "PUT", "/predictions/zero", body)
        gate.touch()
        events = await second.rest()
        await first.rest()
    assert [o["index"] for o in outputs(events)] == [2, 3]
    assert events[0][0] == "output" and events[-1][0] == "completed"


async def test_a_stream_client_that_goes_away_cancels_its_prediction(tmp_path: Path) -> None:
    gate = tmp_path / "gate"  # never opened
    async with serving(tmp_path, "sse") as api:
        body = {"input": {"n": 4, "gate": str(gate), "gate_after": 1}}
        stream = await open_stream(api, "PUT", "/predictions/gone", body)
        await stream.until(2)
        stream.resp.close()
        await wait_until(
            lambda: api.manager.get("gone").status == "canceled", "the prediction canceled"
        )


def test_cogs_stream_history_variable_sets_the_capacity() -> None:
    model = str(Path(__file__).resolve().parent.parent / "models" / "api" / "sse")
    config = load_config(
        None, env={"COG_STREAM_HISTORY_CAPACITY": "7"}, overrides={"model.path": model}
    )
    assert config.http.stream_history_capacity == 7
    config = load_config(
        None,
        env={
            "COG_STREAM_HISTORY_CAPACITY": "7",
            "COG_POOL_HTTP_STREAM_HISTORY_CAPACITY": "9",
        },
        overrides={"model.path": model},
    )
    assert config.http.stream_history_capacity == 9
