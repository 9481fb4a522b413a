"""The pool's metrics, rendered in the Prometheus text exposition format 0.0.4.

No client library: the pool needs a handful of counters and histograms, all updated from the
event loop, and gauges that are read at scrape time from collectors the manager registers
(runners by state, predictions in flight, queue depth). A collector returns :class:`Sample`s;
one that raises is logged and skipped so a scrape never fails.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS_S",
    "GAUGE_IN_FLIGHT",
    "GAUGE_QUEUE_DEPTH",
    "GAUGE_RUNNERS",
    "Collector",
    "Metrics",
    "Sample",
]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

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


@dataclass(frozen=True)
class Sample:
    """One gauge value reported by a collector at scrape time."""

    name: str
    value: float
    labels: Mapping[str, str] = field(default_factory=dict)
    help: str = ""


Collector = Callable[[], Iterable[Sample]]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # One count in the first bucket that holds the value; lines() makes them cumulative.
        self.total += 1
        self.sum += value
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        cumulative = itertools.accumulate(self.counts)
        out = [
            f'{name}_bucket{{le="{_number(bound)}"}} {count}'
            for bound, count in zip(self.buckets, cumulative, strict=True)
        ]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.total}')
        out.append(f"{name}_sum {_number(self.sum)}")
        out.append(f"{name}_count {self.total}")
        return out


class Metrics:
    """Counters and histograms of the pool, plus scrape-time gauges from collectors."""

    def __init__(self, *, buckets_s: tuple[float, ...] = DEFAULT_BUCKETS_S) -> None:
        self._predictions: dict[tuple[str, str], int] = {}
        self._queue_wait = _Histogram(buckets_s)
        self._predict_time = _Histogram(buckets_s)
        self._restarts: dict[int, int] = {}
        self._recycles: dict[tuple[int, str], int] = {}
        self._webhook_failures = 0
        self._collectors: list[Collector] = []

    # --- updates (called by the manager and the webhook sender) ------------------------------
    def prediction_finished(
        self,
        *,
        status: str,
        source: str,
        queue_wait_s: float | None,
        predict_time_s: float | None,
    ) -> None:
        """Count one terminal prediction; times are None when it never reached that stage."""
        key = (status, source)
        self._predictions[key] = self._predictions.get(key, 0) + 1
        if queue_wait_s is not None:
            self._queue_wait.observe(max(0.0, queue_wait_s))
        if predict_time_s is not None:
            self._predict_time.observe(max(0.0, predict_time_s))

    def runner_restarted(self, runner_index: int) -> None:
        self._restarts[runner_index] = self._restarts.get(runner_index, 0) + 1

    def runner_recycled(self, runner_index: int, reason: str) -> None:
        key = (runner_index, reason)
        self._recycles[key] = self._recycles.get(key, 0) + 1

    def webhook_failed(self) -> None:
        """A webhook was given up on after its last attempt."""
        self._webhook_failures += 1

    def add_collector(self, fn: Collector) -> None:
        """Register a function that reports gauges at each scrape."""
        self._collectors.append(fn)

    # --- exposition ----------------------------------------------------------------------------
    def render(self) -> str:
        """The whole exposition, Prometheus text format 0.0.4."""
        lines: list[str] = []
        lines += _header("cog_pool_predictions_total", "counter", "Finished predictions.")
        for (status, source), count in sorted(self._predictions.items()):
            labels = _labels({"status": status, "source": source})
            lines.append(f"cog_pool_predictions_total{labels} {count}")
        lines += _header(
            "cog_pool_queue_wait_seconds",
            "histogram",
            "Time from admission to dispatch to a runner.",
        )
        lines += self._queue_wait.lines("cog_pool_queue_wait_seconds")
        lines += _header(
            "cog_pool_predict_seconds", "histogram", "Time a runner spent on a prediction."
        )
        lines += self._predict_time.lines("cog_pool_predict_seconds")
        lines += _header("cog_pool_runner_restarts_total", "counter", "Runner restarts.")
        for index, count in sorted(self._restarts.items()):
            lines.append(f'cog_pool_runner_restarts_total{{runner="{index}"}} {count}')
        lines += _header(
            "cog_pool_runner_recycles_total",
            "counter",
            "Runners replaced after max_predictions, max_rss_mb or a MemoryError.",
        )
        for (index, reason), count in sorted(self._recycles.items()):
            labels = _labels({"runner": str(index), "reason": reason})
            lines.append(f"cog_pool_runner_recycles_total{labels} {count}")
        lines += _header(
            "cog_pool_webhook_failures_total", "counter", "Webhooks given up on after retries."
        )
        lines.append(f"cog_pool_webhook_failures_total {self._webhook_failures}")
        lines += self._render_gauges()
        return "\n".join(lines) + "\n"

    def _collect(self) -> list[Sample]:
        samples: list[Sample] = []
        for fn in list(self._collectors):
            try:
                samples.extend(fn())
            except Exception as e:  # a broken collector must not break the scrape
                log.warning("metrics_collector_failed collector=%r error=%r", fn, e)
        return samples

    def _render_gauges(self) -> list[str]:
        by_name: dict[str, list[Sample]] = {}
        for sample in self._collect():
            by_name.setdefault(sample.name, []).append(sample)
        lines: list[str] = []
        for name, samples in by_name.items():
            help_text = samples[0].help or _GAUGE_HELP.get(name, name)
            lines += _header(name, "gauge", help_text)
            for s in samples:
                lines.append(f"{name}{_labels(s.labels)} {_number(s.value)}")
        return lines


def _header(name: str, kind: str, help_text: str) -> list[str]:
    help_escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    return [f"# HELP {name} {help_escaped}", f"# TYPE {name} {kind}"]
