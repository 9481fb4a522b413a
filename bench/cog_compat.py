"""Side by side: the project's own models under cog-pool and under Cog 0.23.1, same requests.

    .venv/bin/python bench/cog_compat.py [--cog-venv /work/cog-venv] [--only NAME]

For each case it builds one temporary model directory (the model file from
tests/models/compat/ plus a cog.yaml), serves it with ``cog-pool serve`` and with Cog's
``python -m cog.server.http`` (the Cog venv's ``bin/`` first on PATH, because Cog starts its
worker as ``python``), sends the same requests to both and diffs HTTP status, prediction
status, output and error. Prints a Markdown table (the one in bench/RESULTS.md) and exits 0
whatever the diff says: differences are data, some of them deliberate (see the notes column
and docs/architecture.md "Cog compatibility").

Cog 0.23.1 validates input only against the ``.cog/openapi_schema.json`` that ``cog build``
writes (without it, it accepts anything). This script writes cog-pool's own schema there,
so both servers check the same schema and what is compared is how each applies it.

Not run in CI: it needs a Cog 0.23.1 venv (``pip install cog==0.23.1``) and takes about a
minute on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "tests", "models", "compat")
START_TIMEOUT_S = 90.0
REQUEST_TIMEOUT_S = 60.0


@dataclass
class Case:
    name: str
    ref: str  # "file.py:Class" inside tests/models/compat
    requests: list[dict[str, Any]] = field(default_factory=list)  # prediction inputs
    environment: list[str] = field(default_factory=list)  # cog.yaml environment:
    health: bool = False  # compare /health-check after the requests
    note: str = ""  # why an expected difference is deliberate


PARTIAL_OUTPUT = (
    "items yielded before the failure stay in `output` here (webhooks already sent them); "
    "Cog 0.23.1 answers output null"
)

CASES = [
    Case(
        "unions",
        "shapes.py:Unions",
        [
            {},
            {"u": 1},
            {"u": 1.5},
            {"u": "x"},
            {"u": None},
            {"u": True},
            {"u": {"a": 1}},
            {"nums": []},
            {"nums": [1, 2.5]},
            {"nums": ["3"]},
            {"nums": None},
            {"v": "a"},
        ],
        note="null where None is a member: issue 9 asks for it; Cog 0.23.1's validator "
        "ignores `nullable` beside `anyOf`",
    ),
    Case(
        "nested lists",
        "shapes.py:Embeddings",
        [{"n": 2}, {"rows": [[1, 2], []]}],
        note="ints in a List[List[float]] input reach the model as floats here (its declared "
        "type); Cog 0.23.1 passes them as ints",
    ),
    Case("optional secret", "shapes.py:OptionalSecret", [{}, {"key": "abc"}]),
    Case(
        "Literal choices",
        "shapes.py:Choices",
        [{}, {"mode": "slow", "level": 3}, {"mode": "medium"}, {"level": 4}],
    ),
    Case(
        "json_coder",
        "coders.py:JsonDicts",
        [{"data": {"b": [1], "a": "x"}}],
        note="Cog 0.23.1 has no cog.coder.json_coder (older Cog had): it cannot import it",
    ),
    Case(
        "custom coder",
        "shapes.py:Points",
        [{"p": {"x": 1, "y": 2}}],
        note="Cog 0.23.1's runtime does not apply coders: the model gets the raw dict",
    ),
    Case("BaseRunner.run", "shapes.py:Runner", [{}, {"name": "x"}]),
    Case("@cog.streaming iterator", "shapes.py:Streamer", [{"n": 2}]),
    Case(
        "sync errors",
        "errors.py:Sync",
        [{"kind": "value"}, {"kind": "exit"}, {"kind": "empty"}, {"kind": "none"}],
    ),
    Case(
        "generator error",
        "errors.py:Gen",
        [{"fail_at": 1}, {"fail_at": 0}, {"fail_at": 9}],
        note=PARTIAL_OUTPUT,
    ),
    Case("async error", "errors.py:AsyncErr", [{}]),
    Case("async generator error", "errors.py:AsyncGen", [{}], note=PARTIAL_OUTPUT),
    Case(
        "setup timeout",
        "errors.py:SlowSetup",
        [],
        environment=["COG_SETUP_TIMEOUT=1"],
        health=True,
    ),
    Case(
        "user healthcheck returns False",
        "health.py:SyncCheck",
        [{}],
        environment=["HEALTH_MODE_FILE=health-mode"],
        health=True,
        note="same status and user_healthcheck_error; only setup_last_log_line differs "
        "(Cog's is its own runtime's '[coglet] Server ready', ours the model's last setup line)",
    ),
]


# --- servers ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, text.decode(errors="replace")


def wait_started(base: str, proc: subprocess.Popen[bytes], what: str) -> dict[str, Any]:
    """The first /health-check that is past STARTING (setup done, or failed)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        try:
            _, body = http("GET", f"{base}/health-check")
        except OSError:
            body = None
        if isinstance(body, dict) and body.get("status") not in (None, "STARTING"):
            return body
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {START_TIMEOUT_S}s")


@contextlib.contextmanager
def serve(
    cmd: list[str], cwd: str, env: dict[str, str], what: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {**env, "PORT": str(port)}
    log = open(os.path.join(cwd, f".{what}.log"), "wb")
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)] if what == "cog-pool" else cmd,
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        log.close()


Served = contextlib.AbstractContextManager[tuple[str, subprocess.Popen[bytes]]]


