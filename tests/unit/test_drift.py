"""Tests of drift.py: the statistics, the detector's windows and alert life cycle on synthetic runs.
The quality bars on simulated fleets are in tests/evaluation/test_drift.py."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest

from streams.contracts.alerts import fingerprint
from streams.detect.drift import DriftDetector, benjamini_hochberg, chi2, design_effect, js, ks, psi, wasserstein
from jobs.simulate import DEFAULT_START_MS

MIN = 60_000
T0 = DEFAULT_START_MS
ROW_KEYS = {"agent_id", "agent_version", "window", "feature", "statistic", "value", "p_value", "threshold",
            "baseline", "significant"}
ALERT_KEYS = {"alert_id", "ts", "kind", "severity", "status", "fingerprint", "agent_id", "agent_version", "run_id",
              "summary", "evidence"}


# --- synthetic runs: fast, with exactly the shift asked for ------------------------------------------


def synthetic(rng, start, minutes, per_min=3.0, agent="a", version="v1", cost=1.0, success=0.85,
              tools=("search", "fetch", "answer"), new_tool=None):
    n = rng.poisson(per_min * minutes)
    ended = np.sort(rng.integers(start, start + minutes * MIN, n))
    runs = []
    for i, t in enumerate(ended):
        ok = rng.random() < success
        path = list(rng.choice(tools, size=rng.integers(1, 5)))
        if new_tool and rng.random() < 0.5:
            path.append(new_tool)
        calls = len(path)
        tokens = int(rng.lognormal(8, 0.4))
        runs.append({
            "run_id": f"{agent}-{version}-{start}-{i}", "agent_id": agent, "agent_version": version,
            "ended_at": int(t), "outcome": "success" if ok else rng.choice(["failure", "escalated"]),
            "cost_usd": cost * tokens * 2e-6, "input_tokens": tokens, "output_tokens": 100,
            "steps": 2 * calls + 1, "llm_calls": calls + 1, "tool_calls": calls,
            "tool_errors": int(rng.random() < 0.05), "duration_ms": int(rng.lognormal(9, 0.5)),
            "tool_path": path, "error_type": "" if ok else "not_found", "loop_detected": False,
        })
    return runs


def feed(det, runs, batch_ms=MIN):
    rows, alerts = [], []
    runs = sorted(runs, key=lambda r: r["ended_at"])
    batches: dict[int, list] = {}
    for r in runs:
        batches.setdefault(r["ended_at"] // batch_ms, []).append(r)
    for b in sorted(batches):
        out = det.update(batches[b])
        rows += out[0]
        alerts += out[1]
    out = det.flush()
    return rows + out[0], alerts + out[1]


# --- statistics -------------------------------------------------------------------------------


def test_numeric_statistics():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, 2000)
    same, moved = rng.normal(0, 1, 500), rng.normal(1.349, 1, 500)  # moved by one IQR
    assert ks(ref, same)[1] > 0.01 and ks(ref, moved)[1] < 1e-20
    assert wasserstein(ref, same) < 0.1 and wasserstein(ref, moved) == pytest.approx(1.0, abs=0.1)
    assert psi(ref, same) < 0.05 and psi(ref, moved) > 0.5
    # a mostly-zero feature: IQR 0 falls back to the std, quantile bins collapse without error
    zeros = np.r_[np.zeros(95), np.ones(5)]
    assert np.isfinite(wasserstein(zeros, np.ones(10))) and np.isfinite(psi(zeros, zeros))


def test_categorical_statistics():
    ref = {"a": 500, "b": 300, "c": 200}
    assert chi2(ref, {"a": 50, "b": 30, "c": 20})[1] > 0.9
    assert js(ref, {"a": 5, "b": 3, "c": 2}) == pytest.approx(0.0, abs=1e-9)
    assert js({"a": 1}, {"b": 1}) == pytest.approx(1.0)
    # unseen on either side: a new category is a shift; a vanished one too
    assert chi2(ref, {"a": 40, "b": 25, "c": 15, "new": 20})[1] < 1e-6
    assert chi2(ref, {"a": 70, "b": 30})[1] < 1e-4
    # small expected counts go to the exact-conditional Monte Carlo, whose floor is 1/(draws+1)
    rng = np.random.default_rng(0)
    _, p = chi2({"a": 300, "b": 2}, {"a": 20, "b": 10}, mc_draws=999, rng=rng)
    assert p == pytest.approx(1 / 1000)
    # clustered observations count less than independent ones
    assert chi2(ref, {"a": 40, "b": 40, "c": 20}, design_effect=4.0)[1] > chi2(ref, {"a": 40, "b": 40, "c": 20})[1]


def test_design_effect():
    rng = np.random.default_rng(1)
    independent = rng.multinomial(4, [0.5, 0.3, 0.2], size=400)
    assert design_effect(independent) == pytest.approx(1.0, abs=0.2)
    clustered = np.zeros((400, 3))
    clustered[np.arange(400), rng.integers(0, 3, 400)] = 4  # each run calls one tool 4 times
    assert design_effect(clustered) == pytest.approx(4.0, rel=0.15)


def test_benjamini_hochberg():
    rejected, cutoff = benjamini_hochberg([0.001, 0.008, 0.039, 0.041, 0.9], q=0.05)
    assert rejected.tolist() == [True, True, False, False, False] and cutoff == pytest.approx(0.02)
    rejected, cutoff = benjamini_hochberg([0.5, 0.6], q=0.05)
    assert not rejected.any() and cutoff == pytest.approx(0.025)


# --- detector mechanics ----------------------------------------------------------------------------


def test_init_only_stores_params():
    params = {"window_ms": 60_000, "alpha": 0.01, "persistence": 3, "baseline_version": {"a": "v1"}}
    det = DriftDetector(**params)
    for name in inspect.signature(DriftDetector).parameters:
        assert hasattr(det, name)
    assert {k: getattr(det, k) for k in params} == params
    assert not [k for k in vars(det) if k.endswith("_")]


def test_windows_are_tested_when_complete_or_flushed():
    rng = np.random.default_rng(2)
    det = DriftDetector()
    runs = synthetic(rng, T0, 60)  # reference
    rows, _ = det.update(runs)
    assert rows  # windows up to (newest - lateness) are complete
    assert max(r["window"] for r in rows) + det.window_ms <= max(r["ended_at"] for r in runs) - det.lateness_ms
    pending = det.flush()[0]
    assert pending and min(r["window"] for r in pending) > max(r["window"] for r in rows)
    assert det.update([dict(runs[0], run_id="late")]) == ([], []) and det.late_runs_ == 1
    for row in rows + pending:
        assert set(row) == ROW_KEYS
        assert row["statistic"] in {"ks", "wasserstein", "psi", "chi2", "js"}
        assert (row["p_value"] is None) == (row["statistic"] in {"wasserstein", "psi", "js"})
        assert "v1 trailing" in row["baseline"] and "n=" in row["baseline"]


def test_fires_once_then_resolves():
    rng = np.random.default_rng(3)
    runs = (synthetic(rng, T0, 90) + synthetic(rng, T0 + 90 * MIN, 40, cost=2.0)
            + synthetic(rng, T0 + 130 * MIN, 60))
    rows, alerts = feed(DriftDetector(), runs)
    assert [a["status"] for a in alerts] == ["firing", "resolved"]
    fire, resolve = alerts
    assert set(fire) == ALERT_KEYS and fire["kind"] == "drift"
    assert fire["fingerprint"] == resolve["fingerprint"] == fingerprint("drift", "a", "v1")
    assert fire["evidence"]["episode"] == resolve["evidence"]["episode"] == fire["evidence"]["window"]
    assert fire["severity"] == "critical" and "cost_usd +" in fire["summary"]
    assert T0 + 90 * MIN <= fire["evidence"]["window"] <= T0 + 105 * MIN
    assert T0 + 130 * MIN <= resolve["evidence"]["window"] <= T0 + 150 * MIN
    ev = fire["evidence"]
    assert ev["n_current"] >= 30 and ev["n_reference"] >= 100 and ev["features"][0]["feature"] in {
        "cost_usd", "total_tokens"}
    assert {"value", "p_value", "threshold"} <= set(ev["features"][0]["ks"])
    # persistence: the drifted pool spans >= 2 windows and each of its halves moved on its own
    for finding in ev["persistent"]:
        early, late = finding["halves"]
        assert finding["windows"] >= 2 and early["shifted"] and late["shifted"]
        assert next(iter(finding["halves_differ"].values()))["p_value"] > 0.001
        assert max(early["windows"]) < min(late["windows"])
        assert early["n_current"] + late["n_current"] == finding["n_current"]


def test_single_window_blip_does_not_alert():
    rng = np.random.default_rng(4)
    runs = synthetic(rng, T0, 90) + synthetic(rng, T0 + 90 * MIN, 5, cost=3.0) + synthetic(rng, T0 + 95 * MIN, 60)
    rows, alerts = feed(DriftDetector(min_samples=15), runs)
    assert alerts == []
    # the bad window is seen: a pool holding it drifted, but its halves differ (only one moved)
    tests = [r for r in rows if r["p_value"] is not None]
    assert any(r["significant"] for r in tests if "." not in r["feature"])
    halves = [r for r in tests if r["feature"].endswith((".early", ".late"))]
    assert True in {r["significant"] for r in halves}
    assert all(r["significant"] for r in tests if r["feature"].endswith(".between"))


def test_new_tool_and_success_drop():
    rng = np.random.default_rng(5)
    base = synthetic(rng, T0, 90, agent="b")
    _, alerts = feed(DriftDetector(), base + synthetic(rng, T0 + 90 * MIN, 30, agent="b", new_tool="delete_db"))
    assert "tool_mix delete_db 0%->" in alerts[0]["summary"]
    rng = np.random.default_rng(6)
    base = synthetic(rng, T0, 90, agent="c")
    _, alerts = feed(DriftDetector(), base + synthetic(rng, T0 + 90 * MIN, 30, agent="c", success=0.5))
    assert {"success", "outcome"} & {m["feature"] for m in alerts[0]["evidence"]["features"]}


def test_effect_floor_silences_tiny_shifts_on_huge_samples():
    rng = np.random.default_rng(7)
    runs = synthetic(rng, T0, 60, per_min=400) + synthetic(rng, T0 + 60 * MIN, 30, per_min=400, cost=1.04)
    rows, alerts = feed(DriftDetector(reference_windows=6), runs)
    cost_ks = [r for r in rows if r["feature"] == "cost_usd" and r["statistic"] == "ks"
               and r["window"] >= T0 + 65 * MIN]
    assert min(r["p_value"] for r in cost_ks) < 1e-4  # the shift is real and detectable...
    assert alerts == [] and not any(r["significant"] for r in rows)  # ...but below every floor


def test_canary_is_compared_with_the_stable_version():
    rng = np.random.default_rng(8)
    stable = synthetic(rng, T0, 120, version="v1")
    good = synthetic(rng, T0 + 60 * MIN, 60, per_min=1.5, version="v2")
    bad = synthetic(rng, T0 + 60 * MIN, 60, per_min=1.5, version="v3", cost=2.0)
    rows, alerts = feed(DriftDetector(baseline_version={"a": "v1"}), stable + good + bad)
    assert [(a["agent_version"], a["status"]) for a in alerts] == [("v3", "firing")]
    assert all(r["baseline"].startswith("v1 stable") for r in rows if r["agent_version"] != "v1")


def test_a_lasting_shift_becomes_the_new_normal():
    rng = np.random.default_rng(9)
    runs = synthetic(rng, T0, 60) + synthetic(rng, T0 + 60 * MIN, 120, cost=2.0)
    rows, alerts = feed(DriftDetector(max_reference_age_ms=45 * MIN, reference_windows=9), runs)
    assert [a["status"] for a in alerts] == ["firing", "resolved"]
    assert "rebaselined" in alerts[1]["evidence"]["reference"]


def test_fast_statistics_equal_scipys():
    from scipy import stats

    from streams.detect.drift import _chi2_homogeneity, _emd

    rng = np.random.default_rng(11)
    for _ in range(50):
        u, v = rng.lognormal(0, 1, rng.integers(2, 300)), rng.lognormal(0.2, 1.2, rng.integers(2, 60))
        assert _emd(u, v) == pytest.approx(stats.wasserstein_distance(u, v), rel=1e-9, abs=1e-12)
        table = rng.integers(1, 200, size=(2, rng.integers(2, 8))).astype(float)
        stat, p, expected = _chi2_homogeneity(table)
        ref = stats.chi2_contingency(table, correction=False)
        assert (stat, p) == pytest.approx((ref[0], ref[1]), rel=1e-9) and np.allclose(expected, ref[3])
    ties = np.array([1.0, 1.0, 2.0, 2.0, 2.0])
    assert _emd(ties, np.array([2.0, 3.0])) == pytest.approx(stats.wasserstein_distance(ties, [2.0, 3.0]))


def _samples(rng, n1: int, n2: int) -> tuple[np.ndarray, np.ndarray]:
    """Two samples, half the time with many ties (small integers, as steps and tool error rates are)."""
    if rng.random() < 0.5:
        levels = int(rng.integers(1, 12))
        return (rng.integers(0, levels, n1).astype(float),
                rng.integers(0, levels, n2).astype(float) + rng.integers(0, 2))
    return rng.lognormal(0, 1, n1), rng.lognormal(rng.normal(0, 0.4), rng.uniform(0.5, 1.5), n2)


def test_the_exact_ks_attempt_is_scipys_bit_for_bit():
    """Same (exact, d, p) as scipy's, the one-sided path counts included (done in numpy there),
    where it overflows and falls back, and where C(n1 + n2, n1) is too large to try."""
    import math

    from scipy.stats._stats_py import _attempt_exact_2kssamp

    from streams.detect.drift import _exact_ks

    rng = np.random.default_rng(11)
    for _ in range(150):
        n1, n2 = (int(n) for n in rng.integers(1, 320, 2))
        side = ("greater", "less", "two-sided")[int(rng.integers(0, 3))]
        d = float(rng.uniform(0, 0.6))
        want = _attempt_exact_2kssamp(n1, n2, math.gcd(n1, n2), d, side)
        got = _exact_ks(n1, n2, math.gcd(n1, n2), d, side)
        assert got[:2] == want[:2] and (got[2] == want[2] or np.isnan(got[2]) and np.isnan(want[2])), (n1, n2, d, side)
    # too many paths to count: scipy counts, then falls back; here it falls back at once
    want = _attempt_exact_2kssamp(3000, 310, 10, 0.1, "less")
    assert want[0] is False and _exact_ks(3000, 310, 10, 0.1, "less")[:2] == (False, want[1])


def test_ks_equals_scipys_ks_2samp():
    """Exact p-values where scipy's "auto" is exact (either sample up to 10,000; equal sizes
    too), its asymptotic ones above that and where the exact computation fails, both sides."""
    from scipy import stats

    from streams.detect.drift import ks_sorted

    def check(a, b, side):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            want = stats.ks_2samp(a, b, alternative=side or "two-sided")
        got = ks(a, b, side)
        assert got == pytest.approx((want.statistic, want.pvalue), rel=1e-12, abs=0), (len(a), len(b), side)
        assert ks_sorted(np.sort(a), np.sort(b), side) == got
        return bool(caught)  # scipy fell back from exact to asymptotic

    rng = np.random.default_rng(5)
    sizes = (1, 2, 3, 7, 10, 30, 64, 100, 257, 600, 4000)
    for i in range(400):
        n1, n2 = int(rng.choice(sizes)), int(rng.choice(sizes))
        if i % 10 == 0:
            n2 = n1
        if n1 * n2 > 100_000 and i % 8:
            continue  # the largest exact ones take milliseconds each: a few suffice
        a, b = _samples(rng, n1, n2)
        for side in (None, "greater", "less"):
            check(a, b, side)
    fell_back = []
    for n1, n2, shift in ((3000, 300, 0.3), (10_001, 50, 0.5), (10_001, 20_000, 0.0)):
        a, b = rng.lognormal(0, 1, n1), rng.lognormal(shift, 1, n2)
        fell_back += [check(a, b, side) for side in (None, "greater", "less")]
    assert any(fell_back)  # the exact one-sided distribution overflows at these sizes


def test_tool_counts_are_each_runs_calls_in_order():
    """The design effect's matrix (runs x tools, built from each window's cached calls) is the
    one counted call by call."""
    from streams.detect.drift import PACKED, RunFeatures, _tool_counts, _tool_design_effect, _Window

    rng = np.random.default_rng(3)
    names = ["search", "fetch", "answer", "lookup", "refund", "z"]
    windows = []
    for w in range(6):
        window = _Window(w)
        for i in range(int(rng.integers(0, 40))):
            tools = tuple(rng.choice(names[: 2 + w % 4], size=rng.integers(0, 6)))
            window.add(f"{w}-{i}", RunFeatures(0, PACKED.pack(*(0.0,) * 5), tools, "success", "none"))
        windows.append(window)
    tools = sorted({t for w in windows for r in w.runs.values() for t in r.tools})
    runs = [r for w in windows for r in w.runs.values()]
    want = np.zeros((len(runs), len(tools)))
    for i, run in enumerate(runs):
        for t in run.tools:
            want[i, tools.index(t)] += 1
    got = _tool_counts(windows, tools)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert _tool_design_effect(windows, tools) == design_effect(want)
    assert _tool_counts([], tools).shape == (0, len(tools))


def test_ks_and_emd_of_one_pass_are_each_ones_own():
    from streams.detect.drift import _emd, _ks_emd

    rng = np.random.default_rng(12)
    for _ in range(300):
        a, b = _samples(rng, int(rng.integers(1, 400)), int(rng.integers(1, 80)))
        for side in (None, "greater", "less"):
            d, p, emd = _ks_emd(np.sort(a), np.sort(b), side)
            assert (d, p) == ks(a, b, side) and emd == _emd(a, b)


def test_monte_carlo_chi2_counts_each_distinct_draw_as_often_as_drawn(monkeypatch):
    """The Monte Carlo p-value's count of draws at least as extreme, the statistic computed once
    per distinct draw, is the count over every draw: the same chi2 p-values, same random draws."""
    from collections import Counter

    from streams.detect import drift

    calls = []

    def counted(statistic, draws, colors, bar):
        calls.append(float(np.prod(colors + 1.0)) >= 2.0 ** 62)
        return distinct(statistic, draws, colors, bar)

    def every_draw(statistic, draws, colors, bar):
        return int(np.count_nonzero(statistic(draws) >= bar))

    distinct = drift._count_at_least
    monkeypatch.setattr(drift, "_count_at_least", counted)
    rng = np.random.default_rng(2)
    cases = []
    for i in range(120):
        k = int(rng.integers(2, 9))
        ref = Counter({f"c{j}": int(rng.integers(0, 400 if j < 2 else 12)) for j in range(k)})
        cur = Counter({f"c{j}": int(rng.integers(0, 60 if j < 2 else 6)) for j in range(k + int(rng.integers(0, 2)))})
        cases.append((ref, cur, float(rng.choice([1.0, 1.7, 3.3]))))
    # 12 categories of ~530 runs and a rare one: ~531 ** 12 tables, more than int64 codes
    cases.append((Counter({**{f"c{j}": 500 for j in range(12)}, "z": 1}),
                  Counter({**{f"c{j}": 30 for j in range(12)}, "c0": 80}), 1.0))
    for ref, cur, deff in cases:
        got = drift.chi2(ref, cur, design_effect=deff, mc_draws=3_000, mc_below=0.5, rng=np.random.default_rng(7))
        with monkeypatch.context() as m:
            m.setattr(drift, "_count_at_least", every_draw)
            want = drift.chi2(ref, cur, design_effect=deff, mc_draws=3_000, mc_below=0.5,
                              rng=np.random.default_rng(7))
        assert got == want
    assert len(calls) > 20 and calls[-1]  # the Monte Carlo branch, and codes that would overflow


# --- governance: the guardrail feature -------------------------------------------------------------


def with_guardrails(rng, runs, blocked=0.02, warned=0.05, allowed=0.3):
    """The runs with policy hits: the most severe decision `blocked`, `warned` or `allowed` in
    those shares of them (an allowed hit besides a blocked one, as a run meets several policies)."""
    for run in runs:
        draw = rng.random()
        hits = {"tool:refund:allowed": 1} if rng.random() < 0.5 else {}
        if draw < blocked:
            hits["pii:blocked"] = 1
        elif draw < blocked + warned:
            hits["tone:warned"] = 2
        elif draw < blocked + warned + allowed:
            hits["pii:allowed"] = 1
        run["policy_hits"] = hits
    return runs


def test_a_shifted_guardrail_mix_drifts_on_guardrail():
    rng = np.random.default_rng(31)
    runs = (with_guardrails(rng, synthetic(rng, T0, 90, per_min=10), blocked=0.02)
            + with_guardrails(rng, synthetic(rng, T0 + 90 * MIN, 40, per_min=10), blocked=0.15))
    rows, alerts = feed(DriftDetector(), runs)
    assert [a["status"] for a in alerts] == ["firing"]
    moved = {m["feature"]: m for m in alerts[0]["evidence"]["persistent"]}
    assert set(moved) == {"guardrail"}, alerts[0]["summary"]
    change = moved["guardrail"]["change"]
    assert change["category"] == "blocked" and change["reference_share"] < 0.05 < 0.1 < change["current_share"]
    assert "guardrail blocked " in alerts[0]["summary"]
    assert T0 + 90 * MIN <= alerts[0]["evidence"]["window"] <= T0 + 105 * MIN
    assert {r["feature"] for r in rows if r["window"] < T0 + 90 * MIN and r["p_value"] is not None} >= {
        "guardrail", "guardrail@short", "guardrail@mid"}  # tested all along


def test_guardrails_that_go_quiet_drift_on_guardrail():
    """The pool without a policy hit, its reference with them: still tested (a guardrail that
    stopped reporting is a change too)."""
    rng = np.random.default_rng(34)
    runs = with_guardrails(rng, synthetic(rng, T0, 90, per_min=10)) + synthetic(rng, T0 + 90 * MIN, 40, per_min=10)
    _, alerts = feed(DriftDetector(), runs)
    assert [a["status"] for a in alerts] == ["firing"]
    moved = {m["feature"]: m["change"] for m in alerts[0]["evidence"]["persistent"]}
    assert moved["guardrail"]["category"] == "none" and moved["guardrail"]["current_share"] == 1.0


def test_a_steady_guardrail_mix_or_none_at_all_does_not_drift_on_guardrail():
    rng = np.random.default_rng(32)
    steady = with_guardrails(rng, synthetic(rng, T0, 180), blocked=0.05)
    rows, alerts = feed(DriftDetector(), steady)
    assert alerts == [] and any(r["feature"] == "guardrail" for r in rows)
    assert not any(r["significant"] for r in rows if r["feature"].startswith("guardrail"))
    # runs without governance fields, or with no hits: no guardrail test, and every other number
    # as before the feature existed (the same tests in the FDR, the same Monte Carlo draws)
    rng = np.random.default_rng(33)
    older = synthetic(rng, T0, 90) + synthetic(rng, T0 + 90 * MIN, 40, success=0.5)
    rows, alerts = feed(DriftDetector(), older)
    assert alerts and not any(r["feature"].startswith("guardrail") for r in rows)
    assert "guardrail" not in {m["feature"] for a in alerts for m in a["evidence"]["features"]}
    empty = [dict(r, policy_hits={} if i % 2 else None) for i, r in enumerate(older)]
    assert feed(DriftDetector(), empty) == (rows, alerts)


def test_run_features_share_one_copy_of_each_guardrail_decision():
    from streams.detect.drift import run_features

    a = run_features({"policy_hits": {"pii:" + "blocked": 1}})  # built at run time: another str object
    b = run_features({"policy_hits": {"tool:refund:blocked": 3, "pii:warned": 1}})
    assert a.guardrail == b.guardrail == "blocked" and a.guardrail is b.guardrail
    assert run_features({}).guardrail == "none"
