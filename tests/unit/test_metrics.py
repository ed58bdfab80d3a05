"""Windowed metrics: cost per successful task, percentiles, lateness and finality."""

import numpy as np
import pytest

from streams.detect.estimators import quantile, ratio
from streams.detect.metrics import MetricWindows

MIN = 60_000
T0 = 1_793_491_200_000  # a window boundary


def run_row(run_id, ended_at, outcome="success", cost=1.0, duration=1000, version=5, agent="bot", tool_calls=2, tool_errors=0):
    return {
        "run_id": run_id, "agent_id": agent, "agent_version": "v1", "ended_at": ended_at, "outcome": outcome,
        "cost_usd": cost, "duration_ms": duration, "loop_detected": False, "tool_calls": tool_calls,
        "tool_errors": tool_errors, "input_tokens": 10, "output_tokens": 1, "version": version,
    }


def test_cost_per_success_counts_the_cost_of_failed_runs_too():
    windows = MetricWindows(5 * MIN, 30 * MIN, 2)
    rows = windows.apply(
        [run_row("a", T0 + 1, cost=1.0), run_row("b", T0 + 2, "failure", cost=3.0), run_row("c", T0 + 3, cost=2.0)],
        upstream_partition=0, upstream_watermark=T0, now_ms=1,
    )
    (row,) = rows
    assert (row["runs"], row["successes"], row["failures"]) == (3, 2, 1)
    assert row["cost_per_success"] == pytest.approx(3.0)
    assert row["success_rate"] == pytest.approx(2 / 3)


def test_no_success_gives_no_cost_per_success():
    windows = MetricWindows(5 * MIN, 30 * MIN, 2)
    (row,) = windows.apply([run_row("a", T0, "failure")], 0, T0, now_ms=1)
    assert row["cost_per_success"] is None


def test_runs_fall_in_the_window_of_their_end():
    windows = MetricWindows(5 * MIN, 30 * MIN, 2)
    rows = windows.apply([run_row("a", T0 + 4 * MIN), run_row("b", T0 + 5 * MIN)], 0, T0, now_ms=1)
    assert sorted(row["window_start"] for row in rows) == [T0, T0 + 5 * MIN]


def test_a_re_emitted_run_replaces_its_earlier_numbers():
    windows = MetricWindows(5 * MIN, 30 * MIN, 2)
    windows.apply([run_row("a", T0, cost=1.0, version=3)], 0, T0, now_ms=1)
    (row,) = windows.apply([run_row("a", T0, cost=2.0, version=4)], 0, T0, now_ms=2)
    assert row["runs"] == 1 and row["cost_usd"] == 2.0
    assert windows.apply([run_row("a", T0, cost=9.0, version=4)], 0, T0, now_ms=3) == []


def test_a_partition_that_has_not_reported_holds_windows_open_until_it_is_idle():
    windows = MetricWindows(5 * MIN, 30 * MIN, 2, idle_source_ms=60_000)
    windows.apply([run_row("a", T0)], 0, T0 + 60 * MIN, now_ms=1_000)
    assert windows.windows, "partition 1 has not reported: nothing may be final"
    (row,) = windows.apply([], 0, T0 + 60 * MIN, now_ms=62_000)
    assert row["is_final"]


def test_window_is_final_once_every_upstream_partition_passed_end_plus_idle_timeout():
    windows = MetricWindows(5 * MIN, 30 * MIN, 2)
    windows.apply([run_row("a", T0)], 0, T0, now_ms=1)
    windows.apply([], 1, T0, now_ms=1)
    # Partition 0 is far ahead, partition 1 is not: nothing is final.
    assert windows.apply([], 0, T0 + 60 * MIN, now_ms=2) == []
    (row,) = windows.apply([], 1, T0 + 35 * MIN, now_ms=3)
    assert row["is_final"] and row["runs"] == 1
    # A run for a final window is late: not counted, but counted as late.
    assert windows.apply([run_row("z", T0 + 1)], 1, T0 + 35 * MIN, now_ms=4) == []
    assert windows.late_runs == 1


def test_versions_increase():
    windows = MetricWindows(5 * MIN, 30 * MIN, 2)
    first = windows.apply([run_row("a", T0)], 0, T0, now_ms=5)[0]["version"]
    second = windows.apply([run_row("b", T0)], 0, T0, now_ms=5)[0]["version"]
    assert second > first


@pytest.mark.parametrize("size", [1, 2, 5, 20, 101])
def test_the_one_quantile_matches_numpy(size):
    values = sorted(np.random.default_rng(size).exponential(1000, size).tolist())
    for q in (0.5, 0.95):
        assert quantile(values, q) == pytest.approx(float(np.percentile(values, q * 100)))
    assert quantile([], 0.5) is None and ratio(1.0, 0) is None and ratio(3.0, 4) == 0.75