def pool_server(model_dir: str, case: Case) -> Served:
    env = {**os.environ, "COG_POOL_STATE_DIR": os.path.join(model_dir, ".pool-state")}
    cmd = [sys.executable, "-m", "cogpool", "serve", model_dir, "--runners", "1"]
    cmd += ["--log-level", "warning"]
    env["PYTHONPATH"] = ROOT
    return serve(cmd, model_dir, env, "cog-pool")


def cog_server(model_dir: str, case: Case, cog_venv: str) -> Served:
    bin_dir = os.path.join(cog_venv, "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["COG_PREDICT_TYPE_STUB"] = case.ref
    for entry in case.environment:  # cog build bakes cog.yaml environment: into the image
        name, _, value = entry.partition("=")
        env[name] = value
    return serve([os.path.join(bin_dir, "python"), "-m", "cog.server.http"], model_dir, env, "cog")


# --- one case ----------------------------------------------------------------------------------
def model_dir_for(case: Case, base: str) -> str:
    directory = os.path.join(base, case.name.replace(" ", "-").replace("@", ""))
    os.makedirs(directory)
    module = case.ref.partition(":")[0]
    shutil.copy(os.path.join(MODELS, module), directory)
    lines = [f'predict: "{case.ref}"']
    if case.environment:
        lines.append("environment:")
        lines += [f'  - "{entry}"' for entry in case.environment]
    with open(os.path.join(directory, "cog.yaml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(directory, "health-mode"), "w") as f:
        f.write("false")
    return directory


def summarize(code: int, body: Any) -> dict[str, Any]:
    """What is compared of one answer."""
    if not isinstance(body, dict):
        return {"http": code, "body": body}
    if code == 422:
        return {"http": code}  # both refuse; the detail wording is each server's own
    return {
        "http": code,
        "status": body.get("status"),
        "output": body.get("output"),
        "error": body.get("error"),
    }


def summarize_health(body: Any) -> dict[str, Any]:
    setup = body.get("setup") or {}
    logs = (setup.get("logs") or "").rstrip("\n").rsplit("\n", 1)[-1]
    return {
        "status": body.get("status"),
        "setup": setup.get("status"),
        "setup_last_log_line": logs,
        "user_healthcheck_error": body.get("user_healthcheck_error"),
    }


def run_on(base: str, case: Case) -> list[dict[str, Any]]:
    answers = []
    for request in case.requests:
        code, body = http("POST", f"{base}/predictions", {"input": request})
        answers.append(summarize(code, body))
    if case.health:
        health: dict[str, Any] = {}
        # A user healthcheck result is reached after a check has run: ask a few times.
        for _ in range(15):
            _, body = http("GET", f"{base}/health-check")
            health = summarize_health(body)
            if health["status"] != "READY":
                break
            time.sleep(0.4)
        answers.append(health)
    return answers


def compare(case: Case, cog_venv: str, base: str) -> list[tuple[str, str, str, bool]]:
    """(request, cog-pool's answer, Cog's answer, the same?) per request of ``case``."""
    model_dir = model_dir_for(case, base)
    rows: list[tuple[str, str, str, bool]] = []
    results: dict[str, list[dict[str, Any]]] = {}
    for what, server in (
        ("cog-pool", lambda: pool_server(model_dir, case)),
        ("cog", lambda: cog_server(model_dir, case, cog_venv)),
    ):
        with server() as (url, proc):
            try:
                wait_started(url, proc, what)
                if what == "cog-pool":
                    share_schema(url, model_dir)
                results[what] = run_on(url, case)
            except (OSError, RuntimeError, TimeoutError) as e:
                results[what] = [{"error": f"{type(e).__name__}: {e}"}] * max(
                    1, len(case.requests) + case.health
                )
    labels = [json.dumps(r, sort_keys=True) for r in case.requests]
    if case.health:
        labels.append("GET /health-check")
    for label, ours, theirs in zip(labels, results["cog-pool"], results["cog"], strict=True):
        # Compared as JSON text: 1 and 1.0 are equal in Python, not on the wire.
        rows.append((label, _show(ours), _show(theirs), _show(ours) == _show(theirs)))
    return rows


def share_schema(url: str, model_dir: str) -> None:
    """The pool's schema, where Cog 0.23.1 looks for the one `cog build` writes."""
    code, schema = http("GET", f"{url}/openapi.json")
    if code == 200:
        os.makedirs(os.path.join(model_dir, ".cog"), exist_ok=True)
        with open(os.path.join(model_dir, ".cog", "openapi_schema.json"), "w") as f:
            json.dump(schema, f)


def _show(summary: dict[str, Any]) -> str:
    text = json.dumps(summary, sort_keys=True)
    return text.replace("|", "\\|")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cog-venv", default="/work/cog-venv")
    parser.add_argument("--only", help="run only the case with this name")
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.cog_venv, "bin", "python")):
        print(f"no Cog venv at {args.cog_venv} (pip install cog==0.23.1)", file=sys.stderr)
        return 2
    base = tempfile.mkdtemp(prefix="cog-compat-")
    same = total = 0
    print("| case | request | cog-pool | Cog 0.23.1 | same |")
    print("|---|---|---|---|---|")
    notes: dict[str, str] = {}
    try:
        for case in CASES:
            if args.only and case.name != args.only:
                continue
            for label, ours, theirs, equal in compare(case, args.cog_venv, base):
                total += 1
                same += equal
                mark = "yes" if equal else "**no**"
                if not equal and case.note:
                    notes[case.name] = case.note
                print(f"| {case.name} | `{label}` | `{ours}` | `{theirs}` | {mark} |", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n{same} of {total} answers the same.")
    for name, note in notes.items():
        print(f"- {name}: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
