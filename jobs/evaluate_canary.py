"""Decision quality of CanaryAnalysis on simulated canaries over many seeds: false rollbacks of a
canary as good as stable, catch rate of bad ones, and how many canary runs each verdict takes.

    python -m jobs.evaluate_canary [--seeds 300] [--policy policy.json]

Only the agent under test is simulated: support-bot with its stable v1.4.2 alone, and from the
first minute a canary v1.6.0-rc1 taking 30% of its runs. The simulated events become run rows
(`jobs.evaluate_drift.runs_from_events`, prices from its linear table so every call is priced);
`loop_detected` is the simulator's truth, as the loop detector would set it. Rows reach the
analysis when the pipeline would emit them (a timed-out run an idle timeout after its last
event), one batch per minute of event time, stable rows to the stable arm and canary rows to
the canary arm, and `decide()` runs after every batch until the verdict is not pending. The
span holds 1.2 x max_runs / share runs, so a canary that stays undecided would reach max_runs;
any that does not is reported as undecided.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy.stats import beta

from jobs.evaluate_drift import linear_price, runs_from_events
from jobs.simulate import DEFAULT_START_MS, CanarySpec, FleetConfig, default_agents, run_labels, simulate
from streams.detect.canary import CanaryAnalysis, CanaryPolicy, Verdict

AGENT, STABLE, CANARY, SHARE = "support-bot", "v1.4.2", "v1.6.0-rc1", 0.3
RUNS_PER_MIN = 3.0  # support-bot's traffic; ~0.9 canary runs per one-minute batch
BATCH_MS = 60_000
CONFIDENCE = 0.95  # of the one-sided bounds on the rates


@dataclass(frozen=True)
class Scenario:
    """A canary of support-bot. `bad`: degraded beyond the margins, so rollback is the right call.
    `bar`: whether the quality bar applies (catch >= 99% if bad, false rollbacks <= 1% if not);
    without one the scenario only shows where the power of the tests runs out."""

    name: str
    note: str
    bad: bool
    bar: bool = True
    success_rate: float | None = None  # None: the stable's 0.85
    cost_multiplier: float = 1.0


SCENARIOS = {
    "good": Scenario("good", "as good as stable", False),
    # loops and timeouts (5% of runs) never succeed, so 0.8184 of the rest is 3 points below stable overall
    "at_margin": Scenario("at_margin", "success 3 points down (0.85 -> 0.8184 of runs that neither loop nor time "
                          "out), exactly the margin: the hardest no-degradation case", False, success_rate=0.8184),
    "success_0.5": Scenario("success_0.5", "success 0.85 -> 0.5", True, success_rate=0.5),
    "cost_x2": Scenario("cost_x2", "cost x2 (twice the tokens)", True, cost_multiplier=2.0),
    "success_0.75": Scenario("success_0.75", "success 0.85 -> 0.75, ~6.5 points beyond the margin (no bar)", True,
                             bar=False, success_rate=0.75),
}


def canary_runs(scenario: Scenario, seed: int, policy: CanaryPolicy) -> list[dict]:
    """Run rows of one simulated support-bot with the scenario's canary, in arrival order."""
    support = next(a for a in default_agents() if a.agent_id == AGENT)
    support = dataclasses.replace(support, versions=support.versions[:1], weight=1.0)
    n = math.ceil(1.2 * policy.max_runs / SHARE)
    spec = CanarySpec(AGENT, CANARY, share=SHARE, start_ms=DEFAULT_START_MS, success_rate=scenario.success_rate,
                      cost_multiplier=scenario.cost_multiplier)
    config = FleetConfig(seed=seed, runs=n, start_ms=DEFAULT_START_MS, duration_ms=int(n / RUNS_PER_MIN * 60_000),
                         agents=(support,), canary=spec, price_fn=linear_price, cost_fraction=1.0)
    labels = run_labels(config)
    rows = runs_from_events(simulate(config))
    for row in rows:
        row["loop_detected"] = labels[row["run_id"]]["loop"]
    return sorted(rows, key=lambda r: (r["_arrival"], r["run_id"]))


