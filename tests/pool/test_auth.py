"""http.auth_token: every route of the app's route table, with no, a wrong and the right token.

The routes are read from the application itself, so a route added later is covered without
editing this file. The server is real (aiohttp on a socket); the manager is test_api's fake.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pool_helpers import MODELS
from test_api import FakeManager

from pool.api import OPEN_PATHS, create_app
from pool.config import HttpConfig, PoolConfig, load_config
from pool.errors import ConfigError

TOKEN = "s3cret-token-for-tests"


class Served:
    def __init__(self, app: web.Application, session: aiohttp.ClientSession, port: int) -> None:
        self.app = app
        self.session = session
        self.port = port

    async def call(self, method: str, path: str, token: str | None, **kw: Any) -> tuple[int, Any]:
        headers = kw.pop("headers", {})
        if token is not None:
            headers["Authorization"] = token
        url = f"http://127.0.0.1:{self.port}{path}"
        async with self.session.request(method, url, headers=headers, **kw) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            if r.status == 401:
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
            return r.status, body


async def serve(http: HttpConfig) -> tuple[web.AppRunner, Served, aiohttp.ClientSession]:
    app = create_app(PoolConfig(http=http), FakeManager())
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    session = aiohttp.ClientSession()
    return runner, Served(app, session, runner.addresses[0][1]), session


@pytest.fixture
async def guarded() -> AsyncIterator[Served]:
    runner, served, session = await serve(HttpConfig(auth_token=TOKEN))
    yield served
    await session.close()
    await runner.cleanup()


def route_table(app: web.Application) -> list[tuple[str, str]]:
    """(method, concrete path) for every route the app serves; path parameters filled in."""
    out = []
    for route in app.router.routes():
        canonical = route.resource.canonical if route.resource is not None else ""
        out.append((route.method, re.sub(r"\{[^}]+\}", "p1", canonical)))
    assert len(out) >= 10, out  # the table was read, not an empty list
    return out


def request_kw(method: str) -> dict[str, Any]:
    return {"json": {"input": {"text": "x"}}} if method in ("POST", "PUT") else {}


async def test_every_route_but_the_probes_needs_the_token(guarded: Served) -> None:
    routes = route_table(guarded.app)
    assert {p for _, p in routes} >= OPEN_PATHS | {"/metrics", "/predictions"}
    for method, path in routes:
        open_route = path in OPEN_PATHS
        for token in (None, "Bearer wrong-token", f"Basic {TOKEN}", "Bearer", TOKEN):
            status, body = await guarded.call(method, path, token, **request_kw(method))
            if open_route:
                assert status != 401, (method, path, token)
            else:
                assert status == 401, (method, path, token, status)
                if method != "HEAD":
                    assert "Bearer" in body["detail"], body
        status, body = await guarded.call(method, path, f"Bearer {TOKEN}", **request_kw(method))
        assert status != 401, (method, path, body)
        assert status != 500, (method, path, body)  # 503 after /shutdown is its answer


async def test_unknown_paths_need_the_token_too(guarded: Served) -> None:
    status, _ = await guarded.call("GET", "/no-such-route", None)
    assert status == 401
    status, _ = await guarded.call("GET", "/no-such-route", f"Bearer {TOKEN}")
    assert status == 404


async def test_no_token_configured_leaves_every_route_open() -> None:
    runner, served, session = await serve(HttpConfig())
    try:
        status, body = await served.call("POST", "/predictions", None, **request_kw("POST"))
        assert status == 200 and body["output"] == "hello x"
    finally:
        await session.close()
        await runner.cleanup()


async def test_metrics_public_opens_metrics_only() -> None:
    runner, served, session = await serve(HttpConfig(auth_token=TOKEN, metrics_public=True))
    try:
        status, text = await served.call("GET", "/metrics", None)
        assert status == 200 and "cog_pool_predictions_total" in text
        status, _ = await served.call("GET", "/predictions/p1", None)
        assert status == 401
    finally:
        await session.close()
        await runner.cleanup()


# --- configuration -------------------------------------------------------------------------------
def load(env: dict[str, str] | None = None, **overrides: Any) -> PoolConfig:
    values = {"model.path": str(MODELS / "worker")}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, env=env or {}, overrides=values)


def test_token_from_the_environment_and_from_a_file(tmp_path: Path) -> None:
    assert load({"COG_POOL_HTTP_AUTH_TOKEN": "from-env"}).http.auth_token == "from-env"
    secret = tmp_path / "token"
    secret.write_text("from-file\n")  # mounted secrets often end in a newline
    assert load(http__auth_token_file=str(secret)).http.auth_token == "from-file"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "cannot read the token file"),
        ("empty", "is empty"),
        ("both", "not both"),
    ],
)
def test_token_file_errors_name_the_key(tmp_path: Path, setup: str, message: str) -> None:
    secret = tmp_path / "token"
    overrides: dict[str, Any] = {"http__auth_token_file": str(secret)}
    if setup == "empty":
        secret.write_text("  \n")
    if setup == "both":
        secret.write_text("t")
        overrides["http__auth_token"] = "u"
    with pytest.raises(ConfigError) as e:
        load(**overrides)
    assert e.value.key == "http.auth_token_file" and message in str(e.value)


def test_blank_token_is_refused() -> None:
    with pytest.raises(ConfigError) as e:
        load(http__auth_token=" ")
    assert e.value.key == "http.auth_token"


def test_cog_pool_config_never_prints_the_token() -> None:
    import subprocess
    import sys

    from pool_helpers import PROJECT
    from test_cli import cli_env

    env = cli_env()
    env["COG_POOL_HTTP_AUTH_TOKEN"] = TOKEN
    done = subprocess.run(
        [sys.executable, "-m", "cogpool", "config", str(MODELS / "worker")],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout
    assert '"auth_token": "<set>"' in done.stdout
