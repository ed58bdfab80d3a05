"""Governance signals: a run row's guardrail and approval signals (rows without them included), and
the spikes of guardrail actions and escalations per agent version against its own baseline."""

import numpy as np
import pytest

from streams.detect.governance import (DECISIONS, GovernanceWatch, approval_denied, guardrail, guardrail_acted,
                                       hypergeometric_sf)


@pytest.mark.parametrize("hits, worst", [
    (None, "none"),
    ({}, "none"),
    ({"pii:allowed": 2}, "allowed"),
    ({"pii:allowed": 1, "tone:warned": 1}, "warned"),
    ({"tone:warned": 3, "pii:redacted": 1}, "redacted"),
    ({"pii:redacted": 1, "refund:blocked": 1, "tone:warned": 1}, "blocked"),
    ({"tool:refund:blocked": 1}, "blocked"),  # the key splits at its last ':'
    ({"refund:blocked": 0, "pii:allowed": 1}, "allowed"),  # a count of 0 is no hit
    ({"refund:": 1}, "unknown"),  # a hit without a decision: evaluated, effect unknown
    ({"refund:": 1, "pii:allowed": 1}, "allowed"),
    ([("pii:warned", 1), ("tool:x:allowed", 1)], "warned"),  # (key, count) pairs read alike
])
def test_guardrail_is_the_most_severe_decision(hits, worst):
    row = {} if hits is None else {"policy_hits": hits}
    assert guardrail(row) == worst
    assert guardrail_acted(row) == (worst in ("warned", "redacted", "blocked"))


def test_guardrail_names_are_the_modules_own_strings():
    built = "".join(["bl", "ocked"])  # equal to "blocked", another object
    assert guardrail({"policy_hits": {"pii:" + built: 1}}) is DECISIONS[-1]


def test_approval_denied_reads_absent_and_null_as_no():
    assert not approval_denied({}) and not approval_denied({"approvals_denied": None})
    assert not approval_denied({"approvals_denied": 0, "approvals_requested": 3})
    assert approval_denied({"approvals_denied": 2})

MIN = 60_000
T0 = 1_793_491_200_000  # a window boundary
WINDOW = 5 * MIN


def runs_of(window: int, n: int, tripped: int = 0, escalated: int = 0, version: str = "v1", prefix: str = "") -> list[dict]:
    """`n` runs ending in window number `window`: the first `tripped` had a guardrail act (the next
    two only an `allowed` hit, which is no trip), the last `escalated` ended escalated."""
    rows = []
    for i in range(n):
        hits = {"refund_limit:blocked": 1} if i < tripped else {"tone:allowed": 1} if i < tripped + 2 else {}
        rows.append({"run_id": f"{prefix}{version}-{window}-{i}", "agent_id": "bot", "agent_version": version,
                     "ended_at": T0 + window * WINDOW + i, "outcome": "escalated" if i >= n - escalated else "success",
                     "policy_hits": hits})
    return rows


def passed_after(window: int) -> int:
    return T0 + (window + 1) * WINDOW + 2 * MIN  # its end plus the lateness


def feed(watch: GovernanceWatch, windows: list[tuple[int, int, int]]) -> list[dict]:
    alerts = []
    for w, (n, tripped, escalated) in enumerate(windows):
        alerts += watch.update(runs_of(w, n, tripped, escalated), passed_after(w))
    return alerts


def test_a_guardrail_spike_fires_once_names_its_policy_and_resolves_once():
    watch = GovernanceWatch(WINDOW, 2 * MIN)
    steady = [(100, 3, 2)] * 12
    alerts = feed(watch, steady + [(100, 20, 2), (100, 25, 2), (100, 3, 2), (100, 2, 2), (100, 3, 2)])
    assert [(a["kind"], a["status"]) for a in alerts] == [("policy", "firing"), ("policy", "resolved")]
    firing, resolved = alerts
    assert firing["fingerprint"] == resolved["fingerprint"] and firing["alert_id"] != resolved["alert_id"]
    evidence = firing["evidence"]
    assert (evidence["runs"], evidence["flagged_runs"]) == (100, 20)
    assert evidence["baseline"] == pytest.approx(0.03) and evidence["baseline_runs"] == 1200
    assert evidence["p_value"] < 1e-6 and evidence["policy_hits"]["refund_limit:blocked"] == 20
    assert "refund_limit:blocked x20" in firing["summary"] and firing["severity"] == "critical"
    # the spiking windows stayed out of the baseline: it resolved against the clean rate
    assert resolved["evidence"]["baseline"] == pytest.approx(0.03, abs=0.002)


def test_a_run_landing_again_replaces_its_flags_and_hits():
    watch = GovernanceWatch(WINDOW, 2 * MIN)
    assert feed(watch, [(100, 3, 2)] * 12) == []
    spike = runs_of(12, 100, tripped=20)
    # before the window is tested, runs 0-4 land again without hits, runs 5-9 with another policy's
    again = [{**row, "policy_hits": {}} for row in spike[:5]] + [
        {**row, "policy_hits": {"pii:redacted": 1}} for row in spike[5:10]]
    assert watch.update(spike, 0) == []
    (firing,) = watch.update(again, passed_after(12))
    assert (firing["evidence"]["runs"], firing["evidence"]["flagged_runs"]) == (100, 15)
    assert firing["evidence"]["policy_hits"] == {"refund_limit:blocked": 10, "pii:redacted": 5, "tone:allowed": 2}


def test_an_escalation_spike_is_its_own_alert():
    watch = GovernanceWatch(WINDOW, 2 * MIN)
    alerts = feed(watch, [(100, 3, 2)] * 12 + [(100, 3, 15)])
    assert [(a["kind"], a["status"], a["evidence"]["metric"]) for a in alerts] == [
        ("escalation", "firing", "escalation_rate")]


def test_no_alert_before_a_baseline_or_on_a_small_window():
    watch = GovernanceWatch(WINDOW, 2 * MIN)
    # the first window is all trips, but there is no baseline yet; later a tiny window of trips
    assert feed(watch, [(100, 90, 0)] + [(100, 3, 2)] * 3 + [(10, 10, 10)]) == []


def test_steady_traffic_raises_no_alert():
    # 10 versions x 100 windows of binomial traffic at the version's own rates: 2,000 tests
    rng = np.random.default_rng(7)
    alerts = []
    for v in range(10):
        watch = GovernanceWatch(WINDOW, 2 * MIN)
        trip, escalate = rng.uniform(0.01, 0.2), rng.uniform(0.01, 0.1)
        for w in range(100):
            n = int(rng.integers(20, 300))
            rows = runs_of(w, n, version=f"v{v}")
            flags = rng.random((n, 2)) < (trip, escalate)
            for row, (tripped, escalated) in zip(rows, flags):
                row["policy_hits"] = {"p:warned": 1} if tripped else {}
                row["outcome"] = "escalated" if escalated else "success"
            alerts += watch.update(rows, passed_after(w))
    assert alerts == []


def test_late_runs_of_a_tested_window_are_counted_not_tested():
    watch = GovernanceWatch(WINDOW, 2 * MIN)
    feed(watch, [(50, 1, 1)] * 2)
    assert watch.update(runs_of(0, 5, prefix="late-"), passed_after(1)) == []
    assert watch.late_runs == 5


def test_the_fisher_p_value_is_scipys():
    from scipy.stats import fisher_exact

    assert hypergeometric_sf(12, 100, 30, 1000) == pytest.approx(
        fisher_exact([[12, 88], [30, 970]], alternative="greater").pvalue)
