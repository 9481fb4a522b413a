"""Benchmark harness: the same predictor under cog-pool and under Cog's own runtime.

Run from the repository root with the project's virtualenv::

    .venv/bin/python bench/harness.py            # everything; prints the tables
    .venv/bin/python bench/harness.py --write    # ... and updates bench/RESULTS.md
    .venv/bin/python bench/harness.py --quick --only cog-pool --scenarios 1,3

Scenarios (see bench/README.md):
1. sequential null predictions, one runner: p50 / p99 latency, ratio to Cog;
2. C concurrent clients, one runner: predictions/s and requests rejected (Cog answers 409);
3. N runners x 100 ms predictions, 10*N requests at once: makespan against the ideal 1 s;
4. time from process start to health-check READY, with 1 and 4 runners.

Cog 0.23 is installed by the harness into its own virtualenv (``bench/.venv-cog``, Python 3.11),
so the predictor imports Cog's ``cog`` there and ours under cog-pool. Every loop is bounded by a
request count and every wait by a deadline; servers listen on loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import io
import json
import math
import os
import platform
import pstats
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

__all__ = [
    "BenchConfig",
    "ConcurrentResult",
    "CpuTimes",
    "LatencyStats",
    "MakespanResult",
    "ReadyResult",
    "SequentialResult",
    "Server",
    "ServerError",
    "ServerSpec",
    "TargetResults",
    "cog_server_spec",
    "ensure_cog_venv",
    "latency_stats",
    "machine_info",
    "main",
    "merge_concurrent",
    "merge_sequential",
    "percentile",
    "pool_server_spec",
    "process_tree_cpu",
    "render_results",
    "replace_section",
    "run_bench",
    "run_concurrent",
    "run_http_floor",
    "run_makespan",
    "run_sequential",
    "sequential_result",
]

T = TypeVar("T")

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
MODEL_DIR = BENCH_DIR / "models" / "null"
WORK_DIR = BENCH_DIR / ".work"  # server logs and raw JSON results; git-ignored
RESULTS_PATH = BENCH_DIR / "RESULTS.md"
COG_VENV = BENCH_DIR / ".venv-cog"
COG_VERSION = "0.23.1"
# Cog 0.23 needs Python >= 3.10; pyenv's 3.11 on these machines, overridable for elsewhere.
COG_BASE_PYTHON = os.environ.get("BENCH_COG_PYTHON", "/root/.pyenv/versions/3.11.7/bin/python")

SECTION_BEGIN = "<!-- bench/harness.py: begin (generated; edit outside these markers) -->"
SECTION_END = "<!-- bench/harness.py: end -->"

PREDICT_TIMEOUT = aiohttp.ClientTimeout(total=120)
HEALTH_TIMEOUT = aiohttp.ClientTimeout(total=5)
READY_POLL_S = 0.005  # resolution of the time-to-READY figure
DEFUNCT_GRACE_S = 10.0  # a pool DEFUNCT this long is taken as broken, not restarting


def log(event: str, **fields: object) -> None:
    """One `event key=value` line on stderr per lifecycle event (stdout carries the tables)."""
    pairs = " ".join(f"{key}={value}" for key, value in fields.items())
    print(f"{event} {pairs}".rstrip(), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- statistics


def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of sorted samples, linear between closest ranks (numpy's default)."""
    if not sorted_samples:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is outside 0..1")
    position = q * (len(sorted_samples) - 1)
    lower = math.floor(position)
    upper = math.ceil(position)
    fraction = position - lower
    return sorted_samples[lower] + (sorted_samples[upper] - sorted_samples[lower]) * fraction


@dataclass(frozen=True)
class LatencyStats:
    n: int
    p50_s: float
    p90_s: float
    p99_s: float
    mean_s: float
    min_s: float
    max_s: float


def latency_stats(samples: Iterable[float]) -> LatencyStats:
    """Summary statistics of latency samples in seconds."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("latency_stats of no samples")
    return LatencyStats(
        n=len(ordered),
        p50_s=percentile(ordered, 0.50),
        p90_s=percentile(ordered, 0.90),
        p99_s=percentile(ordered, 0.99),
        mean_s=sum(ordered) / len(ordered),
        min_s=ordered[0],
        max_s=ordered[-1],
    )


# --------------------------------------------------------------------------- servers


class ServerError(RuntimeError):
    """A benchmarked server did not start, or died; the message carries its last log lines."""


@dataclass(frozen=True)
class ServerSpec:
    name: str  # "cog" or "cog-pool"
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: Path
    port: int
    runners: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env() -> dict[str, str]:
    # The two runtimes must each import their own `cog`: drop anything that points Python at
    # another environment.
    env = dict(os.environ)
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        env.pop(key, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cog_server_spec(*, port: int, model_dir: Path = MODEL_DIR, venv: Path = COG_VENV) -> ServerSpec:
    """Cog 0.23's server (Rust coglet) for the predictor in model_dir, one runner."""
    env = _clean_env()
    # coglet spawns its worker as `python` from PATH, not sys.executable: the venv's bin must
    # come first or the worker cannot import coglet and setup never finishes.
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PORT"] = str(port)
    env["COG_PREDICT_TYPE_STUB"] = _predict_ref(model_dir)
    argv = (str(venv / "bin" / "python"), "-m", "cog.server.http", "--host", "127.0.0.1")
    return ServerSpec("cog", argv, env, model_dir, port, 1)


