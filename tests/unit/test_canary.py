"""Tests of canary.py: the mixture SPRT and its validity under continuous monitoring, the variance
estimators against simulation, the policy, and CanaryAnalysis on synthetic runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import integrate, stats

from streams.detect.canary import (DEFAULT_MARGINS, METRICS, CanaryAnalysis, CanaryPolicy, confidence_radius,
                            log_mixture_lr, log_ratio_variance, mixture_p_value, proportion_variance, quantile,
                            ratio_variance)


# --- the mixture SPRT -------------------------------------------------------------------------------


@pytest.mark.parametrize("excess, variance, tau2", [(0.1, 0.01, 0.01), (0.05, 0.001, 0.04), (-0.02, 0.004, 0.0025),
                                                    (0.3, 0.02, 0.09), (0.0, 0.5, 0.01)])
def test_log_mixture_lr_is_the_half_normal_mixture_of_normal_likelihood_ratios(excess, variance, tau2):
    def integrand(u):
        return math.exp(u * excess / variance - u * u / (2 * variance)) * 2 * stats.norm.pdf(u, scale=math.sqrt(tau2))

    numeric, _ = integrate.quad(integrand, 0, np.inf)
    assert log_mixture_lr(excess, variance, tau2) == pytest.approx(math.log(numeric), abs=1e-7)


def test_p_value_is_one_without_excess_and_falls_as_evidence_grows():
    assert mixture_p_value(0.0, 0.01, 0.01) == 1.0
    assert mixture_p_value(-0.3, 0.01, 0.01) == 1.0
    ps = [mixture_p_value(d, 0.01, 0.04) for d in (0.1, 0.2, 0.3, 0.4, 0.5)]
    assert ps == sorted(ps, reverse=True) and ps[-1] < 1e-3


@pytest.mark.parametrize("variance, tau2, alpha", [(1e-4, 0.01, 0.002), (0.01, 0.01, 0.05), (0.5, 0.0025, 0.01),
                                                   (1e-6, 0.09, 0.002)])
def test_confidence_radius_is_where_the_mixture_reaches_one_over_alpha(variance, tau2, alpha):
    r = confidence_radius(variance, tau2, alpha)
    assert log_mixture_lr(r, variance, tau2) == pytest.approx(-math.log(alpha), abs=1e-8)
    assert confidence_radius(variance / 4, tau2, alpha) < r  # more information, a tighter bound


def _monitored_rejections(drift: float, paths: int, looks: int, alpha: float, tau2: float, rng) -> tuple[float, float]:
    """Share of Gaussian random walks (unit variance steps, mean `drift` beyond the margin)
    rejected at any of `looks` looks: by the mixture p-value, and by a naive fixed-n z test."""
    steps = rng.normal(drift, 1.0, size=(paths, looks))
    means = np.cumsum(steps, axis=1) / np.arange(1, looks + 1)
    mixture = naive = 0
    z_crit = stats.norm.ppf(1 - alpha)
    for path in means:
        variances = 1.0 / np.arange(1, looks + 1)
        mixture += any(mixture_p_value(m, v, tau2) <= alpha for m, v in zip(path, variances))
        naive += bool(np.any(path / np.sqrt(variances) >= z_crit))
    return mixture / paths, naive / paths


def test_always_valid_under_continuous_monitoring_where_a_fixed_n_test_is_not():
    rng = np.random.default_rng(3)
    alpha, paths = 0.05, 2000
    mixture, naive = _monitored_rejections(0.0, paths, 200, alpha, 0.25, rng)
    assert mixture <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / paths)
    assert naive > 3 * alpha  # peeking at a fixed-n test 200 times
    power, _ = _monitored_rejections(0.5, 300, 200, alpha, 0.25, rng)
    assert power > 0.95


# --- estimators ---------------------------------------------------------------------------------------


def test_proportion_variance_never_claims_certainty():
    assert proportion_variance(0, 20) > 0 and proportion_variance(20, 20) > 0
    assert proportion_variance(50, 100) == pytest.approx(51 / 102 * 51 / 102 / 100)


def test_quantile_is_numpys_linear_quantile():
    rng = np.random.default_rng(1)
    for n in (1, 2, 19, 20, 21, 333):
        values = sorted(rng.integers(0, 10_000, n).tolist())
        assert quantile(values, 0.95) == pytest.approx(np.quantile(values, 0.95))


def test_log_ratio_variance_matches_the_spread_of_log_cost_per_success():
    rng = np.random.default_rng(5)
    reps, n = 3000, 200
    success = (rng.random((reps, n)) < 0.8).astype(float)
    cost = rng.lognormal(-7, 0.6, (reps, n)) * (1 + 0.5 * success)  # successful runs cost more
    logs = np.log(cost.sum(1) / success.sum(1))
    estimates = [log_ratio_variance(n, c.sum(), (c * c).sum(), y.sum(), (c * y).sum(), y.sum())
                 for c, y in zip(cost, success)]
    assert np.mean(estimates) == pytest.approx(np.var(logs), rel=0.1)


def test_ratio_variance_is_clustered_by_run_not_binomial():
    rng = np.random.default_rng(7)
    reps, n = 3000, 200
    calls = rng.integers(1, 7, (reps, n))
    flaky = rng.beta(0.5, 6.0, (reps, n))  # a run's own error propensity: errors cluster in runs
    errors = rng.binomial(calls, flaky)
    ratios = errors.sum(1) / calls.sum(1)
    estimates = [ratio_variance(n, e.sum(), (e * e).sum(), t.sum(), (e * t).sum(), (t * t).sum())
                 for e, t in zip(errors, calls)]
    binomial = np.mean([r * (1 - r) / t.sum() for r, t in zip(ratios, calls)])
    assert np.mean(estimates) == pytest.approx(np.var(ratios), rel=0.1)
    assert binomial < 0.7 * np.var(ratios)


def test_ratio_variance_of_an_arm_without_errors_is_floored():
    calls = np.full(30, 3)
    assert ratio_variance(30, 0, 0, calls.sum(), 0, (calls * calls).sum()) == proportion_variance(0, 90)


# --- policy --------------------------------------------------------------------------------------------


def test_policy_defaults_and_partial_mappings_merge():
    default = CanaryPolicy()
    assert dict(default.margins) == dict(DEFAULT_MARGINS) and default.rollback_on == METRICS
    assert default.metric_alpha == pytest.approx(default.alpha / len(METRICS))
    policy = CanaryPolicy.from_mapping({"min_runs": 30, "margins": {"success_rate": 0.05},
                                        "rollback_on": ["cost_per_success", "success_rate"]})
    assert policy.min_runs == 30 and policy.max_runs == default.max_runs
    assert policy.margins["success_rate"] == 0.05 and policy.margins["loop_rate"] == DEFAULT_MARGINS["loop_rate"]
    assert policy.rollback_on == ("success_rate", "cost_per_success")
    assert policy.metric_alpha == pytest.approx(policy.alpha / 2)


@pytest.mark.parametrize("data, words", [
    ({"min_run": 20}, "min_run"),
    ({"margins": {"latency": 0.1}}, "latency"),
    ({"tau": {"success_rate": 0}}, "tau"),
    ({"rollback_on": ["success_rate", "vibes"]}, "rollback_on"),
    ({"rollback_on": []}, "rollback_on"),
    ({"alpha": 1.5}, "alpha"),
    ({"min_runs": 300}, "promote_after"),
    ({"max_runs": "many"}, "max_runs"),
    ({"margins": {"success_rate": -0.01}}, "margins"),
    ({"margins": 0.03}, "margins"),
    ({"min_escalations": 1}, "min_escalations"),
    ({"min_escalations": 2.5}, "min_escalations"),
])
def test_policy_rejects_what_it_does_not_know_with_a_clear_message(data, words):
    with pytest.raises(ValueError, match=words):
        CanaryPolicy.from_mapping(data)


# --- the analysis on synthetic runs ----------------------------------------------------------------------


def synthetic_runs(rng, n, prefix, success=0.85, cost=1.0, loop=0.03, tool_error=0.05, slower=1.0):
    runs = []
    for i in range(n):
        ok = rng.random() < success
        calls = int(rng.integers(1, 6))
        runs.append({
            "run_id": f"{prefix}-{i}-{rng.integers(1 << 62)}",
            "outcome": "success" if ok else rng.choice(["failure", "escalated"]),
            "cost_usd": cost * rng.lognormal(-7, 0.4) * (1.3 if ok else 1.0), "loop_detected": rng.random() < loop,
            "tool_calls": calls, "tool_errors": int(rng.binomial(calls, tool_error)), "steps": 2 * calls + 1,
            "duration_ms": int(slower * rng.lognormal(8.4, 0.4)), "ended_at": 1_793_491_200_000 + i,
        })
    return runs


def replay(analysis, rng, batches, stable_per_batch=7, canary_per_batch=3, **canary):
    """Batches of fresh stable and canary runs, decide() after each; the verdicts."""
    verdicts = []
    for b in range(batches):
        analysis.add("stable", synthetic_runs(rng, stable_per_batch, f"s{b}"))
        analysis.add("canary", synthetic_runs(rng, canary_per_batch, f"c{b}", **canary))
        verdicts.append(analysis.decide())
    return verdicts


def test_no_verdict_before_min_runs_even_for_a_hopeless_canary():
    rng = np.random.default_rng(11)
    analysis = CanaryAnalysis(CanaryPolicy(min_runs=20))
    verdicts = replay(analysis, rng, 6, success=0.0)
    assert [v.decision for v in verdicts] == ["pending"] * 6  # 18 canary runs
    assert verdicts[-1].canary_runs == 18 and "no verdict before 20" in verdicts[-1].reason
    assert all(m.p_value is None for m in verdicts[-1].metrics)
    assert replay(analysis, rng, 1, success=0.0)[0].decision == "rollback"


def test_a_success_drop_is_rolled_back_and_the_verdict_sticks():
    rng = np.random.default_rng(12)
    analysis = CanaryAnalysis()
    verdicts = replay(analysis, rng, 60, success=0.5)
    rollback = next(v for v in verdicts if v.decision != "pending")
    assert rollback.decision == "rollback" and rollback.reason.startswith("success_rate")
    assert f"after {rollback.canary_runs} canary runs" in rollback.reason
    assert rollback.canary_runs <= 120
    worst = next(m for m in rollback.metrics if m.metric == "success_rate")
    assert worst.worse and worst.p_value <= worst.threshold and worst.difference < -0.2
    analysis.add("canary", synthetic_runs(rng, 500, "late"))  # a recovery later changes nothing
    assert analysis.decide() is rollback


@pytest.mark.parametrize("canary, metric", [({"cost": 2.0}, "cost_per_success"), ({"loop": 0.25}, "loop_rate"),
                                            ({"tool_error": 0.25}, "tool_error_rate"),
                                            ({"slower": 1.8}, "p95_duration")])
def test_each_metric_rolls_back_its_own_degradation(canary, metric):
    rng = np.random.default_rng(13)
    verdicts = replay(CanaryAnalysis(), rng, 100, **canary)
    final = next(v for v in verdicts if v.decision != "pending")
    assert final.decision == "rollback" and final.reason.startswith(metric), final.reason


def _slowdown_rollbacks(slower: float, reps: int, rng) -> float:
    """Share of canaries `slower` x stable in duration (nothing else differs) rolled back on
    p95_duration at α = 0.05 within 120 canary runs, where the stable p95 is still noisy."""
    policy = CanaryPolicy(alpha=0.05, rollback_on=("p95_duration",))
    rolled = 0
    for rep in range(reps):
        analysis = CanaryAnalysis(policy)
        for b in range(40):
            for arm, n, factor in (("stable", 7, 1.0), ("canary", 3, slower)):
                durations = factor * rng.lognormal(8.4, 0.4, n)
                analysis.add(arm, [{"run_id": f"{rep}-{b}-{arm}-{i}", "outcome": "success", "duration_ms": int(d)}
                                   for i, d in enumerate(durations)])
            if analysis.decide().decision == "rollback":
                rolled += 1
                break
    return rolled / reps


def test_the_p95_test_holds_its_level_at_the_margin_and_catches_a_real_slowdown():
    rng = np.random.default_rng(20)
    assert _slowdown_rollbacks(1.2, 150, rng) <= 0.05  # exactly the +20% margin: the null's boundary
    assert _slowdown_rollbacks(2.0, 50, rng) >= 0.9


def test_a_canary_like_stable_is_never_rolled_back_and_promoted_at_max_runs():
    rng = np.random.default_rng(14)
    analysis = CanaryAnalysis(CanaryPolicy(promote_after=100, max_runs=300))
    verdicts = replay(analysis, rng, 110)
    decided = next(v for v in verdicts if v.decision != "pending")
    assert decided.decision == "promote" and decided.canary_runs == 300 and "max_runs" in decided.reason
    p = [next(m.p_value for m in v.metrics if m.metric == "success_rate") for v in verdicts[7:100]]
    assert p == sorted(p, reverse=True)  # the always-valid p-value is a running minimum


def test_a_canary_shown_no_worse_is_promoted_on_evidence():
    rng = np.random.default_rng(15)
    margins = {"success_rate": 0.15, "cost_per_success": 0.5, "loop_rate": 0.1, "tool_error_rate": 0.1,
               "p95_duration": 0.5, "escalation_steps": 1.0}
    analysis = CanaryAnalysis(CanaryPolicy(promote_after=60, max_runs=3000, margins=margins))
    verdicts = replay(analysis, rng, 400)
    decided = next(v for v in verdicts if v.decision != "pending")
    assert decided.decision == "promote" and "no worse than stable" in decided.reason
    assert decided.canary_runs < 3000
    assert all(m.upper_excess < 0 for m in decided.metrics)


def test_a_metric_outside_rollback_on_is_reported_but_never_rolls_back():
    rng = np.random.default_rng(16)
    policy = CanaryPolicy(rollback_on=("success_rate",), promote_after=50, max_runs=150)
    verdicts = replay(CanaryAnalysis(policy), rng, 60, cost=3.0)
    assert not any(v.decision == "rollback" for v in verdicts)
    cost = next(m for m in verdicts[-1].metrics if m.metric == "cost_per_success")
    assert cost.worse and cost.difference > 1.5
    assert cost.threshold == pytest.approx(policy.alpha)


def test_cost_per_success_waits_for_enough_successes():
    rng = np.random.default_rng(17)
    analysis = CanaryAnalysis(CanaryPolicy(min_successes=10, rollback_on=("cost_per_success",)))
    analysis.add("stable", synthetic_runs(rng, 100, "s"))
    canary = synthetic_runs(rng, 40, "c")
    for i, run in enumerate(canary):
        run["outcome"] = "success" if i < 9 else "failure"
    analysis.add("canary", canary)
    cost = next(m for m in analysis.decide().metrics if m.metric == "cost_per_success")
    assert cost.canary is not None and cost.p_value is None and cost.statistic is None
    analysis.add("canary", [dict(canary[9], outcome="success")])  # the 10th success, by a corrected row
    cost = next(m for m in analysis.decide().metrics if m.metric == "cost_per_success")
    assert cost.n_canary == 40 and cost.p_value is not None


def same_verdict(a, b) -> bool:
    """Equal up to the rounding of sums that had a row taken out and put back."""
    da, db = a.as_dict(), b.as_dict()
    ma, mb = da.pop("metrics"), db.pop("metrics")
    return da == db and all(x.keys() == y.keys() and all(
        x[k] == y[k] or (isinstance(x[k], float) and x[k] == pytest.approx(y[k], rel=1e-9, abs=1e-12)) for k in x)
        for x, y in zip(ma, mb))


def test_redelivered_runs_count_once_and_a_later_row_replaces_the_earlier():
    rng = np.random.default_rng(18)
    stable, canary = synthetic_runs(rng, 60, "s"), synthetic_runs(rng, 30, "c")
    once, twice = CanaryAnalysis(), CanaryAnalysis()
    once.add("stable", stable)
    once.add("canary", canary)
    for _ in range(2):
        twice.add("stable", stable)
        twice.add("canary", canary)
    assert twice.decide().as_dict() == once.decide().as_dict()

    fixed = CanaryAnalysis()
    fixed.add("stable", stable)
    fixed.add("canary", [dict(r, outcome="failure", cost_usd=1e9, duration_ms=99_999) for r in canary])
    fixed.add("canary", canary)  # the corrected rows
    assert same_verdict(fixed.decide(), once.decide())

    escalated = CanaryAnalysis()  # a row first closed as a late escalation, then corrected
    escalated.add("stable", stable)
    escalated.add("canary", [dict(r, outcome="escalated", steps=99) for r in canary])
    escalated.add("canary", canary)
    assert same_verdict(escalated.decide(), once.decide())

    moved = CanaryAnalysis()
    moved.add("canary", stable[:10])  # first attributed to the wrong arm
    moved.add("stable", stable)
    moved.add("canary", canary)
    assert same_verdict(moved.decide(), once.decide())


def test_verdicts_serialize_to_json_with_every_metric():
    rng = np.random.default_rng(19)
    verdict = replay(CanaryAnalysis(), rng, 10)[-1]
    data = json.loads(json.dumps(verdict.as_dict()))
    assert data["decision"] == "pending" and data["canary_runs"] == 30 and data["stable_runs"] == 70
    assert [m["metric"] for m in data["metrics"]] == list(METRICS)
    assert {"metric", "stable", "canary", "n_stable", "n_canary", "difference", "statistic", "p_value", "threshold",
            "worse"} <= set(data["metrics"][0])


def test_bad_input_is_refused():
    analysis = CanaryAnalysis()
    with pytest.raises(ValueError, match="arm"):
        analysis.add("baseline", [])
    with pytest.raises(ValueError, match="run_id"):
        analysis.add("stable", [{"outcome": "success", "duration_ms": 5}])
    with pytest.raises(ValueError, match="outcome"):
        analysis.add("stable", [{"run_id": "r1", "duration_ms": 5}])


# --- governance: guardrails, denied approvals, late escalations --------------------------------------------


def governed_runs(rng, n, prefix, guardrail=0.05, denied=0.03, escalated=0.10, later=1.0, governed=True):
    """Runs whose success, cost, loops, tool errors and durations are those of stable, with SPEC §4
    governance fields: a guardrail acts (warns, redacts or blocks) in `guardrail` of them, and a
    third of the runs have a hit it allowed, which must not count; an approval is denied in
    `denied` of them; `escalated` of them escalate, after `later` x stable's steps. Without
    `governed` the rows have none of the governance fields (rows from before they existed)."""
    runs = []
    for i in range(n):
        draw = rng.random()
        outcome = "success" if draw < 0.8 else "escalated" if draw < 0.8 + escalated else "failure"
        calls = int(rng.integers(1, 6))
        steps = int(rng.integers(2, 10))
        run = {"run_id": f"{prefix}-{i}-{rng.integers(1 << 62)}", "outcome": outcome,
               "cost_usd": rng.lognormal(-7, 0.4), "loop_detected": rng.random() < 0.03, "tool_calls": calls,
               "tool_errors": int(rng.binomial(calls, 0.05)), "duration_ms": int(rng.lognormal(8.4, 0.4)),
               "steps": round(later * steps) if outcome == "escalated" else steps}
        hits = {}
        if rng.random() < 1 / 3:
            hits["tool:refund:allowed"] = int(rng.integers(1, 3))  # policy names may hold ':'
        if rng.random() < guardrail:
            hits[f"pii:{rng.choice(['warned', 'redacted', 'blocked'])}"] = 1
        asked = rng.random() < 0.4
        no = rng.random() < denied
        if governed:
            run.update(policy_hits=hits, approvals_requested=int(asked or no), approvals_granted=int(asked and not no),
                       approvals_denied=int(no), approvals_expired=0, approval_waits_ms=[1500.0] if asked else [],
                       feedback_count=0, feedback_score=None)
        runs.append(run)
    return runs


def governed_replay(seed, batches, policy=None, stable=None, canary=None):
    """decide() after each batch of 7 stable and 3 canary governed runs; the first verdict that is
    not pending, or the last one."""
    rng = np.random.default_rng(seed)
    analysis = CanaryAnalysis(policy)
    for b in range(batches):
        analysis.add("stable", governed_runs(rng, 7, f"s{b}", **(stable or {})))
        analysis.add("canary", governed_runs(rng, 3, f"c{b}", **(canary or {})))
        verdict = analysis.decide()
        if verdict.decision != "pending":
            break
    return verdict


def _metric(verdict, name):
    return next(m for m in verdict.metrics if m.metric == name)


@pytest.mark.parametrize("stable, canary, metric", [
    ({}, {"guardrail": 0.15}, "guardrail_rate"),  # 3x the guardrail actions
    ({}, {"denied": 0.15}, "denial_rate"),  # 5x the denials
    # escalating after 2x the steps; a fifth of the runs escalate, so 600 canary runs hold ~120
    ({"escalated": 0.2}, {"escalated": 0.2, "later": 2.0}, "escalation_steps"),
])
def test_a_canary_worse_on_governance_is_rolled_back_on_that_metric(stable, canary, metric):
    """Default policy (every metric gating, α/8 each), 10 seeds: each bad canary is rolled back,
    on that metric alone, within 600 canary runs."""
    for seed in range(10):
        verdict = governed_replay(seed, 200, stable=stable, canary=canary)
        assert verdict.decision == "rollback" and verdict.reason.startswith(metric), (seed, verdict.reason)
        assert [m.metric for m in verdict.metrics if m.worse] == [metric], seed
        worst = _metric(verdict, metric)
        assert worst.difference > (0.05 if metric != "escalation_steps" else 0.5) and worst.upper_excess > 0


def test_a_canary_like_stable_on_governance_is_not_rolled_back():
    """30 seeds of 600 canary runs like stable (guardrails, denials, escalations alike): no
    rollback, and the governance metrics were tested all along."""
    for seed in range(30):
        verdict = governed_replay(100 + seed, 200, CanaryPolicy(max_runs=10_000))
        assert verdict.decision == "pending", (seed, verdict.reason)
        for name in ("guardrail_rate", "denial_rate", "escalation_steps"):
            m = _metric(verdict, name)
            assert m.p_value is not None and not m.worse, (seed, name)


def test_allowed_policy_hits_are_not_guardrail_actions():
    rng = np.random.default_rng(21)
    stable = governed_runs(rng, 200, "s", guardrail=0.0)
    canary = governed_runs(rng, 100, "c", guardrail=0.0)
    for run in canary:
        run["policy_hits"]["pii:allowed"] = 5  # hits on every canary run, none acting
    analysis = CanaryAnalysis()
    analysis.add("stable", stable)
    analysis.add("canary", canary)
    m = _metric(analysis.decide(), "guardrail_rate")
    assert m.stable == 0.0 and m.canary == 0.0
    analysis.add("canary", [dict(r, policy_hits={"pii:allowed": 5, "pii:blocked": 1}) for r in canary[:10]])
    assert _metric(analysis.decide(), "guardrail_rate").canary == pytest.approx(0.1)


def _escalation_rollbacks(later: float, reps: int, rng, batches: int) -> float:
    """Share of canaries whose escalations come `later` x stable's steps (nothing else differs)
    rolled back on escalation_steps at α = 0.05 within 3 x `batches` canary runs, a tenth of them
    escalating."""
    policy = CanaryPolicy(alpha=0.05, rollback_on=("escalation_steps",))
    rolled = 0
    for rep in range(reps):
        analysis = CanaryAnalysis(policy)
        for b in range(batches):
            for arm, n, factor in (("stable", 7, 1.0), ("canary", 3, later)):
                steps = rng.lognormal(math.log(40), 0.5, n)  # enough steps that +25% is no rounding
                escalated = rng.random(n) < 0.1
                analysis.add(arm, [{"run_id": f"{rep}-{b}-{arm}-{i}", "outcome": "escalated" if e else "success",
                                    "duration_ms": 1000, "steps": round(factor * s)}
                                   for i, (s, e) in enumerate(zip(steps, escalated))])
            if analysis.decide().decision == "rollback":
                rolled += 1
                break
    return rolled / reps


def test_the_escalation_test_holds_its_level_at_the_margin_and_catches_late_escalations():
    rng = np.random.default_rng(22)
    assert _escalation_rollbacks(1.25, 100, rng, 100) <= 0.05  # exactly the +25% margin: the null's boundary
    assert _escalation_rollbacks(2.0, 30, rng, 200) >= 0.9


def test_escalation_steps_waits_for_enough_escalations_in_each_arm():
    rng = np.random.default_rng(23)
    analysis = CanaryAnalysis(CanaryPolicy(min_escalations=10))
    analysis.add("stable", governed_runs(rng, 300, "s"))
    canary = governed_runs(rng, 60, "c", escalated=0.0)
    for run in canary[:9]:
        run.update(outcome="escalated", steps=40)
    analysis.add("canary", canary)
    m = _metric(analysis.decide(), "escalation_steps")
    assert m.canary == 40 and m.p_value is None and m.statistic is None and m.upper_excess is None
    analysis.add("canary", [dict(canary[9], outcome="escalated", steps=40)])  # the 10th, by a corrected row
    m = _metric(analysis.decide(), "escalation_steps")
    assert m.p_value is not None and m.difference > 3


def test_rows_without_governance_fields_read_as_none():
    """Rows from before the governance fields: guardrail and denial rates 0 in both arms (tested,
    never worse); how late escalations come still reads outcome and steps, which rows always had."""
    verdict = governed_replay(24, 200, CanaryPolicy(max_runs=10_000), stable={"governed": False},
                              canary={"governed": False})
    assert verdict.decision == "pending"
    for name in ("guardrail_rate", "denial_rate"):
        m = _metric(verdict, name)
        assert (m.stable, m.canary, m.difference) == (0.0, 0.0, 0.0) and m.p_value == 1.0 and not m.worse
    later = governed_replay(24, 200, stable={"governed": False}, canary={"governed": False, "later": 2.0})
    assert later.decision == "rollback" and later.reason.startswith("escalation_steps")
    # older stable rows, a canary's new ones: an empty mapping or None is no hit either
    analysis = CanaryAnalysis()
    rng = np.random.default_rng(25)
    analysis.add("stable", governed_runs(rng, 50, "s", governed=False))
    analysis.add("canary", [dict(r, policy_hits=None if i % 2 else {}, approvals_denied=None)
                            for i, r in enumerate(governed_runs(rng, 30, "c"))])
    assert _metric(analysis.decide(), "guardrail_rate").canary == 0.0
    assert _metric(analysis.decide(), "denial_rate").canary == 0.0


def test_an_agent_that_never_escalates_is_promoted_on_evidence():
    """escalation_steps cannot be tested without escalations; it holds no promotion back."""
    margins = {"success_rate": 0.15, "cost_per_success": 0.5, "loop_rate": 0.1, "tool_error_rate": 0.1,
               "p95_duration": 0.5, "guardrail_rate": 0.1, "denial_rate": 0.1}
    policy = CanaryPolicy(promote_after=60, max_runs=3000, margins=margins)
    never = {"escalated": 0.0}
    verdict = governed_replay(26, 1000, policy, stable=never, canary=never)
    assert verdict.decision == "promote" and verdict.reason.startswith("no worse than stable")
    assert "escalation_steps not tested (0 canary and 0 stable escalations" in verdict.reason
    assert verdict.canary_runs < 3000 and _metric(verdict, "escalation_steps").upper_excess is None
    assert all(m.upper_excess < 0 for m in verdict.metrics if m.metric != "escalation_steps")
    # once both arms escalate, it must be shown within its margin like the others, which takes far
    # more runs: a share near 1/2 within 0.25 x the median's steps, at α/8
    sometimes = governed_replay(26, 1000, policy, stable={"escalated": 0.1}, canary={"escalated": 0.1})
    assert sometimes.decision == "promote" and "not tested" not in sometimes.reason
    assert _metric(sometimes, "escalation_steps").upper_excess < 0 and sometimes.canary_runs > 5 * verdict.canary_runs
