"""The evaluation gate over many seeds (streams/detect/gate.py): how often a candidate as good as
its baseline is failed, and how often a 15-point success drop is caught, at 50 tasks x 2 trials.

A seed is one eval suite: T tasks, each with its own success probability, cost scale and step
count (tasks differ far more than trials do, as in tau-bench), run K times by each version.
- success: task i succeeds with p_i, p ~ Beta(a, b) (tau-like: mean 0.45, many tasks always or
  never solved; support-like: mean 0.8); a candidate "15 points worse" has p_i x (1 - 0.15 / mean p).
- cost of a run: the task's scale (log-normal, sd 0.8 in log) x the run's noise (log-normal, sd 0.5).
- steps of a run: Poisson of the task's mean (gamma, mean 12).
Each seed's verdict is the gate's (its tests on the same numbers, vectorised over seeds: the
exact test's p-value table per number of pairs, the signed-rank null per number of tasks);
tests/evaluation/test_gate.py checks a few seeds against `judge` itself.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import numpy as np

from streams.detect.gate import GatePolicy, _signed_rank_cdf, paired_binary_p_values

SUITES = {"tau-like": (0.45, 0.55), "support-like": (4.0, 1.0)}  # Beta(a, b) of the tasks' success


@dataclass(frozen=True)
class Outcome:
    suite: str
    drop: float
    cost_factor: float
    seeds: int
    failed: int
    failed_on: dict

    @property
    def rate(self) -> float:
        return self.failed / self.seeds


def simulate(seeds: int, tasks: int, trials: int, suite: str, drop: float = 0.0, cost_factor: float = 1.0,
             seed: int = 0) -> dict[str, np.ndarray]:
    """Each version's runs of every seed: success (seeds x tasks x trials), cost and steps."""
    rng = np.random.default_rng(seed)
    a, b = SUITES[suite]
    p = rng.beta(a, b, size=(seeds, tasks))
    p_candidate = np.clip(p * (1 - drop / np.maximum(p.mean(axis=1, keepdims=True), 1e-9)), 0.0, 1.0)
    scale = np.exp(rng.normal(np.log(0.05), 0.8, size=(seeds, tasks)))
    mean_steps = rng.gamma(4.0, 3.0, size=(seeds, tasks))
    shape = (seeds, tasks, trials)

    def runs(prob: np.ndarray, factor: float) -> dict[str, np.ndarray]:
        return {"success": rng.random(shape) < prob[..., None],
                "cost": factor * scale[..., None] * np.exp(rng.normal(0.0, 0.5, size=shape)),
                "steps": rng.poisson(mean_steps[..., None], size=shape).astype(float)}

    return {"baseline": runs(p, 1.0), "candidate": runs(p_candidate, cost_factor)}


def verdicts(data: dict[str, dict[str, np.ndarray]], policy: GatePolicy) -> dict[str, np.ndarray]:
    """Per metric, whether each seed's candidate is shown worse beyond the margin (the gate's tests)."""
    base, cand = data["baseline"], data["candidate"]
    seeds, tasks, trials = base["success"].shape
    losses = (base["success"] & ~cand["success"]).sum(axis=(1, 2))
    wins = (~base["success"] & cand["success"]).sum(axis=(1, 2))
    out = {"success_rate": paired_binary_p_values(losses, wins, tasks * trials,
                                                  policy.margins["success_rate"]) <= policy.metric_alpha}
    from scipy.stats import rankdata

    cdf = _signed_rank_cdf(tasks)
    for metric, key, floor in (("cost_per_task", "cost", 1e-6), ("steps", "steps", 1.0)):
        ratio = np.log(np.maximum(cand[key].mean(axis=2), floor) / np.maximum(base[key].mean(axis=2), floor))
        d = ratio - math.log1p(policy.margins[metric])
        ranks = rankdata(np.abs(d), axis=1)
        t_plus = (ranks * (d > 0)).sum(axis=1)
        at_least = np.ceil(t_plus - 1e-9).astype(int)
        p = np.where(at_least <= 0, 1.0, 1.0 - cdf[np.maximum(at_least - 1, 0)])
        out[metric] = p <= policy.metric_alpha
    return out


def measure(seeds: int, tasks: int, trials: int, suite: str, drop: float = 0.0, cost_factor: float = 1.0,
            policy: GatePolicy | None = None, seed: int = 0) -> Outcome:
    policy = policy or GatePolicy()
    worse = verdicts(simulate(seeds, tasks, trials, suite, drop, cost_factor, seed), policy)
    failed = np.zeros(seeds, bool)
    for metric in policy.gate_on:
        failed |= worse[metric]
    return Outcome(suite, drop, cost_factor, seeds, int(failed.sum()),
                   {metric: int(worse[metric].sum()) for metric in policy.gate_on})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=300)
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args(argv)
    policy = GatePolicy()
    print(f"policy: alpha={policy.alpha} per metric, margins={dict(policy.margins)}; "
          f"{args.tasks} tasks x {args.trials} trials, {args.seeds} seeds")
    bad = 0
    for suite in SUITES:
        same = measure(args.seeds, args.tasks, args.trials, suite, seed=1)
        drop = measure(args.seeds, args.tasks, args.trials, suite, drop=0.15, seed=2)
        costly = measure(args.seeds, args.tasks, args.trials, suite, cost_factor=1.5, seed=3)
        print(f"{suite:>13}: as good failed {same.failed}/{same.seeds} ({same.rate:.1%}) {same.failed_on}; "
              f"15-point drop caught {drop.failed}/{drop.seeds} ({drop.rate:.0%}) {drop.failed_on}; "
              f"+50% cost caught {costly.failed}/{costly.seeds} ({costly.rate:.0%})")
        bad += same.rate > 0.01
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