def replay(analysis: CanaryAnalysis, rows: list[dict]) -> tuple[Verdict, float, int]:
    """Feed rows one batch per minute until a verdict; (last verdict, seconds in decide, decide calls)."""
    batches: dict[int, dict[str, list[dict]]] = defaultdict(lambda: {"stable": [], "canary": []})
    for row in rows:
        batches[row["_arrival"] // BATCH_MS]["canary" if row["agent_version"] == CANARY else "stable"].append(row)
    spent, calls = 0.0, 0
    verdict = analysis.decide()
    for minute in sorted(batches):
        for arm, runs in batches[minute].items():
            analysis.add(arm, runs)
        began = time.perf_counter()
        verdict = analysis.decide()
        spent += time.perf_counter() - began
        calls += 1
        if verdict.decision != "pending":
            break
    return verdict, spent, calls


def upper_bound(k: int, n: int) -> float:
    """One-sided Clopper-Pearson upper bound of a rate at CONFIDENCE."""
    return 1.0 if k == n else float(beta.ppf(CONFIDENCE, k + 1, n - k))


def lower_bound(k: int, n: int) -> float:
    """One-sided Clopper-Pearson lower bound of a rate at CONFIDENCE."""
    return 0.0 if k == 0 else float(beta.ppf(1 - CONFIDENCE, k, n - k + 1))


def spread(values: list[int]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.0f} / {np.percentile(values, 95):.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=300)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--policy", type=Path, help="a JSON canary policy (CanaryPolicy.from_mapping); default: defaults")
    args = ap.parse_args(argv)
    policy = CanaryPolicy.from_mapping(json.loads(args.policy.read_text())) if args.policy else CanaryPolicy()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    console = Console()
    console.width = max(console.width, 150)
    console.print(f"{AGENT} {STABLE} vs canary {CANARY} at {SHARE:.0%} of ~{RUNS_PER_MIN:g} runs/min, decide() after "
                  f"every 1-min batch, seeds {seeds.start}..{seeds.stop - 1}")
    console.print(f"policy: min_runs {policy.min_runs}, promote_after {policy.promote_after}, max_runs "
                  f"{policy.max_runs}, alpha {policy.alpha} ({policy.metric_alpha:.2g} per metric), margins "
                  f"{dict(policy.margins)}, tau {dict(policy.tau)}")
    names = args.scenarios.split(",")
    for name in names:
        console.print(f"  {name}: {SCENARIOS[name].note}")

    table = Table(title=f"canary verdicts over {len(seeds)} seeds; runs are canary runs; rate bounds are one-sided "
                        f"{CONFIDENCE:.0%} Clopper-Pearson")
    for column in ("scenario", "rollbacks", "rate (bound)", "bar", "runs to rollback\nmedian / p95",
                   "rolled back on", "promotes\n(evidence + max_runs)", "runs to promote\nmedian / p95", "undecided"):
        table.add_column(column)
    began = time.perf_counter()
    spent_all, calls_all = 0.0, 0
    for name in names:
        scenario = SCENARIOS[name]
        rolled, promoted, proven, undecided, triggers = [], [], 0, [], Counter()
        for seed in seeds:
            analysis = CanaryAnalysis(policy)
            verdict, spent, calls = replay(analysis, canary_runs(scenario, seed, policy))
            spent_all += spent
            calls_all += calls
            if verdict.decision == "rollback":
                rolled.append(verdict.canary_runs)
                triggers[min((m for m in verdict.metrics if m.worse), key=lambda m: m.p_value).metric] += 1
            elif verdict.decision == "promote":
                promoted.append(verdict.canary_runs)
                proven += verdict.reason.startswith("no worse than stable")  # on evidence, not at max_runs
            else:
                undecided.append(verdict.canary_runs)
        n, k = len(seeds), len(rolled)
        if scenario.bad:
            bound = lower_bound(k, n)
            rate = f"{k / n:.2%} (>= {bound:.2%})"
            bar = "catch >= 99%: " + ("met" if bound >= 0.99 else "point only" if k / n >= 0.99 else "MISSED")
        else:
            bound = upper_bound(k, n)
            rate = f"{k / n:.2%} (<= {bound:.2%})"
            bar = "false <= 1%: " + ("met" if bound <= 0.01 else "point only" if k / n <= 0.01 else "MISSED")
        table.add_row(name, f"{k}/{n}", rate, bar if scenario.bar else "-", spread(rolled),
                      ", ".join(f"{m} {c}" for m, c in triggers.most_common()) or "-",
                      f"{len(promoted)} ({proven} + {len(promoted) - proven})", spread(promoted),
                      f"{len(undecided)}" + (f" (at {spread(undecided)} runs)" if undecided else ""))
    console.print(table)
    console.print("bar 'met': the one-sided bound meets it; 'point only': the rate does, but these seeds cannot "
                  "show it at that confidence")
    console.print(f"runtime: {1e6 * spent_all / max(calls_all, 1):.0f} us per decide() ({calls_all} calls), "
                  f"{time.perf_counter() - began:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
