"""The PoolManager facade: health, metrics, health sources, webhooks, file inputs."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

from aiohttp import web
from pool_helpers import make_config, path_exists, running_pool, wait_until

from pool.manager import PoolManager
from pool.metrics import Metrics
from pool.prediction import Prediction, PredictionRequest


async def submit(manager: PoolManager, **inputs: Any) -> Prediction:
    return await manager.submit(PredictionRequest(id=None, input=inputs))


async def test_health_shape_and_concurrency(tmp_path: Path) -> None:
    config = make_config(tmp_path, runners__gpus="0,1")
    async with running_pool(config) as manager:
        await wait_until(
            lambda: all(r["status"] == "READY" for r in manager.health()["runners"]),
            what="both READY",
        )
        manager.add_health_source("redis", lambda: {"state": "connected"})
        manager.add_health_source("broken", lambda: 1 / 0)  # type: ignore[arg-type,return-value]
        running = await submit(manager, sleep_s=60)
        await wait_until(lambda: running.status == "processing", what="running")
        health = manager.health()
        await manager.cancel(running.id)
        await running.wait(30)
    assert health["status"] == "READY"  # one runner still has a free slot
    assert health["setup"]["status"] == "succeeded"
    assert "worker setup done" in health["setup"]["logs"]
    assert health["concurrency"] == {"max": 2, "current": 1}
    assert [(r["index"], r["gpu"], r["capacity"]) for r in health["runners"]] == [
        (0, "0", 1),
        (1, "1", 1),
    ]
    assert sorted(r["status"] for r in health["runners"]) == ["BUSY", "READY"]
    assert all(isinstance(r["pid"], int) and r["restarts"] == 0 for r in health["runners"])
    assert health["redis"] == {"state": "connected"}
    assert "division by zero" in health["broken"]["error"]


async def test_status_busy_when_every_slot_is_taken(tmp_path: Path) -> None:
    async with running_pool(make_config(tmp_path)) as manager:
        running = await submit(manager, sleep_s=60)
        assert manager.status == "BUSY"
        await manager.cancel(running.id)
        await running.wait(30)
        await wait_until(lambda: manager.status == "READY", what="READY again")


async def test_schema_comes_from_the_runner(tmp_path: Path) -> None:
    async with running_pool(make_config(tmp_path)) as manager:
        schema = manager.schema
    assert schema is not None
    assert set(schema["components"]["schemas"]["Input"]["properties"]) >= {"sleep_s", "n"}


async def test_metrics_count_finished_predictions(tmp_path: Path) -> None:
    metrics = Metrics()
    manager = PoolManager(make_config(tmp_path), metrics=metrics)
    await manager.start()
    try:
        await wait_until(lambda: manager.status == "READY", what="READY")
        ok = await manager.submit(PredictionRequest(id=None, input={}), source="redis")
        bad = await submit(manager, fail=True)
        await asyncio.gather(ok.wait(30), bad.wait(30))
        text = metrics.render()
    finally:
        await manager.shutdown(10)
    assert 'cog_pool_predictions_total{source="redis",status="succeeded"} 1' in text
    assert 'cog_pool_predictions_total{source="http",status="failed"} 1' in text
    assert 'cog_pool_runners{state="READY"} 1' in text
    assert "cog_pool_queue_depth 0" in text
    assert bad.error is not None and "asked to fail" in bad.error


async def test_webhooks_are_sent_for_a_prediction(tmp_path: Path) -> None:
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with running_pool(make_config(tmp_path)) as manager:
            request = PredictionRequest(
                id=None,
                input={"n": 7},
                webhook=f"http://127.0.0.1:{port}/hook",
                webhook_events_filter=("start", "completed"),
            )
            p = await manager.submit(request)
            await p.wait(30)
            await wait_until(
                lambda: any(r["status"] == "succeeded" for r in received),
                what="terminal webhook",
            )
    finally:
        await runner.cleanup()
    assert received[0]["status"] == "processing"
    assert received[-1]["status"] == "succeeded"
    assert json.loads(received[-1]["output"])["n"] == 7


async def test_data_uri_file_input_is_local_for_the_runner_and_removed(tmp_path: Path) -> None:
    config = make_config(tmp_path, "file_in")
    async with running_pool(config) as manager:
        data = "data:text/plain;base64," + base64.b64encode(b"file body").decode()
        p = await submit(manager, doc=data)
        await p.wait(30)
        inputs_dir = Path(manager.inputs_dir, p.id)
        # Removed in a thread once the prediction ended (a big tree must not stall the loop).
        await wait_until(lambda: not path_exists(str(inputs_dir)), what="input dir removed")
    assert p.status == "succeeded", p.error
    assert p.output == "file body"
    assert p.input == {"doc": data}  # the client's input is shown as it was given