def test_restored_windows_are_whole_and_final_ones_stay_final():
    windows = MetricWindows(5 * MIN, 30 * MIN, 2)
    windows.restore(T0 + 5 * MIN, [[run_row("a", T0 + 10 * MIN)], [run_row("b", T0 + 11 * MIN)]])
    (row,) = windows.apply([run_row("c", T0 + 12 * MIN)], 0, T0, now_ms=1)
    assert row["runs"] == 3  # the restored runs are counted with the new one
    assert windows.apply([run_row("late", T0 + 1 * MIN)], 0, T0, now_ms=2) == []
    assert windows.late_runs == 1


def test_a_window_row_is_its_runs_summed_afresh_after_every_run():
    """The running counts and sorted durations of a window, through runs re-emitted with more
    events (which replace their facts) and stale re-emissions (ignored), give the row computed
    from the runs it holds."""
    from streams.detect.metrics import Window

    rng = np.random.default_rng(8)
    window = Window("bot", "v1", T0, T0 + 5 * MIN)
    held: dict[str, dict] = {}
    for i in range(400):
        run_id = f"r{rng.integers(0, 120)}"
        row = {"run_id": run_id, "outcome": rng.choice(["success", "failure", "timeout"]),
               "cost_usd": float(rng.lognormal(-4, 1)), "duration_ms": int(rng.choice([5, 100, rng.integers(1, 10**7)])),
               "loop_detected": bool(rng.random() < 0.1), "tool_calls": int(rng.integers(0, 9)),
               "tool_errors": int(rng.integers(0, 3)), "input_tokens": int(rng.integers(0, 9_000)),
               "output_tokens": int(rng.integers(0, 900)), "version": int(rng.integers(0, 6))}
        if window.add(row):
            held[run_id] = row
        facts = list(held.values())
        durations = sorted(float(r["duration_ms"]) for r in facts)
        got = window.row(final=False, version=1, updated_at=2)
        assert got["p95_duration_ms"] == quantile(durations, 0.95)
        assert got["p50_duration_ms"] == quantile(durations, 0.50) and list(window.durations) == durations
        successes = sum(r["outcome"] == "success" for r in facts)
        want = {"runs": len(facts), "successes": successes, "timeouts": sum(r["outcome"] == "timeout" for r in facts),
                "cost_usd": sum(float(r["cost_usd"]) for r in facts),
                "loop_rate": ratio(sum(r["loop_detected"] for r in facts), len(facts)),
                "tool_calls": sum(r["tool_calls"] for r in facts), "tool_errors": sum(r["tool_errors"] for r in facts),
                "input_tokens": sum(r["input_tokens"] for r in facts),
                "output_tokens": sum(r["output_tokens"] for r in facts)}
        assert {key: got[key] for key in want} == want
        assert all(type(got[key]) is type(want[key]) for key in want)


def test_a_window_sums_the_governance_signals_of_its_runs():
    windows = MetricWindows(5 * MIN, 30 * MIN, 1)
    hit = {**run_row("a", T0 + 1), "policy_hits": {"pii:redacted": 2, "tone:allowed": 1}, "approvals_requested": 1,
           "approvals_granted": 1, "approval_waits_ms": [30_000.0], "feedback_count": 2, "feedback_score": 0.5}
    allowed_only = {**run_row("b", T0 + 2), "policy_hits": {"tone:allowed": 1}, "feedback_count": 1, "feedback_score": 1.0}
    escalated = {**run_row("c", T0 + 3, "escalated", duration=8_000), "steps": 7, "approvals_requested": 1,
                 "approvals_denied": 1, "approval_waits_ms": [90_000.0]}
    plain = run_row("d", T0 + 4)  # a row without the governance columns (landed before they existed)
    (row,) = windows.apply([hit, allowed_only, escalated, plain], 0, T0, now_ms=1)
    assert row["policy_hits"] == 4 and row["policy_hits_by"] == {"pii:redacted": 2, "tone:allowed": 2}
    assert row["guardrail_runs"] == 1 and row["guardrail_rate"] == pytest.approx(0.25)  # `allowed` is not a trip
    assert (row["approvals_requested"], row["approvals_granted"], row["approvals_denied"]) == (2, 1, 1)
    assert row["approval_wait_p50_ms"] == pytest.approx(60_000.0) and row["approval_wait_p95_ms"] == pytest.approx(87_000.0)
    assert (row["escalations"], row["escalation_steps_p50"], row["escalation_seconds_p50"]) == (1, 7, 8.0)
    assert row["escalation_rate"] == pytest.approx(0.25)
    assert row["feedback_count"] == 3 and row["feedback_score"] == pytest.approx(2 / 3)
    # run "a" again with more events and no hits: its facts are replaced, not added
    (again,) = windows.apply([{**run_row("a", T0 + 1, version=9), "feedback_count": 0}], 0, T0, now_ms=2)
    assert again["policy_hits_by"] == {"tone:allowed": 1} and again["guardrail_runs"] == 0
    assert again["approvals_requested"] == 1 and again["feedback_count"] == 1


