"""pool/metrics.py: counters, histograms and scrape-time gauges in Prometheus text format."""

from __future__ import annotations

import re

from pool.metrics import GAUGE_RUNNERS, Metrics, Sample

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
    assert s['cog_pool_queue_wait_seconds_bucket{le="1"}'] == 1
    assert s['cog_pool_queue_wait_seconds_bucket{le="+Inf"}'] == 2
    assert s["cog_pool_queue_wait_seconds_sum"] == 2.05
    assert s['cog_pool_predict_seconds_bucket{le="0.1"}'] == 0
    assert s['cog_pool_predict_seconds_bucket{le="1"}'] == 2
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
