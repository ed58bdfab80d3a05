"""The evaluation gate over many seeds (jobs/evaluate_gate.py), fixed seeds: the vectorised tests
are the gate's own, a candidate as good as its baseline is rarely failed, a 15-point drop often is."""

import numpy as np

from jobs.evaluate_gate import measure, simulate, verdicts
from streams.detect.gate import GatePolicy, TaskRuns, judge


def test_the_vectorised_verdicts_are_judges():
    policy = GatePolicy()
    data = simulate(15, 50, 2, "tau-like", drop=0.15, cost_factor=1.25, seed=9)
    fast = verdicts(data, policy)
    base, cand = data["baseline"], data["candidate"]
    disagreements = 0
    for s in range(15):
        tasks = [TaskRuns(f"T{t}", tuple(zip(base["success"][s, t], base["cost"][s, t], base["steps"][s, t])),
                          tuple(zip(cand["success"][s, t], cand["cost"][s, t], cand["steps"][s, t])))
                 for t in range(50)]
        worse = {m.metric: m.worse for m in judge(tasks, policy).metrics}
        disagreements += sum(worse[metric] != bool(fast[metric][s]) for metric in policy.gate_on)
    assert disagreements == 0
    assert fast["success_rate"].any() and not fast["success_rate"].all()  # a mix: the comparison means something


def test_a_candidate_as_good_as_its_baseline_is_failed_at_most_1_percent_of_the_time():
    for suite in ("tau-like", "support-like"):
        same = measure(2000, 50, 2, suite, seed=11)
        assert same.rate <= 0.01, (suite, same)


def test_a_15_point_drop_is_caught_about_half_the_time_at_50_tasks_x_2():
    for suite in ("tau-like", "support-like"):
        drop = measure(2000, 50, 2, suite, drop=0.15, seed=12)
        assert 0.35 <= drop.rate <= 0.65, (suite, drop)
        assert drop.failed_on["success_rate"] == drop.failed  # caught on success, not by chance elsewhere
    assert measure(500, 50, 2, "tau-like", cost_factor=1.5, seed=13).rate >= 0.8
    assert np.isclose(measure(300, 50, 2, "tau-like", seed=1).rate, 0.01)  # the figure in jobs/README.md