def test_a_window_without_governance_signals_reports_none():
    windows = MetricWindows(5 * MIN, 30 * MIN, 1)
    (row,) = windows.apply([run_row("a", T0)], 0, T0, now_ms=1)
    assert (row["policy_hits"], row["policy_hits_by"], row["guardrail_rate"], row["escalations"]) == (0, {}, 0.0, 0)
    assert row["approval_wait_p50_ms"] is None and row["feedback_score"] is None


def _random_row(rng, run_id: str) -> dict:
    row = {**run_row(run_id, T0 + int(rng.integers(0, 5 * MIN)), rng.choice(["success", "failure", "timeout", "escalated"]),
                     cost=float(rng.lognormal(-4, 1)), duration=int(rng.integers(1, 10**6)), version=int(rng.integers(0, 6)),
                     tool_calls=int(rng.integers(0, 9)), tool_errors=int(rng.integers(0, 3))),
           "loop_detected": bool(rng.random() < 0.1), "steps": int(rng.integers(1, 20))}
    if rng.random() < 0.4:
        row |= {"policy_hits": {f"p{rng.integers(0, 3)}:redacted": 1}, "feedback_count": int(rng.integers(0, 3)),
                "feedback_score": float(rng.random()), "approvals_requested": 1,
                "approval_waits_ms": [float(rng.integers(1, 10**5))]}
    return row


def test_a_window_gives_the_same_rows_whether_or_not_its_runs_were_sealed():
    """Sealing folds a run's facts into the window's sums, keeping only its id and version: the
    rows stay those of a window that keeps every run's facts, through re-emissions before the
    seal and redeliveries after it."""
    from streams.detect.metrics import Window

    rng = np.random.default_rng(21)
    sealed, whole = Window("bot", "v1", T0, T0 + 5 * MIN), Window("bot", "v1", T0, T0 + 5 * MIN)
    latest: dict[str, int] = {}  # run -> the version the windows hold
    done: set[str] = set()  # sealed runs
    for step in range(1500):
        run_id = f"r{step // 3 + int(rng.integers(0, 4))}"  # each run comes a few times, close together
        row = _random_row(rng, run_id)
        if run_id in done:  # sealed: only a redelivery can come now
            row["version"] = latest[run_id]
        added = sealed.add(row)
        assert added == whole.add(row) and (run_id not in done or not added)
        if added:
            latest[run_id] = row["version"]
        if rng.random() < 0.05:
            sealed.seal(sealed.appended - 5)  # the five newest stay open to re-emission
            ids = set(sealed.sealed_ids.tolist())
            done = {run for run in latest if hash(run) in ids}
        a, b = sealed.row(final=False, version=1, updated_at=2), whole.row(final=False, version=1, updated_at=2)
        assert a.pop("feedback_score") == pytest.approx(b.pop("feedback_score"))
        assert a == b
    assert len(sealed.sealed_ids) > 300 and len(sealed.positions) < 50


