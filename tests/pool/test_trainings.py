"""Trainings (cog.yaml ``train:``) through a real socket and a real runner (issue 9).

Routes as Cog 0.23.1 serves them: ``POST /trainings``, ``PUT /trainings/{id}``,
``POST /trainings/{id}/cancel``, plus our ``GET /trainings/{id}``; inputs validated against
``TrainingInput`` before a runner is used; webhooks as for predictions; a returned BaseModel
with a Path field comes back as a data URI; ``/openapi.json`` has the training paths. A model
without ``train:`` answers 404.
"""

from __future__ import annotations

import base64
from pathlib import Path

from test_api_e2e import Receiver, serving, wait_until


async def test_a_sync_training_runs_train_and_returns_its_weights(tmp_path: Path) -> None:
    async with serving(tmp_path, "train") as api:
        status, body = await api.call("POST", "/trainings", json={"input": {"steps": 3}})
        assert status == 200, body
        assert body["status"] == "succeeded", body
        assert body["output"]["steps"] == 3
        weights = body["output"]["weights"]
        assert weights.startswith("data:") and base64.b64decode(weights.split(",", 1)[1]) == (
            b"lora:3"
        )
        assert "training 3 steps (lora)" in body["logs"]
        # A prediction on the same runner still runs predict().
        status, body = await api.call("POST", "/predictions", json={"input": {"text": "y"}})
        assert status == 200 and body["output"] == "predicted y", body


async def test_training_input_is_validated_against_training_input(tmp_path: Path) -> None:
    async with serving(tmp_path, "train") as api:
        status, body = await api.call("POST", "/trainings", json={"input": {"steps": 0}})
        assert status == 422, body
        assert body["detail"][0]["loc"] == ["body", "input", "steps"]
        status, body = await api.call("POST", "/trainings", json={"input": {"mode": "half"}})
        assert status == 422 and body["detail"][0]["loc"] == ["body", "input", "mode"], body
        # `text` is a prediction input, not a training one: ignored, as Cog drops unknown keys.
        status, body = await api.call("POST", "/trainings", json={"input": {"text": "x"}})
        assert status == 200 and body["output"]["steps"] == 2, body


async def test_a_failing_training_names_the_exception(tmp_path: Path) -> None:
    async with serving(tmp_path, "train") as api:
        status, body = await api.call("POST", "/trainings", json={"input": {"steps": 13}})
        assert status == 200 and body["status"] == "failed", body
        assert "ValueError: unlucky step count" in body["error"]


async def test_put_is_idempotent_get_reads_and_cancel_stops_a_training(
    tmp_path: Path, receiver: Receiver
) -> None:
    async with serving(tmp_path, "train") as api:
        status, body = await api.call(
            "PUT",
            "/trainings/t-1",
            json={"input": {"hold_s": 300}, "webhook": receiver.url("/hook/t1")},
            headers={"Prefer": "respond-async"},
        )
        assert status == 202 and body["id"] == "t-1" and body["status"] == "starting", body
        await wait_until(lambda: api.manager.get("t-1").status == "processing", "running")
        status, again = await api.call(
            "PUT",
            "/trainings/t-1",
            json={"input": {"hold_s": 300}},
            headers={"Prefer": "respond-async"},
        )
        assert status == 202 and again["id"] == "t-1", again
        status, got = await api.call("GET", "/trainings/t-1")
        assert status == 200 and got["status"] == "processing", got
        status, canceled = await api.call("POST", "/trainings/t-1/cancel")
        assert status == 200, canceled
        await wait_until(lambda: receiver.terminal("t1"), "the terminal webhook")
        assert receiver.terminal("t1")[-1]["status"] == "canceled"
        status, got = await api.call("GET", "/trainings/t-1")
        assert status == 200 and got["status"] == "canceled", got
        # A prediction's id is not a training's.
        status, _ = await api.call("POST", "/predictions", json={"id": "p-1", "input": {}})
        status, body = await api.call("GET", "/trainings/p-1")
        assert status == 404, body
        status, body = await api.call("POST", "/trainings/nope/cancel")
        assert status == 404, body
        status, body = await api.call("PUT", "/trainings/t-2", json={"id": "other", "input": {}})
        assert status == 422 and "training id in body" in body["detail"][0]["msg"], body


async def test_openapi_has_the_training_paths_only_with_train(tmp_path: Path) -> None:
    async with serving(tmp_path / "a", "train") as api:
        status, doc = await api.call("GET", "/openapi.json")
        assert status == 200
        assert {"/trainings", "/trainings/{training_id}", "/trainings/{training_id}/cancel"} <= set(
            doc["paths"]
        )
        assert "TrainingInput" in doc["components"]["schemas"]
        assert doc["paths"]["/trainings"]["post"]["requestBody"]["content"]["application/json"][
            "schema"
        ] == {"$ref": "#/components/schemas/TrainingRequest"}
    async with serving(tmp_path / "b", "echo") as api:
        status, doc = await api.call("GET", "/openapi.json")
        assert not any(p.startswith("/trainings") for p in doc["paths"])


async def test_a_model_without_train_answers_404(tmp_path: Path) -> None:
    async with serving(tmp_path, "echo") as api:
        status, body = await api.call("POST", "/trainings", json={"input": {}})
        assert status == 404 and "no trainer" in body["detail"], body
        status, body = await api.call("PUT", "/trainings/x", json={"input": {}})
        assert status == 404, body


async def test_sse_on_a_training_route_is_406_as_cog(tmp_path: Path) -> None:
    async with serving(tmp_path, "train") as api:
        status, body = await api.call(
            "POST",
            "/trainings",
            json={"input": {}},
            headers={"Accept": "text/event-stream"},
        )
        assert status == 406
        assert body == {"error": "Training endpoints do not support streaming responses."}
