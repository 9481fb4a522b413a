"""bench/sse_latency.py's client and statistics against a real cog-pool serving its model
(the timings themselves go to bench/RESULTS.md; nothing here asserts a duration)."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "sse_latency.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_sse_latency", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_sse_latency"] = module
    spec.loader.exec_module(module)
    return module


def test_percentile_is_nearest_rank(bench: ModuleType) -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 100 .. 1, unsorted on purpose
    assert bench.percentile(values, 50) == 50.0
    assert bench.percentile(values, 99) == 99.0
    assert bench.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        bench.percentile([], 50)


def test_the_client_measures_every_chunk_of_a_real_cog_pool(
    bench: ModuleType, tmp_path: Path
) -> None:
    model_dir = tmp_path / "sse_clock"
    shutil.copytree(bench.MODEL, model_dir)
    case = bench.cog_compat.Case("sse latency", "predict.py:Predictor")
    with bench.cog_compat.pool_server(str(model_dir), case) as (url, proc):
        bench.cog_compat.wait_started(url, proc, "cog-pool")
        latencies_ms = asyncio.run(bench.measure(url, 50, 0.0))
        bench.cog_compat.share_schema(url, str(model_dir))
        bench.mark_streaming(str(model_dir))
    assert len(latencies_ms) == 50
    assert all(v > -1000 for v in latencies_ms)  # wall clocks of one machine: no garbage
    stats = bench.summarize(latencies_ms)
    assert stats["chunks"] == 50
    assert stats["p50_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    schema = (model_dir / ".cog" / "openapi_schema.json").read_text()
    assert '"x-cog-streaming": true' in schema  # what Cog 0.23.1 needs to allow SSE