def test_a_restored_window_gives_the_rows_of_one_that_took_its_runs_one_by_one():
    """A restart puts a window's runs back in bulk (their facts in arrays, not a run at a time):
    its rows are those of a window that took the same runs one by one, through redeliveries,
    newer versions that replace a restored run, and the restored runs' seal."""
    from streams.detect.metrics import Window

    rng = np.random.default_rng(5)
    restored, whole = Window("bot", "v1", T0, T0 + 5 * MIN), Window("bot", "v1", T0, T0 + 5 * MIN)
    pages = [[_random_row(rng, f"r{int(rng.integers(100 * k, 100 * k + 110))}") for _ in range(90)] for k in range(3)]
    for page in pages:  # a run in two pages (or twice in one) is one run, at its newest version
        restored.restore(page)
        for row in page:
            whole.add(row)
    assert restored.restored_live > 100 > len(restored.positions), "put back in bulk, but for runs that came again"

    def same_rows() -> None:
        a, b = restored.row(final=False, version=1, updated_at=2), whole.row(final=False, version=1, updated_at=2)
        assert a.pop("cost_usd") == pytest.approx(b.pop("cost_usd"), rel=1e-12)
        assert a.pop("cost_per_success") == pytest.approx(b.pop("cost_per_success"), rel=1e-12)
        assert a.pop("feedback_score") == pytest.approx(b.pop("feedback_score"))
        assert a == b

    same_rows()
    replaced = 0
    for step in range(600):
        row = _random_row(rng, f"r{int(rng.integers(0, 330))}")  # restored runs again, and new ones
        before = restored.restored_live
        assert restored.add(row) == whole.add(row)
        replaced += restored.restored_live < before
        same_rows()
    assert replaced > 20, "newer versions replaced restored runs"
    restored.seal_restored()
    assert restored.restored_live == 0 and len(restored.restored_ids) == 0
    same_rows()
    for row in pages[0]:  # sealed: a redelivery, at any version, is not counted again
        assert not restored.add({**row, "version": row["version"] + 10}) or hash(row["run_id"]) in restored.positions
    assert restored.row(final=False, version=1, updated_at=2)["runs"] == whole.row(final=False, version=1, updated_at=2)["runs"]


def test_restored_runs_are_sealed_once_every_partition_is_past_where_they_were_emitted():
    """With the newest watermark landed when the runs were read, restored runs are sealed that
    far past it, not only past their newest window."""
    windows = MetricWindows(5 * MIN, 30 * MIN, 2, reemit_ms=4 * MIN)
    windows.restore(0, [[run_row("a", T0 + 1)]])
    windows.restore(0, [], emitted_by=T0 + 1 * MIN)
    (window,) = windows.windows.values()
    windows.apply([], 0, T0 + 5 * MIN, now_ms=1)
    windows.apply([], 1, T0 + 5 * MIN - 1, now_ms=1)
    assert window.restored_live == 1, "partition 1 may still bring a newer version"
    windows.apply([], 1, T0 + 5 * MIN, now_ms=2)
    assert window.restored_live == 0 and len(window.sealed_ids) == 1


def test_runs_are_sealed_once_their_partition_can_no_longer_re_emit_them():
    windows = MetricWindows(5 * MIN, 30 * MIN, 2, reemit_ms=4 * MIN)
    windows.apply([run_row("a", T0 + 1, cost=1.0)], 0, T0, now_ms=1)
    windows.apply([run_row("b", T0 + 2, cost=2.0)], 1, T0, now_ms=1)
    windows.apply([], 0, T0 + 4 * MIN - 1, now_ms=2)
    (window,) = windows.windows.values()
    assert len(window.sealed_ids) == 0, "partition 0 may still re-emit run a"
    (row,) = windows.apply([run_row("a", T0 + 1, cost=3.0, version=6)], 0, T0 + 4 * MIN, now_ms=3)
    assert row["cost_usd"] == 5.0 and len(window.sealed_ids) == 1, "a's newer version counted, then a sealed"
    assert windows.apply([run_row("a", T0 + 1, cost=3.0, version=6)], 0, T0 + 4 * MIN, now_ms=4) == []
    assert len(window.positions) == 1, "b waits for partition 1"
    (row,) = windows.apply([], 1, T0 + 4 * MIN, now_ms=5) or [window.row(final=False, version=0, updated_at=0)]
    assert len(window.sealed_ids) == 2 and row["runs"] == 2 and row["cost_usd"] == 5.0


def test_restored_runs_are_sealed_once_every_partition_is_past_the_newest_window():
    windows = MetricWindows(5 * MIN, 30 * MIN, 2, reemit_ms=4 * MIN)
    windows.restore(0, [[run_row("a", T0 + 1), run_row("b", T0 + 5 * MIN + 1)]])
    windows.restore(0, [[run_row("a", T0 + 1, version=6)]])  # a in a later page again, newer
    assert all(len(w.sealed_ids) == 0 for w in windows.windows.values())
    windows.apply([], 0, T0 + 14 * MIN, now_ms=1)
    assert all(len(w.sealed_ids) == 0 for w in windows.windows.values()), "partition 1 has not passed them"
    windows.apply([], 1, T0 + 14 * MIN, now_ms=2)
    assert [len(w.sealed_ids) for w in windows.windows.values()] == [1, 1]
    assert all(not w.positions and not w.restored_live for w in windows.windows.values()), "every restored run sealed"
    assert windows.apply([run_row("b", T0 + 5 * MIN + 1)], 1, T0 + 14 * MIN, now_ms=3) == [], "a redelivery"
