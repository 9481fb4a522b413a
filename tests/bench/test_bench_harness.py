"""The benchmark harness's pieces: statistics, report, load loops, server lifecycle.

The load loops run against a small Cog-like server on a real loopback socket (one slot, 409
when busy), so the counting of rejections and failures is checked without timing anything.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web

# --------------------------------------------------------------------------- statistics


def test_percentile_interpolates_between_closest_ranks(harness: ModuleType) -> None:
    samples = [1.0, 2.0, 3.0, 4.0]
    assert harness.percentile(samples, 0.0) == 1.0
    assert harness.percentile(samples, 1.0) == 4.0
    assert harness.percentile(samples, 0.5) == pytest.approx(2.5)
    assert harness.percentile(samples, 0.25) == pytest.approx(1.75)
    assert harness.percentile([7.0], 0.99) == 7.0


def test_percentile_refuses_no_samples_and_bad_quantiles(harness: ModuleType) -> None:
    with pytest.raises(ValueError, match="no samples"):
        harness.percentile([], 0.5)
    with pytest.raises(ValueError, match="outside"):
        harness.percentile([1.0], 1.5)


def test_latency_stats_of_unsorted_samples(harness: ModuleType) -> None:
    samples = [float(n) for n in range(100, 0, -1)]  # 100 .. 1, unsorted on purpose
    stats = harness.latency_stats(samples)
    assert stats.n == 100
    assert stats.p50_s == pytest.approx(50.5)
    assert stats.p90_s == pytest.approx(90.1)
    assert stats.p99_s == pytest.approx(99.01)
    assert stats.mean_s == pytest.approx(50.5)
    assert (stats.min_s, stats.max_s) == (1.0, 100.0)


def test_rounds_pool_their_samples_and_sum_their_counts(harness: ModuleType) -> None:
    first = harness.sequential_result([1.0, 2.0], [1.0, 2.5], [0.5], rejected=1, failures=[])
    second = harness.sequential_result([3.0, 4.0], [3.0, 4.0], [], rejected=2, failures=["x"])
    merged = harness.merge_sequential([first, second])
    assert merged.stats.n == 4
    assert merged.stats.p50_s == pytest.approx(2.5)
    assert merged.client_stats.max_s == 4.0
    assert merged.predict_time.n == 1
    assert (merged.rejected, merged.failed, merged.first_error) == (3, 1, "x")

    fast = harness.ConcurrentResult(8, 10, 5, 0, 0, 1.0, None, latencies_s=(0.1,) * 10)
    slow = harness.ConcurrentResult(8, 30, 0, 1, 0, 3.0, "boom", latencies_s=(0.3,) * 30)
    both = harness.merge_concurrent([fast, slow])
    assert (both.succeeded, both.rejected, both.failed, both.first_error) == (40, 5, 1, "boom")
    assert both.throughput == pytest.approx(10.0)  # 40 predictions in 4 s
    assert both.latency.n == 40


# --------------------------------------------------------------------------- report


def test_replace_section_keeps_other_engineers_sections(harness: ModuleType) -> None:
    created = harness.replace_section("", "## mine\nfirst\n")
    assert created.startswith("# Benchmark results\n")
    assert "first" in created
    others = created + "\n## queue bench (someone else)\nkeep me\n"
    updated = harness.replace_section(others, "## mine\nsecond\n")
    assert "second" in updated
    assert "first" not in updated
    assert "keep me" in updated
    assert updated.count(harness.SECTION_BEGIN) == 1
    assert updated.count(harness.SECTION_END) == 1


def _stats(harness: ModuleType, value_s: float) -> Any:
    return harness.latency_stats([value_s] * 10)


def test_render_marks_targets_met_and_missed(harness: ModuleType) -> None:
    cfg = harness.BenchConfig(scenarios=frozenset({1, 2, 3}), runner_counts=(1, 2))
    cog = harness.TargetResults(
        sequential=harness.SequentialResult(_stats(harness, 0.001), None, 3, 0, None),
        concurrent=harness.ConcurrentResult(8, 400, 900, 0, 0, 1.0, None),
    )
    pool = harness.TargetResults(
        sequential=harness.SequentialResult(_stats(harness, 0.002), None, 0, 0, None),
        concurrent=harness.ConcurrentResult(8, 400, 0, 0, 0, 0.5, None),
        makespan={
            1: [harness.MakespanResult(1, 10, 100, 10, 1.05, None)],
            2: [harness.MakespanResult(2, 20, 100, 20, 1.50, None)],
        },
    )
    text = harness.render_results({"cog": cog, "cog-pool": pool}, harness.machine_info(), cfg)
    assert "| 2.00 | 2.00 |" in text  # p50 and p99 ratio to Cog
    assert "p50 latency ratio <= 1.0 — **missed**" in text
    assert "throughput >= Cog's with zero rejected — met" in text  # 800/s against 400/s
    assert "+5.0% | met |" in text
    assert "+50.0% | **missed** |" in text


# --------------------------------------------------------------------------- a Cog-like server


@dataclass
class FakeCog:
    """One slot; 409 while it is taken, like Cog 0.23. Counts what it answered."""

    reject_every_other: bool = False  # answer every second request 409, slot or not
    hold_first_until_rejection: bool = False  # first prediction keeps the slot until a 409
    requests: int = 0
    rejected: int = 0
    busy: bool = False
    base_url: str = ""

    def __post_init__(self) -> None:
        self.rejection_seen = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.json()
        if self.busy or (self.reject_every_other and self.requests % 2 == 1):
            self.rejected += 1
            self.rejection_seen.set()
            return web.json_response({"error": "At capacity", "status": "failed"}, status=409)
        self.busy = True
        try:
            return await self._run(body.get("input", {}))
        finally:
            self.busy = False

    async def _run(self, inputs: dict[str, Any]) -> web.Response:
        if self.hold_first_until_rejection and not self.rejection_seen.is_set():
            await asyncio.wait_for(self.rejection_seen.wait(), timeout=30)
        if inputs.get("sleep_ms"):
            await asyncio.sleep(inputs["sleep_ms"] / 1000)  # the model's own work
        status = "failed" if inputs.get("fail") else "succeeded"
        return web.json_response({"status": status, "output": "ok"})


@pytest.fixture
async def fake_cog() -> AsyncIterator[FakeCog]:
    fake = FakeCog()
    app = web.Application()
    app.router.add_post("/predictions", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.base_url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await runner.cleanup()


async def test_sequential_retries_409_and_counts_it(harness: ModuleType, fake_cog: FakeCog) -> None:
    fake_cog.reject_every_other = True
    result = await harness.run_sequential(fake_cog.base_url, requests=10, warmup=2)
    assert result.rejected == 10  # one per measured prediction; warm-up ones are not counted
    assert result.failed == 0
    assert result.stats.n == 10
    assert result.client_stats.n == 10
    assert fake_cog.requests == 24


async def test_sequential_counts_failed_predictions(harness: ModuleType, fake_cog: FakeCog) -> None:
    result = await harness.run_sequential(
        fake_cog.base_url, requests=4, warmup=0, inputs={"fail": True}
    )
    assert result.failed == 4
    assert result.stats is None
    assert "HTTP 200" in result.first_error


async def test_concurrent_clients_each_get_their_predictions(
    harness: ModuleType, fake_cog: FakeCog
) -> None:
    fake_cog.hold_first_until_rejection = True
    result = await harness.run_concurrent(
        fake_cog.base_url, clients=3, predictions_per_client=4, warmup=0
    )
    assert result.succeeded == 12
    assert result.rejected == fake_cog.rejected
    assert result.rejected >= 1
    assert (result.failed, result.gave_up) == (0, 0)
    assert result.throughput > 0


async def test_concurrent_clients_give_up_against_a_server_that_always_rejects(
    harness: ModuleType, fake_cog: FakeCog
) -> None:
    fake_cog.busy = True  # never frees its slot
    result = await harness.run_concurrent(
        fake_cog.base_url, clients=2, predictions_per_client=1, warmup=0,
        max_attempts_per_client=5,
    )  # fmt: skip
    assert (result.succeeded, result.rejected, result.gave_up) == (0, 10, 2)


async def test_makespan_waits_for_every_request(harness: ModuleType, fake_cog: FakeCog) -> None:
    fake_cog.busy = False
    result = await harness.run_makespan(
        fake_cog.base_url, runners=2, requests=1, sleep_ms=20, warmup=1
    )
    assert result.succeeded == 1
    assert result.ideal_s == pytest.approx(0.01)
    assert result.makespan_s >= 0.02  # the response cannot come before the model's sleep


# --------------------------------------------------------------------------- servers


async def test_server_that_dies_before_ready_reports_its_log(
    harness: ModuleType, tmp_path: Path
) -> None:
    argv = (sys.executable, "-c", "import sys; print('model exploded'); sys.exit(3)")
    spec = harness.ServerSpec("broken", argv, {}, tmp_path, harness.free_port(), 1)
    async with harness.Server(spec, log_dir=tmp_path) as server:
        with pytest.raises(harness.ServerError, match="exited with 3") as caught:
            await server.wait_ready(timeout_s=30)
    assert "model exploded" in str(caught.value)


async def test_server_stop_ends_a_process_that_ignores_sigterm(
    harness: ModuleType, tmp_path: Path
) -> None:
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ignoring', flush=True)\n"
        "time.sleep(60)\n"
    )
    spec = harness.ServerSpec("stubborn", (sys.executable, "-c", code), {}, tmp_path, 1, 1)
    server = harness.Server(spec, log_dir=tmp_path)
    server.start()
    await _wait_for(lambda: "ignoring" in server.log_tail(), timeout_s=30)
    await server.stop(grace_s=0.5)
    assert server._proc.poll() is not None
    assert server._proc.returncode == -9


async def _wait_for(condition: Any, *, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.02)


BURN = (
    "import time\n"
    "while time.process_time() < 0.2: pass\n"
    "print('burnt', flush=True)\n"
    "time.sleep(60)\n"
)


def test_process_tree_cpu_counts_descendants_apart(harness: ModuleType) -> None:
    parent_code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {BURN!r}])"
    proc = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "burnt"
        cpu = harness.process_tree_cpu(proc.pid)
        assert cpu.workers_s >= 0.15  # the grandchild burnt 0.2 s (ticks may round down)
        assert cpu.front_s < cpu.workers_s
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_ensure_cog_venv_keeps_a_venv_with_the_right_version(
    harness: ModuleType, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake_python = venv / "bin" / "python"
    fake_python.write_text("#!/bin/sh\necho 9.9.9\n")
    fake_python.chmod(0o755)
    # /bin/false as the base interpreter: any attempt to rebuild the venv would fail the test.
    assert harness.ensure_cog_venv(venv, version="9.9.9", base_python="/bin/false") == fake_python
    with pytest.raises(Exception, match="false"):
        harness.ensure_cog_venv(venv, version="1.0.0", base_python="/bin/false")


# --------------------------------------------------------------------------- the real runtimes


async def test_tiny_run_against_cog(harness: ModuleType) -> None:
    # Installs cog==0.23.1 into bench/.venv-cog on the first run (a few seconds), as the
    # harness does; later runs reuse it.
    await asyncio.to_thread(harness.ensure_cog_venv)
    spec = harness.cog_server_spec(port=harness.free_port())
    async with harness.Server(spec) as server:
        ready = await server.wait_ready(timeout_s=60)
        result = await harness.run_sequential(spec.base_url, requests=5, warmup=1)
        shared = await harness.run_concurrent(
            spec.base_url, clients=2, predictions_per_client=2, warmup=0
        )
    assert ready.ready_s > 0
    assert (result.failed, result.stats.n) == (0, 5)
    assert (shared.succeeded, shared.failed, shared.gave_up) == (4, 0, 0)


async def test_tiny_run_against_cog_pool(harness: ModuleType) -> None:
    spec = harness.pool_server_spec(port=harness.free_port(), runners=2)
    server = harness.Server(spec)
    async with server:
        ready = await server.wait_ready(timeout_s=60)
        sequential = await harness.run_sequential(spec.base_url, requests=5, warmup=1)
        shared = await harness.run_concurrent(
            spec.base_url, clients=4, predictions_per_client=2, warmup=0
        )
        makespan = await harness.run_makespan(
            spec.base_url, runners=2, requests=4, sleep_ms=10, warmup=0
        )
    assert 0 < ready.ready_s <= ready.all_runners_ready_s
    assert (sequential.failed, sequential.rejected, sequential.stats.n) == (0, 0, 5)
    assert sequential.predict_time is not None  # the pool reports metrics.predict_time
    assert (shared.succeeded, shared.rejected, shared.failed) == (8, 0, 0)  # it queues
    assert makespan.succeeded == 4
    assert server._proc.poll() is not None  # stopped, not left behind


# --------------------------------------------------------------------------- the CLI


def test_quick_run_writes_its_section_and_json(harness: ModuleType, tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Someone else's section\nkept\n")
    raw = tmp_path / "raw.json"
    argv = ["--quick", "--only", "cog-pool", "--scenarios", "1,3", "--runner-counts", "1"]
    argv += ["--requests", "5", "--write", "--results", str(results), "--json", str(raw)]
    assert harness.main(argv) == 0
    text = results.read_text()
    assert "Someone else's section\nkept" in text
    assert "| cog-pool | " in text
    assert "| 1 | 10 x 1 | 10 |" in text  # scenario 3: 10 predictions on 1 runner, all done
    figures = json.loads(raw.read_text())
    assert figures["results"]["cog-pool"]["sequential"]["stats"]["n"] == 5
    assert figures["results"]["cog-pool"]["http_floor"]["n"] == 5
    assert figures["machine"]["nproc"] >= 1


def test_sigterm_stops_the_harness_and_its_servers(tmp_path: Path) -> None:
    harness_py = Path(__file__).resolve().parents[2] / "bench" / "harness.py"
    argv = [sys.executable, str(harness_py), "--only", "cog-pool", "--scenarios", "3"]
    argv += ["--json", str(tmp_path / "raw.json")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        server_pid = _first_server_pid(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _wait_gone(server_pid, timeout_s=30)


def _first_server_pid(proc: subprocess.Popen[str]) -> int:
    assert proc.stderr is not None
    for line in proc.stderr:  # ends at EOF if the harness exits first
        match = re.match(r"server_spawned .*\bpid=(\d+)", line)
        if match:
            return int(match.group(1))
    raise AssertionError("the harness exited before it spawned a server")


def _wait_gone(pid: int, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"server pid {pid} still running {timeout_s} s after the harness")
