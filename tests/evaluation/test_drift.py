"""Drift detection's quality bars on simulated fleets (fixed seeds): no alert on a stable fleet,
every scenario's shift alerted within two windows."""

from __future__ import annotations

import pytest

from jobs.evaluate_drift import SCENARIOS, SHIFT_AT_MS, WINDOW_MS, replay, score
from streams.detect.drift import DriftDetector


@pytest.mark.parametrize("seed", [1, 2])
def test_stable_fleet_has_no_drift_alerts(seed):
    det = DriftDetector()
    rows, alerts, _, tests = replay(det, SCENARIOS["stable"].runs(seed, fast_prices=True))
    assert tests > 40 and alerts == []


@pytest.mark.parametrize("name", ["cost_x2", "success_0.5", "new_tool"])
def test_shift_is_alerted_within_two_windows(name):
    det = DriftDetector()
    _, alerts, _, _ = replay(det, SCENARIOS[name].runs(1, fast_prices=True))
    res = score(SCENARIOS[name], alerts, det.persistence)
    assert res["false_alerts"] == 0
    assert res["delay"] is not None and 0 <= res["delay"] <= 2, res
    assert SHIFT_AT_MS % WINDOW_MS == 0