def pool_server_spec(
    *,
    port: int,
    runners: int = 1,
    model_dir: Path = MODEL_DIR,
    python: str = sys.executable,
    profile_to: Path | None = None,
    extra_args: Sequence[str] = (),
) -> ServerSpec:
    """cog-pool (``python -m cogpool serve``) for the predictor in model_dir with N CPU runners.

    profile_to: run the pool process under cProfile, written there when the pool exits.
    extra_args: more `cog-pool serve` flags, e.g. ("--log-level", "warning").
    """
    env = _clean_env()
    env["PYTHONPATH"] = str(REPO_ROOT)  # `pool`, `coglet` and our `cog` from this checkout
    profiler = ("-m", "cProfile", "-o", str(profile_to)) if profile_to else ()
    argv = (
        python, *profiler, "-m", "cogpool", "serve", str(model_dir),
        "--port", str(port), "--runners", str(runners), *extra_args,
    )  # fmt: skip
    return ServerSpec("cog-pool", argv, env, REPO_ROOT, port, runners)


def _predict_ref(model_dir: Path) -> str:
    for line in (model_dir / "cog.yaml").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "predict":
            return value.strip().strip("\"'")
    raise ServerError(f"{model_dir / 'cog.yaml'} has no 'predict:' key")


@dataclass(frozen=True)
class ReadyResult:
    ready_s: float  # spawn -> health-check status READY
    all_runners_ready_s: float  # spawn -> every runner in `runners` READY (Cog: = ready_s)


@dataclass(frozen=True)
class CpuTimes:
    """user + system CPU seconds: the front process (HTTP server) and its worker processes."""

    front_s: float
    workers_s: float

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.front_s - other.front_s, self.workers_s - other.workers_s)

    def __add__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.front_s + other.front_s, self.workers_s + other.workers_s)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_tree_cpu(pid: int) -> CpuTimes:
    """From /proc (Linux): the CPU time of pid, and the sum over its live descendants."""
    workers = sum(_own_cpu_s(child) for child in _descendants(pid))
    return CpuTimes(_own_cpu_s(pid), workers)


