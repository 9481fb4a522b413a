"""Property-based: schemathesis against the served pool's own /openapi.json (issue 7).

Each example model is served by the real CLI on a free port; schemathesis reads the pool's
document and sends generated requests, valid and invalid, through a real socket. The run
passes when no answer is a 5xx and every answer matches the document (status code, content
type, body schema); afterwards the pool must still be READY and still run a prediction.
Bounded: a fixed number of examples per operation, a timeout per request.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pool_helpers import PROJECT, wait_until

MAX_EXAMPLES = 20
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
    ]
)


class ServedPool:
    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path, port: int) -> None:
        self.proc = proc
        self.log_path = log_path
        self.port = port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def serve_example(tmp_path: Path) -> AsyncIterator[Any]:
    started: list[ServedPool] = []

    async def start(name: str) -> ServedPool:
        log_path = tmp_path / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("COG_POOL_")}
        env.update(
            PYTHONPATH=str(PROJECT),
            # Generated URLs name hosts on the internet: fail them fast, not after 60 s.
            COG_POOL_FILES_DOWNLOAD_TIMEOUT_S="2",
            # ... and generated webhooks too, so the drain at the end is quick.
            COG_POOL_WEBHOOKS_TIMEOUT_S="1",
            COG_POOL_WEBHOOKS_MAX_ATTEMPTS="1",
            COG_POOL_SHUTDOWN_GRACE_S="2",
        )
        with open(log_path, "wb") as log:  # noqa: ASYNC230 -- before the pool starts
            proc = subprocess.Popen(  # noqa: ASYNC220 -- output goes to a file
                [sys.executable, "-m", "cogpool", "serve", str(PROJECT / "examples" / name),
                 "--port", "0", "--state-dir", str(tmp_path / f"state-{name}")],
                cwd=str(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        served = ServedPool(proc, log_path, 0)
        started.append(served)

        def listening() -> re.Match[str] | None:
            assert proc.poll() is None, log_path.read_text()
            return re.search(r"http_listening host=\S+ port=(\d+)", log_path.read_text())

        served.port = int((await wait_until(listening, what="http_listening")).group(1))
        await wait_until(lambda: "pool_ready" in log_path.read_text(), what="pool_ready")
        return served

    yield start
    for served in started:
        if served.proc.poll() is None:
            served.proc.send_signal(signal.SIGTERM)
            try:
                served.proc.wait(30)
            except subprocess.TimeoutExpired:
                served.proc.kill()
                served.proc.wait(10)


async def run_schemathesis(served: ServedPool, workdir: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "schemathesis.cli", "run", f"{served.base_url}/openapi.json",
        "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES), "--request-timeout", "20",
        "--generation-database", "none", "--no-color",
        cwd=str(workdir), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 240)
    return proc.returncode or 0, out.decode(errors="replace")


async def still_serves(served: ServedPool, input_: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{served.base_url}/health-check") as r:
            assert r.status == 200 and (await r.json())["status"] == "READY"
        async with session.post(f"{served.base_url}/predictions", json={"input": input_}) as r:
            assert r.status == 200
            body: dict[str, Any] = await r.json()
    assert served.proc.poll() is None
    return body


@pytest.mark.parametrize(
    ("example", "input_", "expected"),
    [
        ("hello", {"text": "fuzz"}, "hello fuzz"),
        ("files", {"file": "data:text/plain,fuzz"}, "data:text/plain;base64,RlVaWg=="),
    ],
)
async def test_generated_requests_get_documented_answers_and_the_pool_keeps_serving(
    serve_example: Any, tmp_path: Path, example: str, input_: dict[str, Any], expected: str
) -> None:
    served = await serve_example(example)
    rc, report = await run_schemathesis(served, tmp_path)
    assert rc == 0, report
    assert re.search(r"\d+ generated", report), report
    body = await still_serves(served, input_)
    assert body["status"] == "succeeded" and body["output"] == expected, body
    assert "Traceback" not in served.log_path.read_text()
