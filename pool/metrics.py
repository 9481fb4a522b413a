"""The pool's metrics, exposed through ``prometheus-client`` (text format 0.0.4).

The pool's own counters and histograms are plain numbers updated from the event loop (no lock,
no per-update allocation on the prediction path) and turned into metric families at scrape
time by a custom collector on a per-:class:`Metrics` registry. The same registry holds
``prometheus-client``'s process, platform and GC collectors (the pool process), a collector of
each runner process's RSS and CPU time (read from ``/proc/<pid>/status`` and ``/proc/<pid>/
stat``), and, when NVML (the optional ``nvidia-ml-py``) is importable and finds a driver, each
GPU's memory and utilisation. Gauges that the manager knows (runners by state, predictions in
flight, queue depth) come from collectors it registers: a collector returns :class:`Sample`s;
one that raises is logged and skipped so a scrape never fails.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS_S",
    "GAUGE_IN_FLIGHT",
    "GAUGE_QUEUE_DEPTH",
    "GAUGE_RUNNERS",
    "Collector",
    "GpuCollector",
    "Metrics",
    "RunnerProcessCollector",
    "RunnerSource",
    "Sample",
    "load_nvml",
    "read_process",
]

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Names for the gauges the manager's collectors report, so every part spells them alike.
GAUGE_RUNNERS = "cog_pool_runners"  # labels: state (STARTING, READY, BUSY, ...)
GAUGE_IN_FLIGHT = "cog_pool_predictions_in_flight"
GAUGE_QUEUE_DEPTH = "cog_pool_queue_depth"  # predictions waiting for a runner slot

# Seconds: a prediction may take milliseconds (echo models) or many minutes (video).
DEFAULT_BUCKETS_S: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 3600.0,
)  # fmt: skip

_GAUGE_HELP = {
    GAUGE_RUNNERS: "Runners by state.",
    GAUGE_IN_FLIGHT: "Predictions dispatched to a runner and not finished.",
    GAUGE_QUEUE_DEPTH: "Predictions waiting for a free runner slot.",
}

# Linux reports CPU times in clock ticks; the tick length is fixed for the running kernel.
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Sample:
    """One gauge value reported by a collector at scrape time."""

    name: str
    value: float
    labels: Mapping[str, str] = field(default_factory=dict)
    help: str = ""


Collector = Callable[[], Iterable[Sample]]
# The runners to measure: dicts with "index", "gpu" and "pid" (the /health-check runner list).
RunnerSource = Callable[[], Iterable[Mapping[str, Any]]]


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # One count in the first bucket that holds the value; family() makes them cumulative.
        self.total += 1
        self.sum += value
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1

    def family(self, name: str, help_text: str) -> HistogramMetricFamily:
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            running += count
            buckets.append((floatToGoString(bound), running))
        buckets.append(("+Inf", self.total))
        return HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=self.sum)


class Metrics:
    """Counters and histograms of the pool, plus scrape-time gauges from collectors.

    ``nvml`` is the NVML module to read GPUs through; by default ``pynvml`` when importable
    (pass None for no GPU series, or a stand-in module in tests).
    """

    def __init__(
        self, *, buckets_s: tuple[float, ...] = DEFAULT_BUCKETS_S, nvml: Any = "import"
    ) -> None:
        self._predictions: dict[tuple[str, str], int] = {}
        self._runner_predictions: dict[int, int] = {}
        self._queue_wait = _Histogram(buckets_s)
        self._predict_time = _Histogram(buckets_s)
        self._restarts: dict[int, int] = {}
        self._recycles: dict[tuple[int, str], int] = {}
        self._reloads: dict[str, int] = {}  # by result: succeeded, failed
        self._webhook_failures = 0
        self._collectors: list[Collector] = []
        self.runners = RunnerProcessCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_PoolCollector(self))
        self.registry.register(self.runners)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        module = load_nvml() if nvml == "import" else nvml
        self.gpus = GpuCollector(module) if module is not None else None
        if self.gpus is not None:
            self.registry.register(self.gpus)

    # --- updates (called by the manager and the webhook sender) ------------------------------
    def prediction_finished(
        self,
        *,
        status: str,
        source: str,
        queue_wait_s: float | None,
        predict_time_s: float | None,
        runner_index: int | None = None,
    ) -> None:
        """Count one terminal prediction; times are None when it never reached that stage."""
        key = (status, source)
        self._predictions[key] = self._predictions.get(key, 0) + 1
        if runner_index is not None:
            self._runner_predictions[runner_index] = (
                self._runner_predictions.get(runner_index, 0) + 1
            )
        if queue_wait_s is not None:
            self._queue_wait.observe(max(0.0, queue_wait_s))
        if predict_time_s is not None:
            self._predict_time.observe(max(0.0, predict_time_s))

    def runner_restarted(self, runner_index: int) -> None:
        self._restarts[runner_index] = self._restarts.get(runner_index, 0) + 1

    def runner_recycled(self, runner_index: int, reason: str) -> None:
        key = (runner_index, reason)
        self._recycles[key] = self._recycles.get(key, 0) + 1

    def runner_removed(self, runner_index: int) -> None:
        """A runner left the pool for good (reload, scale-down): its series go too, so that
        reloads do not grow the exposition without bound (indices are never reused)."""
        self._runner_predictions.pop(runner_index, None)
        self._restarts.pop(runner_index, None)
        for key in [k for k in self._recycles if k[0] == runner_index]:
            del self._recycles[key]

    def reload_ended(self, result: str) -> None:
        """A reload ended: ``succeeded`` or ``failed`` (aborted)."""
        self._reloads[result] = self._reloads.get(result, 0) + 1

    def webhook_failed(self) -> None:
        """A webhook was given up on after its last attempt."""
        self._webhook_failures += 1

    def add_collector(self, fn: Collector) -> None:
        """Register a function that reports gauges at each scrape."""
        self._collectors.append(fn)

    def add_runner_source(self, fn: RunnerSource) -> None:
        """Measure the processes ``fn`` lists (index, gpu, pid) at each scrape."""
        self.runners.sources.append(fn)

    # --- exposition ----------------------------------------------------------------------------
    def render(self) -> str:
        """The whole exposition, Prometheus text format 0.0.4."""
        return generate_latest(self.registry).decode()

    def families(self) -> Iterator[Metric]:
        """The pool's own families: counters, histograms, then the collectors' gauges."""
        predictions = CounterMetricFamily(
            "cog_pool_predictions", "Finished predictions.", labels=["source", "status"]
        )
        for (status, source), count in sorted(self._predictions.items()):
            predictions.add_metric([source, status], count)
        yield predictions
        per_runner = CounterMetricFamily(
            "cog_pool_runner_predictions",
            "Finished predictions that ran on each runner.",
            labels=["runner"],
        )
        for index, count in sorted(self._runner_predictions.items()):
            per_runner.add_metric([str(index)], count)
        yield per_runner
        yield self._queue_wait.family(
            "cog_pool_queue_wait_seconds", "Time from admission to dispatch to a runner."
        )
        yield self._predict_time.family(
            "cog_pool_predict_seconds", "Time a runner spent on a prediction."
        )
        restarts = CounterMetricFamily(
            "cog_pool_runner_restarts", "Runner restarts.", labels=["runner"]
        )
        for index, count in sorted(self._restarts.items()):
            restarts.add_metric([str(index)], count)
        yield restarts
        recycles = CounterMetricFamily(
            "cog_pool_runner_recycles",
            "Runners replaced after max_predictions, max_rss_mb or a MemoryError.",
            labels=["reason", "runner"],
        )
        for (index, reason), count in sorted(self._recycles.items()):
            recycles.add_metric([reason, str(index)], count)
        yield recycles
        reloads = CounterMetricFamily(
            "cog_pool_reloads", "Reloads ended, by result (succeeded, failed).", labels=["result"]
        )
        for result, count in sorted(self._reloads.items()):
            reloads.add_metric([result], count)
        yield reloads
        yield CounterMetricFamily(
            "cog_pool_webhook_failures",
            "Webhooks given up on after retries.",
            value=self._webhook_failures,
        )
        yield from self._gauges()

    def _collect(self) -> list[Sample]:
        samples: list[Sample] = []
        for fn in list(self._collectors):
            try:
                samples.extend(fn())
            except Exception as e:  # a broken collector must not break the scrape
                log.warning("metrics_collector_failed collector=%r error=%r", fn, e)
        return samples

    def _gauges(self) -> Iterator[Metric]:
        by_name: dict[str, Metric] = {}
        for s in self._collect():
            family = by_name.get(s.name)
            if family is None:
                family = Metric(s.name, s.help or _GAUGE_HELP.get(s.name, s.name), "gauge")
                by_name[s.name] = family
            family.add_sample(s.name, {k: str(v) for k, v in s.labels.items()}, float(s.value))
        yield from by_name.values()


class _PoolCollector:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.families()


# --- runner processes --------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcessReading:
    rss_bytes: int
    cpu_s: float


def read_process(pid: int, proc: str = "/proc") -> ProcessReading | None:
    """RSS and CPU time (user + system) of ``pid`` from procfs; None when it is gone."""
    try:
        with open(f"{proc}/{pid}/status", encoding="ascii", errors="replace") as f:
            status = f.read()
        with open(f"{proc}/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:  # exited between the listing and the read, or no procfs here
        return None
    rss_kib = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])  # "VmRSS:   12345 kB"
            break
    # The command name (field 2) may contain spaces and parentheses: split after its last ")".
    fields = stat.rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return ProcessReading(rss_bytes=rss_kib * 1024, cpu_s=(utime + stime) / _CLOCK_TICKS)


class RunnerProcessCollector:
    """RSS and CPU seconds of each live runner process, labelled by runner and GPU."""

    def __init__(self, proc: str = "/proc") -> None:
        self.sources: list[RunnerSource] = []
        self.proc = proc

    def collect(self) -> Iterator[Metric]:
        rss = GaugeMetricFamily(
            "cog_pool_runner_resident_memory_bytes",
            "Resident memory of each runner process.",
            labels=["runner", "gpu"],
        )
        cpu = CounterMetricFamily(
            "cog_pool_runner_cpu_seconds",
            "User and system CPU time of each runner process (resets when it restarts).",
            labels=["runner", "gpu"],
        )
        for runner in self._runners():
            reading = read_process(int(runner["pid"]), self.proc)
            if reading is None:
                continue
            labels = [str(runner["index"]), "" if runner.get("gpu") is None else str(runner["gpu"])]
            rss.add_metric(labels, reading.rss_bytes)
            cpu.add_metric(labels, reading.cpu_s)
        yield rss
        yield cpu

    def _runners(self) -> list[Mapping[str, Any]]:
        out: list[Mapping[str, Any]] = []
        for source in list(self.sources):
            try:
                out.extend(r for r in source() if r.get("pid") is not None)
            except Exception as e:  # a broken source must not break the scrape
                log.warning("metrics_runner_source_failed error=%r", e)
        return out


# --- GPUs ----------------------------------------------------------------------------------------
def load_nvml() -> Any:
    """The ``pynvml`` module of ``nvidia-ml-py``, or None when it is not installed."""
    try:
        import pynvml  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return pynvml


class GpuCollector:
    """Memory and utilisation of every GPU NVML sees; nothing when NVML finds no driver."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self._initialised: bool | None = None  # None: not tried yet

    def _init(self) -> bool:
        if self._initialised is None:
            try:
                self.nvml.nvmlInit()
                self._initialised = True
                log.info("metrics_gpu_ready devices=%d", self.nvml.nvmlDeviceGetCount())
            except Exception as e:  # NVMLError: no driver, no library, no device
                # Tried once: a host without a driver does not grow one at run time.
                self._initialised = False
                log.info("metrics_gpu_unavailable error=%r", e)
        return self._initialised

    def collect(self) -> Iterator[Metric]:
        if not self._init():
            return
        labels = ["gpu", "uuid"]
        used = GaugeMetricFamily(
            "cog_pool_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=labels
        )
        total = GaugeMetricFamily(
            "cog_pool_gpu_memory_total_bytes", "GPU memory installed (NVML).", labels=labels
        )
        util = GaugeMetricFamily(
            "cog_pool_gpu_utilization_ratio",
            "Fraction of the last sample period a kernel ran on the GPU (NVML).",
            labels=labels,
        )
        try:
            count = self.nvml.nvmlDeviceGetCount()
        except Exception as e:
            log.warning("metrics_gpu_failed error=%r", e)
            return
        for i in range(count):
            try:
                handle = self.nvml.nvmlDeviceGetHandleByIndex(i)
                uuid = self.nvml.nvmlDeviceGetUUID(handle)
                memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = self.nvml.nvmlDeviceGetUtilizationRates(handle)
            except Exception as e:  # one lost GPU must not hide the others
                log.warning("metrics_gpu_failed gpu=%d error=%r", i, e)
                continue
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            used.add_metric([str(i), uuid], float(memory.used))
            total.add_metric([str(i), uuid], float(memory.total))
            util.add_metric([str(i), uuid], rates.gpu / 100.0)
        yield used
        yield total
        yield util
