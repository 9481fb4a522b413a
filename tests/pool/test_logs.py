"""logging.format: text lines and JSON objects carry the same fields, from a real ``cog-pool``."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pool_helpers import MODELS, PROJECT, wait_until
from test_cli import cli_env

from pool.logs import configure_logging, parse_event

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \S+ (?P<message>.*)$")


def test_parse_event_types_values_and_keeps_reprs_with_spaces() -> None:
    parsed = parse_event("runner_exited runner=2 code=-9 ok=True why=None t=0.25 error=Boom('a b')")
    assert parsed == (
        "runner_exited",
        {"runner": 2, "code": -9, "ok": True, "why": None, "t": 0.25, "error": "Boom('a b')"},
    )
    assert parse_event("pool_ready") == ("pool_ready", {})
    assert parse_event("Error handling request from 1.2.3.4") is None


def record_through(fmt: str, message: str, *args: Any, exc: bool = False) -> str:
    stream = io.StringIO()
    configure_logging("info", fmt, stream)
    try:
        if exc:
            try:
                raise ValueError("bad\nthing")
            except ValueError:
                logging.getLogger("pool.test").exception(message, *args)
        else:
            logging.getLogger("pool.test").info(message, *args)
    finally:
        configure_logging("warning", "text", sys.stderr)
    return stream.getvalue()


def test_json_lines_are_one_object_each_with_the_text_fields() -> None:
    text = record_through("text", "prediction_finished prediction=%s status=%s", "p1", "failed")
    m = TEXT_LINE.match(text.rstrip("\n"))
    assert m and m["message"] == "prediction_finished prediction=p1 status=failed"
    assert " INFO pool.test " in text
    out = record_through("json", "prediction_finished prediction=%s status=%s", "p1", "failed")
    assert out.count("\n") == 1
    obj = json.loads(out)
    assert obj["event"] == "prediction_finished"
    assert (obj["prediction"], obj["status"]) == ("p1", "failed")
    assert (obj["level"], obj["logger"]) == ("INFO", "pool.test")
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", obj["time"])


def test_json_fields_come_from_the_arguments_so_values_may_hold_k_v_text() -> None:
    # A runner's output line is logged json.dumps'd: its own "a=1 b=2" is not two fields.
    out = record_through(
        "json", "runner_output runner=%d line=%s error=%r t=%.2f x=lit", 3,
        json.dumps("loss=0.5 acc=0.9"), RuntimeError("a b=c"), 0.256,
    )  # fmt: skip
    obj = json.loads(out)
    assert obj["event"] == "runner_output"
    assert obj["runner"] == 3 and obj["line"] == "loss=0.5 acc=0.9"
    assert obj["error"] == "RuntimeError('a b=c')" and obj["t"] == 0.26 and obj["x"] == "lit"
    assert "loss" not in obj and "acc" not in obj and "b" not in obj
    text = record_through("text", "runner_output runner=%d line=%s", 3, json.dumps("a=1 b=2"))
    assert text.rstrip().endswith('runner_output runner=3 line="a=1 b=2"')


def test_json_keeps_prose_tracebacks_and_reserved_names_on_one_line() -> None:
    out = record_through("json", "supervisor_tick_failed level=%s", "x", exc=True)
    assert out.count("\n") == 1
    obj = json.loads(out)
    assert obj["event"] == "supervisor_tick_failed" and obj["field_level"] == "x"
    assert obj["level"] == "ERROR" and "ValueError: bad\nthing" in obj["exception"]
    prose = json.loads(record_through("json", "Error handling request"))
    assert prose["message"] == "Error handling request" and "event" not in prose


def launch(tmp_path: Path, fmt: str | None) -> tuple[subprocess.Popen[bytes], Path]:
    """Start ``cog-pool serve`` on a free port with its stderr in a file."""
    env = cli_env()
    env["COG_POOL_HTTP_ALLOW_SHUTDOWN"] = "true"  # serve_and_stop stops it with POST /shutdown
    if fmt is not None:
        env["COG_POOL_LOGGING_FORMAT"] = fmt
    log_path = tmp_path / f"serve-{fmt}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cogpool", "serve", str(MODELS / "worker"), "--port", "0"],
            cwd=PROJECT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    return proc, log_path


async def serve_and_stop(tmp_path: Path, fmt: str | None) -> str:
    """Run ``cog-pool serve``, predict once, POST /shutdown; return its stderr."""
    proc, log_path = launch(tmp_path, fmt)
    try:
        port_re = re.compile(r'http_listening host=\S+ port=(\d+)|"port": (\d+)')
        found = await wait_until(
            lambda: port_re.search(log_path.read_text()) or proc.poll() is not None,
            timeout_s=60,
            what="http_listening",
        )
        assert proc.poll() is None, log_path.read_text()
        port = next(g for g in found.groups() if g)
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}"
            await wait_until(lambda: "pool_ready" in log_path.read_text(), what="pool_ready")
            async with session.post(url + "/predictions", json={"input": {"n": 1}}) as r:
                assert r.status == 200
            async with session.post(url + "/shutdown") as r:
                assert r.status == 200
        await wait_until(lambda: proc.poll() is not None, timeout_s=60, what="exit")
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    return log_path.read_text()


@pytest.mark.parametrize("fmt", [None, "json"])
async def test_serve_logs_in_the_configured_format(tmp_path: Path, fmt: str | None) -> None:
    out = await serve_and_stop(tmp_path, fmt)
    events: dict[str, dict[str, Any]] = {}
    for line in out.splitlines():
        if fmt == "json":
            obj = json.loads(line)  # every line is one JSON object
            if "event" in obj:
                fields = {k: v for k, v in obj.items() if k not in ("time", "level", "logger")}
                events[fields.pop("event")] = fields
        else:
            m = TEXT_LINE.match(line)
            assert m, f"not a text log line: {line!r}"
            parsed = parse_event(m["message"])
            if parsed is not None:
                events[parsed[0]] = parsed[1]
    assert {"pool_starting", "http_listening", "pool_ready", "serve_exit"} <= set(events)
    assert set(events["pool_starting"]) == {"runners", "model", "state_dir"}
    assert events["pool_starting"]["runners"] == 1
    assert events["serve_exit"] == {"code": 0}
