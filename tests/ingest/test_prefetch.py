"""The AMQP prefetch tuner (ingest/prefetch.py): pure logic, no broker."""

from __future__ import annotations

import math

import pytest

from ingest.prefetch import PrefetchTuner


def fed(tuner: PrefetchTuner, run_s: float, settle_s: float, n: int = 60) -> PrefetchTuner:
    for _ in range(n):
        tuner.observe(run_s, settle_s)
    return tuner


def test_the_window_starts_at_two_per_slot():
    tuner = PrefetchTuner(3)
    assert tuner.current == tuner.wanted() == 6
    assert tuner.due(now=100.0) is None  # nothing measured yet


def test_predictions_longer_than_a_settle_round_keep_two_per_slot():
    # 20 ms predictions, 1 ms to settle: the replacement arrives long before it is needed.
    tuner = fed(PrefetchTuner(2), run_s=0.020, settle_s=0.001)
    assert tuner.wanted() == 4
    assert tuner.due(now=100.0) is None


def test_predictions_shorter_than_a_settle_round_get_room_for_settling_messages():
    # 1 ms predictions, 1.5 ms to settle: 2 * 1.5 / 1 = 3 messages per slot on their way.
    tuner = fed(PrefetchTuner(2), run_s=0.001, settle_s=0.0015)
    assert tuner.wanted() == 2 * (2 + 2)
    assert tuner.due(now=100.0) == 8


def test_the_window_is_bounded_per_slot():
    tuner = fed(PrefetchTuner(2, max_per_slot=3), run_s=0.0001, settle_s=0.01)
    assert tuner.wanted() == 6


def test_a_change_waits_for_samples_and_for_the_interval():
    tuner = fed(PrefetchTuner(1, min_samples=10, interval_s=5.0), 0.001, 0.002, n=9)
    assert tuner.due(now=0.0) is None  # 9 samples: too few
    tuner.observe(0.001, 0.002)
    wanted = tuner.due(now=0.0)
    assert wanted is not None and wanted > 2
    tuner.applied(wanted, now=0.0)
    fed(tuner, run_s=0.5, settle_s=0.001, n=200)  # now long predictions: back to the base
    assert tuner.due(now=4.9) is None  # too soon after the last change
    assert tuner.due(now=5.0) == 2


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_impossible_samples_are_ignored(bad):
    tuner = PrefetchTuner(2, min_samples=1)
    tuner.observe(bad, 0.001)
    tuner.observe(0.001, bad)
    assert tuner.run_s is None and tuner.settle_s is None
    assert tuner.due(now=10.0) is None
