"""bench/embeddings.py's pieces: the skip without the example venv, the load loop, the report.

The load loop runs against a small Cog-like server on a real loopback socket (one slot, 409
while it is taken, a matrix out), so its counting is checked without torch and without timing
anything. The real model runs only when the script itself is run (not in CI).
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "embeddings.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    if "bench_embeddings" in sys.modules:
        return sys.modules["bench_embeddings"]
    spec = importlib.util.spec_from_file_location("bench_embeddings", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_embeddings"] = module  # dataclasses look their module up while built
    spec.loader.exec_module(module)
    return module


@dataclass
class OneSlot:
    """Cog 0.23's shape: one slot, 409 while taken; each line of `texts` becomes [len, 1.0]."""

    never_free: bool = False
    requests: int = 0
    rejected: int = 0
    busy: bool = False
    base_url: str = ""
    rejection_seen: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        inputs = (await request.json())["input"]
        if self.busy or self.never_free:
            self.rejected += 1
            self.rejection_seen.set()
            return web.json_response({"error": "At capacity", "status": "failed"}, status=409)
        self.busy = True
        try:
            if not self.rejection_seen.is_set():  # hold the slot until someone was turned away
                await asyncio.wait_for(self.rejection_seen.wait(), timeout=30)
            rows = [[float(len(line)), 1.0] for line in inputs["texts"].split("\n")]
            return web.json_response({"status": "succeeded", "output": rows})
        finally:
            self.busy = False


