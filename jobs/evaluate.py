"""Every detection quality bar of issue 3 on labelled simulated fleets, over several seeds.

    python -m jobs.evaluate [--seeds 5] [--first-seed 1] [--runs 2000] [--fast-prices]

Bars: loop precision and recall >= 0.95; zero drift alerts on stable agents over 3 h of event
time; a real shift caught within 2 windows (of the earliest alert persistence allows) in at
least 90% of seeds (a test at a fixed false-alert rate cannot promise every seed); failure
clusters with adjusted Rand index >= 0.8 against the labelled failure families, and failure modes
across the fleet (jobs.evaluate_modes) with ARI >= 0.9 and no looping run outside the loop mode. Exits 1 when a
bar that is held (loops, stable drift, clusters, shifts of a version with enough runs per window)
is missed; lower traffic, an oracle's catch rate and a one-window blip are reported beside it.
The per-detector jobs (`jobs.evaluate_loops`, `jobs.evaluate_drift`, `jobs.evaluate_failures`)
print more detail.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from rich.console import Console
from rich.table import Table

from jobs import evaluate_drift, evaluate_failures, evaluate_loops, evaluate_modes

# (scenario, fleet runs per 3 h, held?): support-bot v1.4.2 runs ~2.7/min at 1,200 (13 runs per
# 5-min window), research ~1.7, coder ~1, a 30% canary ~0.8. A success drop 0.85 -> 0.5 at 13
# runs per window is at the limit of what the runs can show (the oracle row): it is held at twice
# that traffic and reported at 1,200; the lower-traffic shifts and a one-window blip are reported.
DRIFT_CASES = (
    ("stable", 1200, True), ("stable", 2400, True), ("canary_same", 1200, True),
    ("cost_x2", 1200, True), ("new_tool", 1200, True), ("success_0.5", 1200, False), ("success_0.5", 2400, True),
    ("cost_x2_research", 1200, False), ("success_0.35_coder", 1200, False), ("canary_bad", 1200, False),
    ("blip_cost_x3", 1200, False),
)
ORACLE_P = 1e-4  # the oracle's bar: about the detector's per-test bar, one-sided (the oracle knows the side)


def loops(seeds: range, runs: int, fleet: str) -> tuple[float, float, str]:
    results = [evaluate_loops.score(seed, runs, 0.05, fleet) for seed in seeds]
    hits = sum(round(r["recall"] * r["loops"]) for r in results)
    detected = sum(r["detected"] for r in results)
    truth = sum(r["loops"] for r in results)
    precision = hits / detected if detected else 1.0
    recall = hits / truth if truth else 1.0
    return precision, recall, f"{truth} loops in {sum(r['runs'] for r in results)} runs"


def drift(seeds: range, fast_prices: bool) -> list[dict]:
    out = []
    for name, runs_per_span, held in DRIFT_CASES:
        scenario = evaluate_drift.SCENARIOS[name]
        false_alerts, delays, oracle = 0, [], []
        for seed in seeds:
            detector = scenario.detector()
            runs = scenario.runs(seed, fast_prices, runs_per_span)
            _, alerts, _, _ = evaluate_drift.replay(detector, runs)
            res = evaluate_drift.score(scenario, alerts, detector.persistence)
            false_alerts += res["false_alerts"]
            delays.append(res.get("delay"))
            if scenario.success_shift:
                oracle.append(evaluate_drift.success_oracle(scenario, runs) <= ORACLE_P)
        out.append({"name": name, "runs_per_span": runs_per_span, "held": held, "false_alerts": false_alerts,
                    "delays": delays, "within": sum(d is not None and d <= 2 for d in delays),
                    "target": scenario.target, "blip": scenario.lasts_ms is not None,
                    "oracle": sum(oracle) if oracle else None})
    return out


def clusters(seeds: range, runs: int) -> list[float]:
    return [evaluate_failures.evaluate(seed, runs)["ari"] for seed in seeds]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--runs", type=int, default=2000, help="runs per fleet for loops and clusters")
    ap.add_argument("--fast-prices", action="store_true", help="a linear price table instead of genai-prices")
    args = ap.parse_args(argv)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    console = Console(width=max(Console().width, 150))
    table = Table(title=f"Detection quality, seeds {seeds.start}..{seeds.stop - 1}")
    for column in ("detector", "measure", "bar", "measured", "held"):
        table.add_column(column)
    missed = []

    def row(detector: str, measure: str, bar: str, measured: str, ok: bool | None) -> None:
        table.add_row(detector, measure, bar, measured, "-" if ok is None else ("yes" if ok else "NO"))
        if ok is False:
            missed.append(f"{detector} {measure}")

    for fleet, said in (("arguments", "tool arguments"), ("tokens", "no arguments, token counts")):
        with console.status(f"loops ({said})"):
            precision, recall, what = loops(seeds, args.runs, fleet)
        row("loops", f"precision, {said} ({what})", ">= 0.95", f"{precision:.3f}", precision >= 0.95)
        row("loops", f"recall, {said}", ">= 0.95", f"{recall:.3f}", recall >= 0.95)
    with console.status("loops (tool names alone)"):
        precision, recall, what = loops(seeds, args.runs, "names")
    # the count alone cannot tell a loop from a run that calls one tool 5 times on purpose: reported, no bar
    row("loops", f"suspected (count alone) precision, tool names alone ({what})", "-", f"{precision:.3f}", None)
    row("loops", "suspected (count alone) recall, tool names alone", "-", f"{recall:.3f}", None)

    with console.status("drift"):
        found = drift(seeds, args.fast_prices)
    n = len(seeds)
    for res in found:
        what = f"{res['name']} @ {res['runs_per_span']} runs/3 h"
        if res["target"] is None:
            row("drift", f"{what}: false alerts over 3 h", "0", f"{res['false_alerts']} in {n} seeds",
                res["false_alerts"] == 0 if res["held"] else None)
            continue
        delays = ",".join("-" if d is None else str(d) for d in res["delays"])
        if res["blip"]:
            alerted = sum(d is not None for d in res["delays"])
            row("drift", f"{what}: one 5-min blip of {' '.join(res['target'])}, alerted", "reported",
                f"{alerted}/{n}", None)
        else:
            row("drift", f"{what} ({' '.join(res['target'])}): caught within 2 windows",
                ">= 90% of seeds" if res["held"] else "reported", f"{res['within']}/{n} (delays {delays})",
                res["within"] >= 0.9 * n if res["held"] else None)
        if res["oracle"] is not None:
            row("drift", f"{what}: oracle (knows the start, success rate alone, p <= {ORACLE_P:g})", "reported",
                f"{res['oracle']}/{n}", None)
        row("drift", f"{what}: false alerts on other versions", "0", str(res["false_alerts"]),
            res["false_alerts"] == 0)

    with console.status("failure clusters"):
        aris = clusters(seeds, args.runs)
    row("clusters", "adjusted Rand index (min over seeds)", ">= 0.8",
        f"{min(aris):.3f} (mean {statistics.mean(aris):.3f})", min(aris) >= 0.8)
    with console.status("failure modes across the fleet"):
        modes = [evaluate_modes.evaluate(seed) for seed in seeds]
    row("modes", "families spanning agents (jobs.evaluate_modes): ARI, min over seeds", ">= 0.9",
        f"{min(r['ari'] for r in modes):.3f}", min(r["ari"] for r in modes) >= 0.9)
    row("modes", "looping runs outside the loop mode", "0", str(sum(r["loops_outside"] for r in modes)),
        sum(r["loops_outside"] for r in modes) == 0)

    console.print(table)
    if missed:
        console.print("missed: " + "; ".join(missed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
