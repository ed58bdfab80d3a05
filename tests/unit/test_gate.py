"""The evaluation gate's math (streams/detect/gate.py), its policy, its reports, and the versions'
config diff: no services."""

import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from scipy.stats import wilcoxon

from streams.contracts.deployments import parse_deployment
from streams.contracts.events import InvalidEvent
from streams.detect.gate import (GatePolicy, TaskRuns, _cells, _signed_rank_cdf, discordant_pairs, judge,
                                 pair_by_task, paired_binary_p_value, paired_binary_p_values,
                                 paired_binary_upper_bound, signed_rank_test, tango_z)
from streams.detect.policy import Policy, PolicyError
from streams.ops.gates import Gate, junit, markdown
from streams.ops.versions import config_changes


def test_tango_statistic_at_no_margin_is_mcnemars():
    for a, b in ((10, 3), (7, 7), (0, 5), (30, 12)):
        assert float(tango_z(a, b, 100, 0.0)) == pytest.approx((a - b) / math.sqrt(a + b))


def test_exact_p_value_of_ten_losses_in_ten_pairs_is_one_in_1024():
    # at no margin the worst nuisance is no tie at all: every pair a fair coin
    assert paired_binary_p_value(10, 0, 10, 0.0) == pytest.approx(0.5 ** 10, rel=1e-3)
    assert paired_binary_p_value(0, 10, 10, 0.0) == pytest.approx(1.0)


@pytest.mark.parametrize("margin", [0.0, 0.05, 0.1])
def test_the_exact_test_fails_a_candidate_at_the_margin_at_most_alpha_of_the_time(margin):
    # every outcome of 30 pairs, enumerated: the rejection probability at the boundary of H0,
    # for win probabilities across the nuisance's range, never exceeds alpha
    n, alpha = 30, 0.05
    a, b, log_coef = _cells(n)
    rejected = paired_binary_p_values(a, b, n, margin) <= alpha
    for win in np.linspace(0.0, (1 - margin) / 2, 41):
        loss, tie = win + margin, max(0.0, 1 - 2 * win - margin)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            log_p = log_coef + np.nan_to_num(a * np.log(loss)) + np.nan_to_num(b * np.log(win)) \
                + np.nan_to_num((n - a - b) * np.log(tie))
        size = np.exp(log_p)[rejected].sum()
        assert size <= alpha + 1e-9, (win, size)
    assert rejected.any()


def test_the_upper_bound_is_above_the_observed_deficit_and_shrinks_with_more_pairs():
    small = paired_binary_upper_bound(12, 4, 50, 0.05)
    large = paired_binary_upper_bound(48, 16, 200, 0.05)
    assert small > (12 - 4) / 50 and large > (48 - 16) / 200
    assert large < small
    # the bound and the test agree: shown worse beyond a margin below the bound's lower mirror
    assert paired_binary_p_value(48, 16, 200, 0.0) <= 0.05


def test_signed_rank_null_distribution_is_exact():
    assert np.allclose(np.diff(np.concatenate([[0], _signed_rank_cdf(3)])) * 8, [1, 1, 1, 2, 1, 1, 1])


def test_signed_rank_p_value_is_scipys_exact_one():
    rng = np.random.default_rng(4)
    for _ in range(5):
        x = rng.normal(0.2, 0.3, size=25)
        ours = signed_rank_test(x, 0.1, 0.05)
        theirs = wilcoxon(x - 0.1, alternative="greater", method="exact").pvalue
        assert ours.p_value == pytest.approx(theirs, rel=1e-9)
        assert ours.lower <= ours.estimate <= ours.upper


def test_signed_rank_bound_is_the_inverted_test():
    # the upper bound U: shifting the data to U makes the one-sided test "below" reject at about alpha
    rng = np.random.default_rng(5)
    x = rng.normal(0.0, 1.0, size=30)
    result = signed_rank_test(x, 0.0, 0.05)
    below = wilcoxon(x - (result.upper + 1e-9), alternative="less", method="exact").pvalue
    above = wilcoxon(x - (result.upper - 1e-6), alternative="less", method="exact").pvalue
    assert below <= 0.05 < above


def _runs(version_rows):
    return [{"task_id": t, "outcome": "success" if ok else "failure", "cost_usd": cost, "steps": steps,
             "started_at": i, "run_id": f"{t}-{i}"} for i, (t, ok, cost, steps) in enumerate(version_rows)]


def _suite(tasks=30, trials=2, fail_every=0, cost=1.0, seed=0):
    rng = np.random.default_rng(seed)
    base, cand = [], []
    for t in range(tasks):
        p = rng.uniform(0.2, 0.95)
        for _ in range(trials):
            base.append((f"T{t}", rng.random() < p, 0.10 * rng.lognormal(0, 0.3), 10))
            ok = rng.random() < p and not (fail_every and t % fail_every == 0)
            cand.append((f"T{t}", ok, cost * 0.10 * rng.lognormal(0, 0.3), 10))
    return pair_by_task(_runs(base), _runs(cand))


def test_judge_passes_an_equal_candidate_with_its_bounds():
    result = judge(_suite())
    assert (result.verdict, result.exit_code, result.tasks) == ("pass", 0, 30)
    bounds = {m.metric: m.worse_up_to for m in result.metrics}
    assert bounds["success_rate"] > 0 and bounds["cost_per_task"] > 0
    assert bounds["steps"] == 0  # every run took 10 steps in both versions
    assert "could be worse by up to" in result.reason


