"""Issue 9 through a real socket: real PoolManager, real runner processes, models from
tests/models/compat. Each scenario says its steps, then the result."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from pool_helpers import wait_until

from pool.api import COG_SETUP_NOT_FINISHED, create_app
from pool.config import load_config
from pool.manager import PoolManager

COMPAT = Path(__file__).resolve().parent.parent / "models" / "compat"
DEADLINE_S = 60.0


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, model_dir: Path, *, ready: str = "READY", **overrides: Any
) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    values = {
        "model.path": str(model_dir),
        "state_dir": str(tmp_path / "state"),
        "runners.count": 1,
        "shutdown.grace_s": 10.0,
        **{k.replace("__", "."): v for k, v in overrides.items()},
    }
    config = load_config(None, env={}, overrides=values)
    manager = PoolManager(config)
    runner = web.AppRunner(create_app(config, manager))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        async with aiohttp.ClientSession() as session:
            await wait_until(
                lambda: manager.status == ready, timeout_s=DEADLINE_S, what=f"pool {ready}"
            )
            yield session, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def post(session: aiohttp.ClientSession, url: str, input: dict) -> tuple[int, Any]:
    async with session.post(f"{url}/predictions", json={"input": input}) as resp:
        return resp.status, await resp.json()


async def test_union_inputs_over_http(tmp_path: Path) -> None:
    async with serving(tmp_path, COMPAT, model__predict="shapes.py:Unions") as (session, url):
        # Steps: an int and a float for `str | float | None`, then a bool.
        status, body = await post(session, url, {"u": 1, "nums": [1, 2.5]})
        assert status == 200 and body["status"] == "succeeded", body
        assert body["output"] == "[['int', 1], [['int', 1], ['float', 2.5]], ['int', 0]]"
        status, body = await post(session, url, {"u": True})
        # Result: the bool is refused by the pool before any runner is used.
        assert status == 422
        assert body["detail"][0]["loc"] == ["body", "input", "u"]
        assert "is not one of the types: string, number" in body["detail"][0]["msg"]


async def test_cog_error_text_over_http(tmp_path: Path) -> None:
    async with serving(tmp_path, COMPAT, model__predict="errors.py:Sync") as (session, url):
        status, body = await post(session, url, {"kind": "value"})
    assert status == 200 and body["status"] == "failed"
    assert (
        body["error"] == "Prediction failed: Prediction failed: ValueError: this is a value error"
    )
    assert "Traceback (most recent call last)" in body["logs"]


async def test_cog_yaml_run_key(tmp_path: Path) -> None:
    # tests/models/compat/cog.yaml says `run: "runner.py:Runner"` (Cog 0.23's spelling).
    async with serving(tmp_path, COMPAT) as (session, url):
        status, body = await post(session, url, {"text": "it"})
    assert status == 200 and body["output"] == "ran it"


async def test_setup_timeout_from_cog_yaml_environment(tmp_path: Path) -> None:
    # Steps: a model whose setup() sleeps for an hour, with COG_SETUP_TIMEOUT=1 in cog.yaml.
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(COMPAT / "errors.py", model)
    (model / "cog.yaml").write_text(
        'predict: "errors.py:SlowSetup"\nenvironment:\n  - COG_SETUP_TIMEOUT=1\n'
    )
    async with serving(tmp_path, model, ready="SETUP_FAILED") as (session, url):
        async with session.get(f"{url}/health-check") as resp:
            health = await resp.json()
        status, body = await post(session, url, {})
    # Result: setup failed with Cog's text; predictions get Cog's 503 body.
    assert health["setup"]["status"] == "failed"
    assert health["setup"]["logs"].endswith("worker setup timed out\n")
    assert status == 503
    assert body["status"] == "failed" and body["error"] == COG_SETUP_NOT_FINISHED
    assert json.dumps(body)  # a JSON body, as every error answer
