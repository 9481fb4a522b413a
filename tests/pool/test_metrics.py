"""pool/metrics.py: counters, histograms and scrape-time gauges in Prometheus text format."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

from pool.metrics import GAUGE_RUNNERS, Metrics, Sample, load_nvml, read_process

_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{.*\})? (?P<value>\S+)$")


def parse(text: str) -> dict[str, float]:
    """Parse an exposition into {'name{labels}': value}, failing on any malformed line."""
    assert text.endswith("\n")
    samples: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert name not in types, f"duplicate TYPE for {name}"
            types[name] = kind
            continue
        if line.startswith("# HELP "):
            continue
        m = _LINE.match(line)
        assert m, f"malformed line: {line!r}"
        samples[m["name"] + (m["labels"] or "")] = float(m["value"])
    return samples


def test_empty_metrics_render_every_family() -> None:
    samples = parse(Metrics().render())
    assert samples["cog_pool_webhook_failures_total"] == 0
    assert samples["cog_pool_queue_wait_seconds_count"] == 0
    assert samples['cog_pool_predict_seconds_bucket{le="+Inf"}'] == 0


def test_counters_and_histograms_count() -> None:
    m = Metrics(buckets_s=(0.1, 1.0))
    m.prediction_finished(status="succeeded", source="http", queue_wait_s=0.05, predict_time_s=0.5)
    m.prediction_finished(status="succeeded", source="http", queue_wait_s=2.0, predict_time_s=0.2)
    m.prediction_finished(status="failed", source="redis", queue_wait_s=None, predict_time_s=None)
    m.runner_restarted(1)
    m.runner_restarted(1)
    m.webhook_failed()
    s = parse(m.render())
    assert s['cog_pool_predictions_total{source="http",status="succeeded"}'] == 2
    assert s['cog_pool_predictions_total{source="redis",status="failed"}'] == 1
    assert s['cog_pool_queue_wait_seconds_bucket{le="0.1"}'] == 1
    assert s['cog_pool_queue_wait_seconds_bucket{le="1.0"}'] == 1
    assert s['cog_pool_queue_wait_seconds_bucket{le="+Inf"}'] == 2
    assert s["cog_pool_queue_wait_seconds_sum"] == 2.05
    assert s['cog_pool_predict_seconds_bucket{le="0.1"}'] == 0
    assert s['cog_pool_predict_seconds_bucket{le="1.0"}'] == 2
    assert s["cog_pool_predict_seconds_count"] == 2
    assert s['cog_pool_runner_restarts_total{runner="1"}'] == 2
    assert s["cog_pool_webhook_failures_total"] == 1


def test_collectors_report_gauges_at_scrape_time_and_a_broken_one_is_skipped() -> None:
    m = Metrics()
    state = {"READY": 2, "BUSY": 1}
    m.add_collector(lambda: [Sample(GAUGE_RUNNERS, n, {"state": k}) for k, n in state.items()])

    def broken() -> list[Sample]:
        raise RuntimeError("boom")

    m.add_collector(broken)
    m.add_collector(lambda: [Sample("cog_pool_odd", 1.5, {"why": 'a "quote"\nand \\ slash'})])
    first = parse(m.render())
    assert first['cog_pool_runners{state="READY"}'] == 2
    state["READY"] = 0
    second_text = m.render()
    second = parse(second_text)
    assert second['cog_pool_runners{state="READY"}'] == 0
    assert second['cog_pool_odd{why="a \\"quote\\"\\nand \\\\ slash"}'] == 1.5
    assert second_text.count("# TYPE cog_pool_runners gauge") == 1


# --- prometheus-client: process, runner processes, GPUs -----------------------------------------
def test_process_metrics_of_the_pool_itself() -> None:
    s = parse(Metrics(nvml=None).render())
    assert s["process_resident_memory_bytes"] > 1_000_000
    assert s["process_cpu_seconds_total"] > 0
    assert any(k.startswith("python_info{") for k in s)


def test_runner_rss_and_cpu_are_read_from_proc_for_each_runner_pid() -> None:
    # Steps: a real child burns at least 0.3 s of CPU, then waits on its stdin.
    # Result: its RSS and CPU series carry the runner's index and GPU; a pid that is gone
    # (and a runner without a pid) is skipped, not an error.
    burn = "import sys,time\nwhile time.process_time() < 0.3: pass\nprint('ok', flush=True)\n"
    child = subprocess.Popen(
        [sys.executable, "-c", burn + "sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(30)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ok\n"
        m = Metrics(nvml=None)
        m.add_runner_source(
            lambda: [
                {"index": 0, "gpu": "1", "pid": child.pid},
                {"index": 1, "gpu": None, "pid": gone.pid},
                {"index": 2, "gpu": None, "pid": None},
            ]
        )
        s = parse(m.render())
        reading = read_process(child.pid)
    finally:
        child.kill()
        child.wait(30)
    assert reading is not None
    rss = s['cog_pool_runner_resident_memory_bytes{gpu="1",runner="0"}']
    assert rss > 1_000_000 and abs(rss - reading.rss_bytes) < 50_000_000
    # process_time() counts finer than the kernel's clock ticks: allow a few ticks less
    assert s['cog_pool_runner_cpu_seconds_total{gpu="1",runner="0"}'] >= 0.25
    assert not [k for k in s if 'runner="1"' in k or 'runner="2"' in k]


def test_read_process_handles_a_command_name_with_spaces_and_parens(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "status").write_text("Name:\tx\nVmRSS:\t    2048 kB\n")
    fields = ["S"] + ["0"] * 10 + ["250", "150"] + ["0"] * 30
    (tmp_path / "7" / "stat").write_text("7 (a (b) c) " + " ".join(fields) + "\n")
    reading = read_process(7, str(tmp_path))
    assert reading is not None and reading.rss_bytes == 2048 * 1024
    assert reading.cpu_s == 400 / os.sysconf("SC_CLK_TCK")


class FakeNvml(types.SimpleNamespace):
    """Stands in for pynvml: two GPUs; ``fail_init`` mimics a host with no driver."""

    class NVMLError(Exception):
        pass

    def __init__(self, *, fail_init: bool = False, lost: int | None = None) -> None:
        super().__init__()
        self.fail_init = fail_init
        self.lost = lost
        self.inits = 0

    def nvmlInit(self) -> None:
        self.inits += 1
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        if i == self.lost:
            raise self.NVMLError("GPU is lost")
        return i

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return f"GPU-{handle}".encode()

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return types.SimpleNamespace(used=(handle + 1) * 2**30, total=80 * 2**30, free=0)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return types.SimpleNamespace(gpu=40 + handle, memory=5)


def test_gpu_series_from_nvml() -> None:
    nvml = FakeNvml()
    m = Metrics(nvml=nvml)
    s = parse(m.render())
    assert s['cog_pool_gpu_memory_used_bytes{gpu="0",uuid="GPU-0"}'] == 2**30
    assert s['cog_pool_gpu_memory_used_bytes{gpu="1",uuid="GPU-1"}'] == 2 * 2**30
    assert s['cog_pool_gpu_memory_total_bytes{gpu="1",uuid="GPU-1"}'] == 80 * 2**30
    assert s['cog_pool_gpu_utilization_ratio{gpu="1",uuid="GPU-1"}'] == 0.41
    parse(m.render())
    assert nvml.inits == 1  # initialised once, not per scrape


def test_a_lost_gpu_hides_only_its_own_series() -> None:
    s = parse(Metrics(nvml=FakeNvml(lost=0)).render())
    assert 'cog_pool_gpu_memory_used_bytes{gpu="1",uuid="GPU-1"}' in s
    assert not [k for k in s if 'gpu="0"' in k]


def test_no_gpu_series_without_nvml_or_without_a_driver(monkeypatch: Any) -> None:
    # nvidia-ml-py not installed: the import fails (None in sys.modules makes it raise).
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert load_nvml() is None
    absent = Metrics()
    assert absent.gpus is None
    nvml = FakeNvml(fail_init=True)
    no_driver = Metrics(nvml=nvml)
    for m in (absent, no_driver):
        text = m.render()
        assert "cog_pool_gpu_" not in text and "cog_pool_predictions_total" in text
    no_driver.render()
    assert nvml.inits == 1  # a host without a driver is not asked again at every scrape


def test_the_installed_nvml_if_any_gives_series_only_with_a_driver() -> None:
    # On this machine as it is: nvidia-ml-py may be installed (the gpu extra) or not, and a
    # driver may be there or not. Whatever the case, the scrape works and shows GPUs only
    # when NVML can see them.
    m = Metrics()
    s = parse(m.render())
    gpu_series = [k for k in s if k.startswith("cog_pool_gpu_memory_total_bytes{")]
    if m.gpus is None:
        assert load_nvml() is None and gpu_series == []
        return
    try:
        m.gpus.nvml.nvmlInit()
        count = m.gpus.nvml.nvmlDeviceGetCount()
    except Exception:  # NVMLError: no driver here
        count = 0
    assert len(gpu_series) == count