def test_judge_fails_a_candidate_that_fails_every_other_task():
    result = judge(_suite(fail_every=2))
    assert (result.verdict, result.exit_code) == ("fail", 1)
    worse = {m.metric for m in result.metrics if m.worse}
    assert worse == {"success_rate"}


def test_judge_fails_on_cost_alone():
    result = judge(_suite(cost=1.6))
    assert result.exit_code == 1
    assert {m.metric for m in result.metrics if m.worse} == {"cost_per_task"}
    cost = next(m for m in result.metrics if m.metric == "cost_per_task")
    assert cost.difference == pytest.approx(0.6, abs=0.1)


def test_too_few_tasks_is_exit_2_whatever_the_runs_say():
    result = judge(_suite(tasks=5, fail_every=1))
    assert (result.verdict, result.exit_code, result.tasks) == ("insufficient", 2, 5)


def test_a_metric_not_in_gate_on_is_reported_but_does_not_fail():
    result = judge(_suite(cost=1.6), GatePolicy(gate_on=("success_rate", "steps")))
    assert result.exit_code == 0
    assert next(m for m in result.metrics if m.metric == "cost_per_task").worse


def test_pairing_by_task_leaves_out_unpaired_runs_and_pairs_runs_in_start_order():
    base = _runs([("A", True, 1, 1), ("B", True, 1, 1), ("", True, 1, 1)])
    cand = _runs([("A", False, 2, 1), ("A", True, 3, 1), ("C", True, 1, 1)])
    tasks = pair_by_task(base, cand)
    assert [t.task_id for t in tasks] == ["A"]
    assert tasks[0].candidate == ((False, 2.0, 1.0), (True, 3.0, 1.0))
    assert discordant_pairs(tasks) == (1, 0, 1)  # A's first runs only: its extra candidate run is unpaired
    assert discordant_pairs([TaskRuns("x", ((False, 0, 0),), ((True, 0, 0),))]) == (0, 1, 1)


def test_gate_policy_from_the_policy_file():
    policy = Policy.from_mapping({"gate": {"alpha": 0.01, "margins": {"success_rate": 0.1}},
                                  "agents": {"bot": {"gate": {"min_tasks": 40, "margins": {"steps": 0.5}}}}})
    bot = policy.gate("bot")
    assert (bot.alpha, bot.min_tasks) == (0.01, 40)
    assert dict(bot.margins) == {"success_rate": 0.1, "cost_per_task": 0.2, "steps": 0.5}
    assert policy.gate("other").min_tasks == 20
    with pytest.raises(PolicyError, match="unknown gate policy keys"):
        Policy.from_mapping({"gate": {"alfa": 0.1}})
    with pytest.raises(PolicyError, match="margins"):
        Policy.from_mapping({"gate": {"margins": {"latency": 0.1}}})


def _gate(result):
    row = {"gate_id": "g1", "agent_id": "bot", "candidate": "v2", "baseline": "v1", "environment": "eval",
           "evidence": {"baseline_from": "given"}}
    return Gate(result, row, None, "store")


def test_reports_say_the_verdict_and_the_bound():
    failed = _gate(judge(_suite(fail_every=2)))
    text = markdown(failed)
    assert "Trackside gate failed" in text and "**worse**" in text and "could be worse by up to" in text
    suite = ET.fromstring(junit(failed)).find("testsuite")
    assert suite.get("failures") == "1" and suite.get("tests") == "3"
    assert [case.get("name") for case in suite if case.find("failure") is not None] == ["success_rate"]
    short = ET.fromstring(junit(_gate(judge(_suite(tasks=5))))).find("testsuite")
    assert short.get("errors") == "1" and short.find("testcase/error").get("type") == "insufficient"
    assert "not judged" in markdown(_gate(judge(_suite(tasks=5))))


def test_deployment_config_is_kept_as_canonical_json():
    event = parse_deployment(b'{"agent_id":"a","version":"v","role":"stable","ts":1767225600000,'
                             b'"config":{"model":"gpt-4o","tools":["b","a"],"params":{"t":0.2}}}')
    assert event["config"] == '{"model":"gpt-4o","params":{"t":0.2},"tools":["b","a"]}'
    assert "config" not in parse_deployment(b'{"agent_id":"a","version":"v","role":"stable","ts":1767225600000}')
    with pytest.raises(InvalidEvent, match="config"):
        parse_deployment(b'{"agent_id":"a","version":"v","role":"stable","ts":1767225600000,"config":"gpt-4o"}')


def test_config_changes_name_what_changed():
    before = {"model": "gpt-4o", "provider": "openai", "prompt_sha": "abc", "tools": ["search", "refund"],
              "params": {"temperature": 0.2, "max_steps": 30}}
    after = {"model": "gpt-4o-mini", "provider": "openai", "prompt_sha": "def", "tools": ["search", "email"],
             "params": {"temperature": 0.7, "max_steps": 30}, "region": "eu"}
    assert config_changes(before, after) == [
        ("model", "gpt-4o", "gpt-4o-mini"), ("prompt_sha", "abc", "def"), ("tools added", "", "email"),
        ("tools removed", "refund", ""), ("params.temperature", "0.2", "0.7"), ("region", "-", "eu")]
    assert config_changes(before, dict(before)) == []