@pytest.fixture
async def one_slot() -> AsyncIterator[OneSlot]:
    server = OneSlot()
    app = web.Application()
    app.router.add_post("/predictions", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield server
    finally:
        await runner.cleanup()


def test_skipped_with_a_clear_line_when_the_example_venv_is_absent(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setattr(bench, "MODEL_PYTHON", bench.harness.REPO_ROOT / "no-such" / "python")
    assert bench.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("bench/embeddings.py: skipped: no-such/python is absent")


def test_requests_rotate_the_sentences_and_threads_split_the_cores(bench: ModuleType) -> None:
    first = bench.texts_for(0, 3).split("\n")
    assert first == list(bench.SENTENCES[:3])
    assert bench.texts_for(1, 3).split("\n") == list(bench.SENTENCES[3:6])
    assert len(bench.texts_for(5, 30).split("\n")) == 30
    assert [bench.threads_per_process(n, cores=2) for n in (1, 2, 4)] == [2, 1, 1]
    assert bench.threads_per_process(1, cores=2, fixed=1) == 1
    assert bench.threads_per_process(2, cores=16) == 8


async def test_load_counts_409s_and_still_gets_every_prediction(
    bench: ModuleType, one_slot: OneSlot
) -> None:
    settings = bench.Settings(clients=3, per_client=4, sentences=2, warmup=0, retry_pause_ms=1)
    load = await bench.run_load(one_slot.base_url, settings)
    assert load["succeeded"] == 12
    assert load["rejected"] == one_slot.rejected >= 1
    assert (load["failed"], load["gave_up"]) == (0, 0)
    first_lines = bench.texts_for(0, 2).split("\n")
    assert load["first_output"] == [[float(len(line)), 1.0] for line in first_lines]
    assert load["p50_s"] is not None and load["p99_s"] >= load["p50_s"]


async def test_load_gives_up_against_a_server_that_never_frees(
    bench: ModuleType, one_slot: OneSlot, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "MAX_ATTEMPTS_FACTOR", 3)
    one_slot.never_free = True
    settings = bench.Settings(clients=2, per_client=2, sentences=1, warmup=0, retry_pause_ms=0)
    load = await bench.run_load(one_slot.base_url, settings)
    assert (load["succeeded"], load["gave_up"]) == (0, 2)
    assert load["rejected"] == one_slot.requests == 2 * 3 * 2  # the bound: factor x wanted


def test_rounds_sum_their_counts_and_pool_their_latencies(bench: ModuleType) -> None:
    def load(succeeded: int, latencies: list[float], output: Any, error: Any) -> dict[str, Any]:
        return {
            "succeeded": succeeded, "rejected": 2, "failed": 0, "gave_up": 0, "elapsed_s": 1.5,
            "latencies_s": latencies, "first_output": output, "first_error": error,
            "predict_times_s": [x / 2 for x in latencies],
            "served": succeeded + 1, "cpu_front_s": 0.5, "cpu_workers_s": 1.0,
        }  # fmt: skip

    merged = bench.merge_loads(
        [load(2, [0.4, 0.1], None, None), load(3, [0.2, 0.3, 0.5], [[1.0]], "boom")]
    )
    assert (merged["succeeded"], merged["rejected"], merged["elapsed_s"]) == (5, 4, 3.0)
    assert merged["latencies_s"] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert merged["p50_s"] == pytest.approx(0.3)
    assert merged["predict_time_p50_s"] == pytest.approx(0.15)
    assert merged["predict_time_sum_s"] == pytest.approx(0.75)
    assert (merged["served"], merged["cpu_front_s"], merged["cpu_workers_s"]) == (7, 1.0, 2.0)
    assert (merged["first_output"], merged["first_error"]) == ([[1.0]], "boom")


def _result(bench: ModuleType, name: str, per_s: float, output: Any) -> Any:
    return bench.Result(
        name=name, runners=1, threads_per_process=2, ready_s=5.0, succeeded=int(per_s * 10),
        rejected=7 if name.startswith("Cog") else 0, failed=0, gave_up=0, elapsed_s=10.0,
        p50_s=0.1, p99_s=0.2, first_output=output, predict_time_p50_s=0.05,
        predict_time_sum_s=5.0, served=100, cpu_front_s=1.0, cpu_workers_s=4.0,
    )  # fmt: skip


def test_report_gives_the_ratio_to_cog_and_checks_the_vectors(bench: ModuleType) -> None:
    settings = bench.Settings(clients=4, per_client=25, sentences=8)
    machine = {
        "date_utc": "2026-01-01 00:00 UTC", "nproc": 2, "cpu_model": "x",
        "loadavg_1m_at_start": 1.0, "torch": "2.0", "sentence_transformers": "6.0",
    }  # fmt: skip
    results = [
        _result(bench, "Cog 0.23.1", 10.0, [[0.5, 0.25]]),
        _result(bench, "cog-pool, 1 runner", 12.0, [[0.5, 0.25]]),
        _result(bench, "cog-pool, 2 runners", 15.0, [[0.5, 0.3]]),
    ]
    one_thread = bench.Settings(clients=4, per_client=25, sentences=8, threads=1)
    text = bench.render([(settings, results), (one_thread, results[:1])], machine)
    assert "### `OMP_NUM_THREADS` = cores / runners in each process" in text
    assert "### `OMP_NUM_THREADS=1` in every process" in text
    rows = text.splitlines()
    cog, one, two = (next(r for r in rows if r.startswith(f"| {x.name} |")) for x in results)
    assert "| 7 | 0 | 10.0 | 80 | 1.00 |" in cog
    assert "| 0 | 0 | 12.0 | 96 | 1.20 |" in one and "| yes (max diff 0.0e+00) |" in one
    assert "| 1.50 |" in two and "| NO (max diff 5.0e-02) |" in two
    # p50, p99, predict_time p50, 5 s of 10 s busy, CPU (1 s + 4 s) over 100 predictions
    assert "| 100 | 200 | 50 | 50% | 50 (10 + 40) |" in cog


def test_section_replaces_only_its_own_block(bench: ModuleType) -> None:
    document = "# Benchmark results\n\nother section\n"
    once = bench.replace_section(document, "## embeddings\nfirst\n")
    twice = bench.replace_section(once, "## embeddings\nsecond\n")
    assert "other section" in twice and "second" in twice and "first" not in twice
    assert twice.count(bench.SECTION_BEGIN) == 1