def _own_cpu_s(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0  # gone, or not Linux
    # Fields after "(comm)": state is field 3, utime field 14, stime field 15.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


class Server:
    """One benchmarked server process: spawn, wait for READY, stop (SIGTERM, then SIGKILL)."""

    def __init__(self, spec: ServerSpec, *, log_dir: Path = WORK_DIR) -> None:
        self.spec = spec
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{spec.name}-{spec.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._spawned_at = 0.0

    async def __aenter__(self) -> Server:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        with self.log_path.open("wb") as log_file:
            self._spawned_at = time.perf_counter()
            # Own session: a terminal's ^C reaches the harness only, and stop() can signal
            # the server's whole process group (Cog's worker is its child).
            self._proc = subprocess.Popen(
                self.spec.argv,
                cwd=self.spec.cwd,
                env=dict(self.spec.env),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        log(
            "server_spawned",
            name=self.spec.name,
            pid=self._proc.pid,
            port=self.spec.port,
            runners=self.spec.runners,
        )

    async def wait_ready(self, timeout_s: float = 60.0) -> ReadyResult:
        """Poll /health-check until READY (and every runner READY); times are from spawn."""
        deadline = time.perf_counter() + timeout_s
        ready_s: float | None = None
        url = f"{self.spec.base_url}/health-check"
        defunct_since: float | None = None
        body: dict[str, Any] | None = None
        async with aiohttp.ClientSession(timeout=HEALTH_TIMEOUT) as session:
            while time.perf_counter() < deadline:
                self._check_alive()
                body = await _get_json(session, url)
                now = time.perf_counter() - self._spawned_at
                status = body.get("status") if body else None
                if status == "READY":
                    ready_s = now if ready_s is None else ready_s
                    if _all_runners_ready(body or {}, self.spec.runners):
                        return ReadyResult(ready_s, now)
                # SETUP_FAILED is final; DEFUNCT may pass while a runner restarts.
                defunct_since = (defunct_since or now) if status == "DEFUNCT" else None
                if status == "SETUP_FAILED" or (
                    defunct_since is not None and now - defunct_since > DEFUNCT_GRACE_S
                ):
                    break
                await asyncio.sleep(READY_POLL_S)
        raise ServerError(
            f"{self.spec.name} not READY within {timeout_s} s; last health: {body}\n"
            f"{self.log_tail()}"
        )

    async def stop(self, grace_s: float = 15.0) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, grace_s)
        except subprocess.TimeoutExpired:
            log("server_kill", name=self.spec.name, pid=proc.pid, grace_s=grace_s)
            os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait, grace_s)
        # Cog's worker may outlive its parent by a moment; it is in the same group.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cpu_s(self) -> CpuTimes:
        """CPU time used so far by the server process and, apart, by its descendants."""
        if self._proc is None:
            return CpuTimes(0.0, 0.0)
        return process_tree_cpu(self._proc.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise ServerError(
                f"{self.spec.name} exited with {self._proc.returncode} before READY\n"
                f"{self.log_tail()}"
            )


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the harness dies (Linux), so a killed run
    leaves no server behind; the servers stop their own workers on SIGTERM."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _all_runners_ready(body: Mapping[str, Any], expected: int) -> bool:
    runners = body.get("runners")
    if not isinstance(runners, list):
        return True  # Cog: one runner, and the server is READY
    ready = [r for r in runners if isinstance(r, dict) and r.get("status") == "READY"]
    return len(ready) >= expected


async def _get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                return None
            body = await resp.json(content_type=None)
            return body if isinstance(body, dict) else None
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
        return None  # not listening yet, or mid-start


# --------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Outcome:
    http_status: int
    succeeded: bool  # 200 and prediction status "succeeded"
    latency_s: float
    error: str | None
    predict_time_s: float | None = None  # the server's metrics.predict_time


async def predict(
    session: aiohttp.ClientSession, base_url: str, inputs: Mapping[str, Any]
) -> Outcome:
    """One sync POST /predictions on a keep-alive session."""
    started = time.perf_counter()
    async with session.post(f"{base_url}/predictions", json={"input": dict(inputs)}) as resp:
        raw = await resp.read()
    latency_s = time.perf_counter() - started
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    succeeded = resp.status == 200 and body.get("status") == "succeeded"
    error = None if succeeded else f"HTTP {resp.status}: {raw[:200].decode(errors='replace')}"
    return Outcome(resp.status, succeeded, latency_s, error, _predict_time(body))


def _predict_time(body: Mapping[str, Any]) -> float | None:
    metrics = body.get("metrics")
    value = metrics.get("predict_time") if isinstance(metrics, dict) else None
    return float(value) if isinstance(value, int | float) else None


def _session(connections: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    return aiohttp.ClientSession(connector=connector, timeout=PREDICT_TIMEOUT)


MAX_REJECTS_PER_PREDICTION = 1000  # bounds the 409-retry loop against a server stuck busy


@dataclass(frozen=True)
class Attempts:
    """One prediction as a client sees it: 409s retried at once until accepted."""

    final: Outcome
    rejected: int  # 409s before the final answer
    client_latency_s: float  # first attempt sent -> final answer, retries included


async def predict_retrying(
    session: aiohttp.ClientSession, base_url: str, inputs: Mapping[str, Any]
) -> Attempts:
    """POST until the answer is not a 409, at most MAX_REJECTS_PER_PREDICTION + 1 times.

    Cog 0.23 answers its own sequential client 409 now and then: it sends a response before
    its slot is free again, so the next request can arrive first.
    """
    started = time.perf_counter()
    rejected = 0
    outcome = await predict(session, base_url, inputs)
    while outcome.http_status == 409 and rejected < MAX_REJECTS_PER_PREDICTION:
        rejected += 1
        outcome = await predict(session, base_url, inputs)
    return Attempts(outcome, rejected, time.perf_counter() - started)


async def _warm_up(session: aiohttp.ClientSession, base_url: str, requests: int) -> None:
    for _ in range(requests):
        attempts = await predict_retrying(session, base_url, {})
        if not attempts.final.succeeded:
            raise ServerError(f"warm-up prediction failed: {attempts.final.error}")


@dataclass(frozen=True)
class SequentialResult:
    stats: LatencyStats | None  # accepted requests only: the server's own path
    client_stats: LatencyStats | None  # as the client waits: 409 retries included
    rejected: int
    failed: int
    first_error: str | None
    predict_time: LatencyStats | None = None  # server-reported; latency - this = overhead
    # raw samples, so that rounds can be pooled (merge_sequential)
    latencies_s: tuple[float, ...] = ()
    client_latencies_s: tuple[float, ...] = ()
    predict_times_s: tuple[float, ...] = ()


def sequential_result(
    latencies_s: Sequence[float],
    client_latencies_s: Sequence[float],
    predict_times_s: Sequence[float],
    *,
    rejected: int,
    failures: Sequence[str],
) -> SequentialResult:
    return SequentialResult(
        stats=_stats_or_none(latencies_s),
        client_stats=_stats_or_none(client_latencies_s),
        rejected=rejected,
        failed=len(failures),
        first_error=failures[0] if failures else None,
        predict_time=_stats_or_none(predict_times_s),
        latencies_s=tuple(latencies_s),
        client_latencies_s=tuple(client_latencies_s),
        predict_times_s=tuple(predict_times_s),
    )


def merge_sequential(parts: Sequence[SequentialResult]) -> SequentialResult:
    """One result from several rounds: samples pooled, counts summed."""
    errors = [p.first_error for p in parts if p.first_error]
    merged = sequential_result(
        [x for p in parts for x in p.latencies_s],
        [x for p in parts for x in p.client_latencies_s],
        [x for p in parts for x in p.predict_times_s],
        rejected=sum(p.rejected for p in parts),
        failures=[],
    )
    failed = sum(p.failed for p in parts)
    return dataclasses.replace(merged, failed=failed, first_error=errors[0] if errors else None)


def _stats_or_none(samples: Sequence[float]) -> LatencyStats | None:
    return latency_stats(samples) if samples else None


async def run_sequential(
    base_url: str, *, requests: int, warmup: int, inputs: Mapping[str, Any] | None = None
) -> SequentialResult:
    """Scenario 1: one client, one prediction at a time, on one keep-alive connection."""
    inputs = inputs or {}
    latencies: list[float] = []
    client_latencies: list[float] = []
    predict_times: list[float] = []
    failures: list[str] = []
    rejected = 0
    async with _session(1) as session:
        await _warm_up(session, base_url, warmup)
        for _ in range(requests):
            attempts = await predict_retrying(session, base_url, inputs)
            rejected += attempts.rejected
            if attempts.final.succeeded:
                latencies.append(attempts.final.latency_s)
                client_latencies.append(attempts.client_latency_s)
                if attempts.final.predict_time_s is not None:
                    predict_times.append(attempts.final.predict_time_s)
            else:
                failures.append(attempts.final.error or "")
    return sequential_result(
        latencies, client_latencies, predict_times, rejected=rejected, failures=failures
    )


async def run_http_floor(base_url: str, *, requests: int, warmup: int) -> LatencyStats:
    """GET /health-check one at a time: the client + HTTP server cost with no prediction."""
    url = f"{base_url}/health-check"
    latencies: list[float] = []
    async with _session(1) as session:
        for i in range(warmup + requests):
            started = time.perf_counter()
            async with session.get(url) as resp:
                await resp.read()
            if i >= warmup:
                latencies.append(time.perf_counter() - started)
    return latency_stats(latencies)


@dataclass(frozen=True)
class ConcurrentResult:
    clients: int
    succeeded: int
    rejected: int  # HTTP 409 (Cog: all slots busy); the client retries at once
    failed: int  # anything else that is not a succeeded prediction
    gave_up: int  # clients that hit max_attempts before their predictions were done
    elapsed_s: float
    first_error: str | None
    latency: LatencyStats | None = None  # of succeeded predictions, queueing included
    latencies_s: tuple[float, ...] = ()  # raw samples, so that rounds can be pooled

    @property
    def throughput(self) -> float:
        return self.succeeded / self.elapsed_s if self.elapsed_s > 0 else 0.0


def merge_concurrent(parts: Sequence[ConcurrentResult]) -> ConcurrentResult:
    """One result from several rounds: counts and elapsed time summed, samples pooled."""
    errors = [p.first_error for p in parts if p.first_error]
    latencies = [x for p in parts for x in p.latencies_s]
    return ConcurrentResult(
        clients=parts[0].clients,
        succeeded=sum(p.succeeded for p in parts),
        rejected=sum(p.rejected for p in parts),
        failed=sum(p.failed for p in parts),
        gave_up=sum(p.gave_up for p in parts),
        elapsed_s=sum(p.elapsed_s for p in parts),
        first_error=errors[0] if errors else None,
        latency=_stats_or_none(latencies),
        latencies_s=tuple(latencies),
    )


async def run_concurrent(
    base_url: str,
    *,
    clients: int,
    predictions_per_client: int,
    warmup: int,
    max_attempts_per_client: int | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> ConcurrentResult:
    """Scenario 2: C clients, each wanting K predictions done; a 409 is counted and retried.

    Each client stops after K successes, or after max_attempts (default 50*K) requests, so the
    loop is bounded even against a server that rejects everything.
    """
    inputs = inputs or {}
    max_attempts = max_attempts_per_client or 50 * predictions_per_client
    counts = {"succeeded": 0, "rejected": 0, "failed": 0, "gave_up": 0}
    latencies: list[float] = []
    errors: list[str] = []

    async def client(session: aiohttp.ClientSession) -> None:
        done = 0
        for _ in range(max_attempts):
            outcome = await predict(session, base_url, inputs)
            if outcome.succeeded:
                done += 1
                counts["succeeded"] += 1
                latencies.append(outcome.latency_s)
                if done == predictions_per_client:
                    return
            elif outcome.http_status == 409:
                counts["rejected"] += 1
            else:
                counts["failed"] += 1
                errors.append(outcome.error or "")
        counts["gave_up"] += 1

    async with _session(clients) as session:
        await _warm_up(session, base_url, warmup)
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed_s = time.perf_counter() - started
    return ConcurrentResult(
        clients=clients,
        elapsed_s=elapsed_s,
        first_error=errors[0] if errors else None,
        latency=_stats_or_none(latencies),
        latencies_s=tuple(latencies),
        **counts,
    )


@dataclass(frozen=True)
class MakespanResult:
    runners: int
    requests: int
    sleep_ms: int
    succeeded: int
    makespan_s: float  # first request sent -> last response received
    first_error: str | None

    @property
    def ideal_s(self) -> float:
        return self.requests * self.sleep_ms / 1000.0 / self.runners

    @property
    def over_ideal(self) -> float:
        return self.makespan_s / self.ideal_s - 1.0


async def run_makespan(
    base_url: str, *, runners: int, requests: int, sleep_ms: int, warmup: int = 2
) -> MakespanResult:
    """Scenario 3: all requests at once, each sleeping sleep_ms; time until the last returns."""
    inputs = {"sleep_ms": sleep_ms}
    async with _session(requests) as session:
        await _warm_up(session, base_url, warmup)
        started = time.perf_counter()
        outcomes = await asyncio.gather(
            *(predict(session, base_url, inputs) for _ in range(requests))
        )
        makespan_s = time.perf_counter() - started
    errors = [o.error or "" for o in outcomes if not o.succeeded]
    return MakespanResult(
        runners=runners,
        requests=requests,
        sleep_ms=sleep_ms,
        succeeded=len(outcomes) - len(errors),
        makespan_s=makespan_s,
        first_error=errors[0] if errors else None,
    )


# --------------------------------------------------------------------------- Cog's venv


def ensure_cog_venv(
    venv: Path = COG_VENV, *, version: str = COG_VERSION, base_python: str = COG_BASE_PYTHON
) -> Path:
    """Return the python of a virtualenv holding cog==version, creating it when needed."""
    python = venv / "bin" / "python"
    if _installed_cog_version(python) == version:
        return python
    log("cog_venv_install", venv=venv, version=version, python=base_python)
    subprocess.run([base_python, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"cog=={version}"],
        check=True,
    )
    installed = _installed_cog_version(python)
    if installed != version:
        raise ServerError(f"{venv} holds cog {installed!r} after install, wanted {version}")
    return python


def _installed_cog_version(python: Path) -> str | None:
    if not python.exists():
        return None
    probe = "import importlib.metadata as m; print(m.version('cog'))"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


# --------------------------------------------------------------------------- machine


def machine_info(loadavg: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """What the numbers were taken on; loadavg: os.getloadavg() taken before the run."""
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load_1m, load_5m, _ = loadavg or os.getloadavg()
    return {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python_pool": platform.python_version(),
        "python_cog": _python_version(COG_VENV / "bin" / "python"),
        "cog_version": _installed_cog_version(COG_VENV / "bin" / "python"),
        "loadavg_1m_at_start": round(load_1m, 2),
        "loadavg_5m_at_start": round(load_5m, 2),
    }


def _python_version(python: Path) -> str | None:
    if not python.exists():
        return None
    done = subprocess.run(
        [str(python), "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() or None


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class BenchConfig:
    targets: tuple[str, ...] = ("cog", "cog-pool")
    scenarios: frozenset[int] = frozenset({1, 2, 3, 4})
    sequential_requests: int = 2000
    warmup: int = 100
    clients: int = 8
    predictions_per_client: int = 250
    rounds: int = 5  # scenarios 1 and 2 alternate the runtimes this many times
    runner_counts: tuple[int, ...] = (1, 2, 4)
    sleep_ms: int = 100
    makespan_repeats: int = 3
    ready_runner_counts: tuple[int, ...] = (1, 4)
    ready_repeats: int = 3
    ready_timeout_s: float = 120.0
    pool_args: tuple[str, ...] = ()  # extra `cog-pool serve` flags


@dataclass
class TargetResults:
    sequential: SequentialResult | None = None
    concurrent: ConcurrentResult | None = None
    http_floor: LatencyStats | None = None
    # scenario -> server CPU ms per served prediction (warm-up included), front / workers
    cpu_ms_per_prediction: dict[int, CpuTimes] = field(default_factory=dict)
    makespan: dict[int, list[MakespanResult]] = field(default_factory=dict)
    ready: dict[int, list[ReadyResult]] = field(default_factory=dict)


def _spec(target: str, runners: int, cfg: BenchConfig) -> ServerSpec:
    if target == "cog":
        return cog_server_spec(port=free_port())
    return pool_server_spec(port=free_port(), runners=runners, extra_args=cfg.pool_args)


async def bench_ready(cfg: BenchConfig, results: Mapping[str, TargetResults]) -> None:
    """Scenario 4; the runtimes take turns so that background load hits both alike."""
    for _ in range(cfg.ready_repeats):
        for target, res in results.items():
            counts = cfg.ready_runner_counts if target == "cog-pool" else (1,)
            for runners in counts:
                ready = await _measure_ready(target, runners, cfg)
                res.ready.setdefault(runners, []).append(ready)


async def bench_one_runner(cfg: BenchConfig, results: Mapping[str, TargetResults]) -> None:
    """Scenarios 1 and 2 on one runner, in rounds that alternate the runtimes (and their
    order), so a burst of background load lands on both; samples are pooled over rounds."""
    sequential: dict[str, list[SequentialResult]] = {t: [] for t in results}
    concurrent: dict[str, list[ConcurrentResult]] = {t: [] for t in results}
    cpu = {(t, n): CpuTimes(0.0, 0.0) for t in results for n in (1, 2)}
    served = dict.fromkeys(cpu, 0)
    requests = math.ceil(cfg.sequential_requests / cfg.rounds)
    per_client = math.ceil(cfg.predictions_per_client / cfg.rounds)
    async with contextlib.AsyncExitStack() as stack:
        servers: dict[str, Server] = {}
        for target in results:
            servers[target] = await stack.enter_async_context(Server(_spec(target, 1, cfg)))
            await servers[target].wait_ready(cfg.ready_timeout_s)
        for round_index in range(cfg.rounds):
            warmup = cfg.warmup if round_index == 0 else min(cfg.warmup, 10)
            order = list(results) if round_index % 2 == 0 else list(results)[::-1]
            for target in order if 1 in cfg.scenarios else ():
                log("scenario_started", scenario=1, target=target, round=round_index)
                url, before = servers[target].spec.base_url, servers[target].cpu_s()
                seq = await run_sequential(url, requests=requests, warmup=warmup)
                cpu[target, 1] += servers[target].cpu_s() - before
                served[target, 1] += len(seq.latencies_s) + warmup
                sequential[target].append(seq)
            for target in order if 2 in cfg.scenarios else ():
                log("scenario_started", scenario=2, target=target, round=round_index)
                url, before = servers[target].spec.base_url, servers[target].cpu_s()
                con = await run_concurrent(
                    url, clients=cfg.clients, predictions_per_client=per_client, warmup=warmup
                )
                cpu[target, 2] += servers[target].cpu_s() - before
                served[target, 2] += con.succeeded + warmup
                concurrent[target].append(con)
        for target, res in results.items():
            for scenario in cfg.scenarios & {1, 2}:
                n = max(served[target, scenario], 1)
                total = cpu[target, scenario]
                res.cpu_ms_per_prediction[scenario] = CpuTimes(
                    total.front_s * 1000 / n, total.workers_s * 1000 / n
                )
            if 1 in cfg.scenarios:
                res.sequential = merge_sequential(sequential[target])
                res.http_floor = await run_http_floor(
                    servers[target].spec.base_url,
                    requests=min(cfg.sequential_requests, 1000),
                    warmup=cfg.warmup,
                )
            if 2 in cfg.scenarios:
                res.concurrent = merge_concurrent(concurrent[target])


async def bench_scale_out(cfg: BenchConfig, res: TargetResults) -> None:
    """Scenario 3 (cog-pool only: Cog serves one runner per process)."""
    for runners in cfg.runner_counts:
        log("scenario_started", scenario=3, target="cog-pool", runners=runners)
        async with Server(_spec("cog-pool", runners, cfg)) as server:
            await server.wait_ready(cfg.ready_timeout_s)
            res.makespan[runners] = [
                await run_makespan(
                    server.spec.base_url,
                    runners=runners,
                    requests=10 * runners,
                    sleep_ms=cfg.sleep_ms,
                )
                for _ in range(cfg.makespan_repeats)
            ]


async def profile_pool(cfg: BenchConfig, *, top: int = 30) -> str:
    """Scenario 1 against a cog-pool whose manager runs under cProfile; the top functions."""
    profile_path = WORK_DIR / "pool.prof"
    profile_path.unlink(missing_ok=True)
    spec = pool_server_spec(port=free_port(), profile_to=profile_path, extra_args=cfg.pool_args)
    async with Server(spec) as server:
        await server.wait_ready(cfg.ready_timeout_s)
        log("scenario_started", scenario=1, target="cog-pool", profile=profile_path)
        result = await run_sequential(
            spec.base_url, requests=cfg.sequential_requests, warmup=cfg.warmup
        )
    if not profile_path.exists():
        raise ServerError(f"no profile at {profile_path}: did the pool exit cleanly on SIGTERM?")
    out = io.StringIO()
    stats = pstats.Stats(str(profile_path), stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    p50 = _ms(_q(result.stats, "p50"))
    return f"cog-pool sequential p50 under cProfile: {p50} ms\n{out.getvalue()}"


async def _measure_ready(target: str, runners: int, cfg: BenchConfig) -> ReadyResult:
    async with Server(_spec(target, runners, cfg)) as server:
        return await server.wait_ready(cfg.ready_timeout_s)


# --------------------------------------------------------------------------- report


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.2f}"


def _q(stats: LatencyStats | None, name: str) -> float | None:
    """stats.<name>_s, or None without stats."""
    return None if stats is None else float(getattr(stats, f"{name}_s"))


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or theirs == 0:
        return "n/a"
    return f"{ours / theirs:.2f}"


def _cpu(res: TargetResults | None, scenario: int) -> str:
    cpu = res.cpu_ms_per_prediction.get(scenario) if res else None
    if cpu is None:
        return "n/a"
    total = cpu.front_s + cpu.workers_s
    return f"{total:.2f} ({cpu.front_s:.2f} + {cpu.workers_s:.2f})"


def _rounded(total: int, rounds: int) -> int:
    """What the rounds actually run: each runs ceil(total / rounds)."""
    return math.ceil(total / rounds) * rounds


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def _median(values: Sequence[float]) -> float:
    return percentile(sorted(values), 0.5)


def render_results(
    results: Mapping[str, TargetResults], machine: Mapping[str, Any], cfg: BenchConfig
) -> str:
    """The Markdown section for bench/RESULTS.md (between the markers)."""
    lines = [
        "## cog-pool vs Cog 0.23 (bench/harness.py)",
        "",
        f"Taken {machine['date_utc']} on {machine['nproc']} CPUs ({machine['cpu_model']}), "
        f"Linux {machine['kernel']}; cog-pool on Python {machine['python_pool']}, "
        f"Cog {machine['cog_version']} (Rust coglet server) on Python {machine['python_cog']}. "
        f"Load average at start: {machine['loadavg_1m_at_start']} (1 min), "
        f"{machine['loadavg_5m_at_start']} (5 min).",
        "",
        "Re-run: `.venv/bin/python bench/harness.py --write` (see bench/README.md).",
        "",
    ]
    if cfg.pool_args:
        lines += [f"cog-pool ran with extra flags `{shlex.join(cfg.pool_args)}`.", ""]
    cog, pool = results.get("cog"), results.get("cog-pool")
    if 1 in cfg.scenarios:
        lines += _render_sequential(cog, pool, cfg)
    if 2 in cfg.scenarios:
        lines += _render_concurrent(cog, pool, cfg)
    if 3 in cfg.scenarios:
        lines += _render_makespan(pool, cfg)
    if 4 in cfg.scenarios:
        lines += _render_ready(cog, pool, cfg)
    return "\n".join(lines).rstrip() + "\n"


def _render_sequential(
    cog: TargetResults | None, pool: TargetResults | None, cfg: BenchConfig
) -> list[str]:
    lines = [
        "### 1. Sequential null predictions, one runner "
        f"({_rounded(cfg.sequential_requests, cfg.rounds)} requests in {cfg.rounds} alternating "
        f"rounds after {cfg.warmup} warm-up, one keep-alive connection)",
        "",
        "| runtime | p50 ms | p90 ms | p99 ms | p50 / Cog | p99 / Cog | 409s | "
        "client p50 / p99 ms | predict_time p50 ms | server CPU ms/prediction | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cog_seq = cog.sequential if cog else None
    cog_stats = cog_seq.stats if cog_seq else None
    for name, res in (("Cog 0.23", cog), ("cog-pool", pool)):
        seq = res.sequential if res else None
        if seq is None:
            continue
        st, cl = seq.stats, seq.client_stats
        lines.append(
            f"| {name} | {_ms(_q(st, 'p50'))} | {_ms(_q(st, 'p90'))} | "
            f"{_ms(_q(st, 'p99'))} | "
            f"{_ratio(_q(st, 'p50'), _q(cog_stats, 'p50'))} | "
            f"{_ratio(_q(st, 'p99'), _q(cog_stats, 'p99'))} | {seq.rejected} | "
            f"{_ms(_q(cl, 'p50'))} / {_ms(_q(cl, 'p99'))} | "
            f"{_ms(_q(seq.predict_time, 'p50'))} | {_cpu(res, 1)} | {seq.failed} |"
        )
    ok = None
    pool_stats = pool.sequential.stats if pool and pool.sequential else None
    if pool_stats and cog_stats:
        ok = pool_stats.p50_s <= cog_stats.p50_s
    floors = [
        f"{name} {_ms(res.http_floor.p50_s)} ms"
        for name, res in (("Cog 0.23", cog), ("cog-pool", pool))
        if res is not None and res.http_floor is not None
    ]
    lines += [
        "",
        "HTTP floor, p50 of `GET /health-check` on the same server and connection (client and "
        f"HTTP server alone, no prediction): {', '.join(floors) or 'n/a'}.",
        "",
        "Latency columns are accepted requests (the server's own path); a 409 is retried at "
        "once and counted, and the client columns include those retries. predict_time is "
        "the server's own `metrics.predict_time`. Server CPU is user+system time from /proc "
        "per served prediction (warm-up included): the HTTP process + its worker processes "
        "(Cog: Rust server + Python worker; cog-pool: manager + coglet runner).",
        "",
        f"Target: p50 latency ratio <= 1.0 — {_verdict(ok)}.",
        "",
    ]
    return lines


def _render_concurrent(
    cog: TargetResults | None, pool: TargetResults | None, cfg: BenchConfig
) -> list[str]:
    lines = [
        f"### 2. {cfg.clients} concurrent clients, one runner (each client wants "
        f"{_rounded(cfg.predictions_per_client, cfg.rounds)} null predictions over "
        f"{cfg.rounds} alternating rounds; a 409 is counted and retried at once)",
        "",
        "| runtime | succeeded | rejected (409) | failed | elapsed s | predictions/s | "
        "p50 ms | p99 ms | server CPU ms/prediction |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in (("Cog 0.23", cog), ("cog-pool", pool)):
        if res is None or res.concurrent is None:
            continue
        c = res.concurrent
        lat = c.latency
        lines.append(
            f"| {name} | {c.succeeded} | {c.rejected} | {c.failed + c.gave_up} | "
            f"{c.elapsed_s:.2f} | {c.throughput:.1f} | {_ms(lat.p50_s if lat else None)} | "
            f"{_ms(lat.p99_s if lat else None)} | {_cpu(res, 2)} |"
        )
    ok = None
    if pool and pool.concurrent and cog and cog.concurrent:
        pc = pool.concurrent
        ok = pc.throughput >= cog.concurrent.throughput and pc.rejected == 0 and pc.failed == 0
    lines += ["", f"Target: throughput >= Cog's with zero rejected — {_verdict(ok)}.", ""]
    return lines


def _render_makespan(pool: TargetResults | None, cfg: BenchConfig) -> list[str]:
    lines = [
        f"### 3. N runners x {cfg.sleep_ms} ms predictions, 10*N requests at once "
        f"(cog-pool only; median of {cfg.makespan_repeats})",
        "",
        "| runners | requests | succeeded | makespan s (median) | best s | ideal s | "
        "over ideal | target <= +10% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for runners, runs in sorted((pool.makespan if pool else {}).items()):
        median_s = _median([r.makespan_s for r in runs])
        best_s = min(r.makespan_s for r in runs)
        ideal_s = runs[0].ideal_s
        over = median_s / ideal_s - 1.0
        succeeded = sum(r.succeeded for r in runs)
        lines.append(
            f"| {runners} | {runs[0].requests} x {len(runs)} | {succeeded} | {median_s:.3f} | "
            f"{best_s:.3f} | {ideal_s:.3f} | {over * 100:+.1f}% | {_verdict(over <= 0.10)} |"
        )
    return [*lines, ""]


def _render_ready(
    cog: TargetResults | None, pool: TargetResults | None, cfg: BenchConfig
) -> list[str]:
    lines = [
        f"### 4. Time from process start to health-check READY (median of {cfg.ready_repeats})",
        "",
        "| runtime | runners | READY s (median) | min s | max s | all runners READY s (median) |",
        "|---|---|---|---|---|---|",
    ]
    for name, res in (("Cog 0.23", cog), ("cog-pool", pool)):
        for runners, runs in sorted((res.ready if res else {}).items()):
            ready = [r.ready_s for r in runs]
            all_ready = [r.all_runners_ready_s for r in runs]
            lines.append(
                f"| {name} | {runners} | {_median(ready):.3f} | {min(ready):.3f} | "
                f"{max(ready):.3f} | {_median(all_ready):.3f} |"
            )
    lines += [
        "",
        "Cog serves one runner per process, so it has no 4-runner row. READY is polled every "
        f"{READY_POLL_S * 1000:.0f} ms.",
        "",
    ]
    return lines


def replace_section(document: str, section: str) -> str:
    """Put section between this harness's markers, keeping everything else in the document."""
    block = f"{SECTION_BEGIN}\n{section.rstrip()}\n{SECTION_END}"
    start = document.find(SECTION_BEGIN)
    end = document.find(SECTION_END)
    if start != -1 and end > start:
        return document[:start] + block + document[end + len(SECTION_END) :]
    if not document.strip():
        document = "# Benchmark results\n"
    return document.rstrip() + "\n\n" + block + "\n"


def results_json(
    results: Mapping[str, TargetResults], machine: Mapping[str, Any], cfg: BenchConfig
) -> dict[str, Any]:
    config = asdict(cfg)
    config["scenarios"] = sorted(cfg.scenarios)
    return {
        "machine": dict(machine),
        "config": config,
        "results": {name: asdict(res) for name, res in results.items()},
    }


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["cog", "cog-pool"], help="benchmark one runtime")
    parser.add_argument("--scenarios", default="1,2,3,4", help="comma list of 1..4")
    parser.add_argument("--quick", action="store_true", help="small counts, a smoke run")
    parser.add_argument("--requests", type=int, help="scenario 1 requests (default 2000)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, help="scenario 2 predictions per client")
    parser.add_argument("--runner-counts", default="1,2,4", help="scenario 3 runner counts")
    parser.add_argument("--rounds", type=int, help="scenarios 1 and 2 rounds (default 5)")
    parser.add_argument("--repeats", type=int, help="scenarios 3 and 4 repeats (default 3)")
    parser.add_argument(
        "--pool-args", default="", help='extra cog-pool serve flags, e.g. "--log-level warning"'
    )
    parser.add_argument("--write", action="store_true", help="update the results file")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH, help="results file")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead: scenario 1 against cog-pool under cProfile; print the top functions",
    )
    parser.add_argument("--json", type=Path, default=WORK_DIR / "last-results.json")
    args = parser.parse_args(argv)
    quick = args.quick
    repeats = args.repeats or (1 if quick else 3)
    cfg = BenchConfig(
        targets=(args.only,) if args.only else ("cog", "cog-pool"),
        scenarios=frozenset(int(s) for s in args.scenarios.split(",") if s.strip()),
        sequential_requests=args.requests or (30 if quick else 2000),
        warmup=5 if quick else 100,
        clients=args.clients,
        predictions_per_client=args.per_client or (5 if quick else 250),
        runner_counts=tuple(int(n) for n in args.runner_counts.split(",") if n.strip()),
        makespan_repeats=repeats,
        ready_repeats=repeats,
        rounds=args.rounds or (1 if quick else 5),
        pool_args=tuple(shlex.split(args.pool_args)),
    )
    return cfg, args


async def run_bench(cfg: BenchConfig) -> dict[str, TargetResults]:
    if "cog" in cfg.targets:
        ensure_cog_venv()
    results = {target: TargetResults() for target in cfg.targets}
    if 4 in cfg.scenarios:
        log("scenario_started", scenario=4)
        await bench_ready(cfg, results)
    if cfg.scenarios & {1, 2}:
        await bench_one_runner(cfg, results)
    if 3 in cfg.scenarios and "cog-pool" in results:
        await bench_scale_out(cfg, results["cog-pool"])
    return results


async def _cancel_on_sigterm(coro: Awaitable[T]) -> T:
    """Run coro; SIGTERM cancels it, so every server is stopped on the way out."""
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except asyncio.CancelledError:
        log("bench_cancelled", reason="SIGTERM")
        return 128 + signal.SIGTERM


def _main(argv: Sequence[str] | None) -> int:
    cfg, args = parse_args(argv)
    if args.profile:
        report = asyncio.run(_cancel_on_sigterm(profile_pool(cfg)))
        (WORK_DIR / "pool-profile.txt").write_text(report)
        print(report)
        return 0
    load_at_start = os.getloadavg()  # other work on the machine skews every figure
    results = asyncio.run(_cancel_on_sigterm(run_bench(cfg)))
    machine = machine_info(load_at_start)
    section = render_results(results, machine, cfg)
    print(section)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results_json(results, machine, cfg), indent=2) + "\n")
    if args.write:
        path: Path = args.results
        existing = path.read_text() if path.exists() else ""
        path.write_text(replace_section(existing, section))
        log("results_written", path=path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
