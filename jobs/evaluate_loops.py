"""Loop detection quality over labelled simulated fleets: precision and recall per seed and per
kind of fleet.

    python -m jobs.evaluate_loops [--seeds 10] [--runs 2000] [--fleet arguments|tokens|names]

Each fleet's events go through the same run assembler the processors use; a run counts as
detected when its row has `loop_detected`; the truth is the simulator's injected loops. The
fleets differ in what the agents send (FLEETS): tool calls with their arguments; without them
(what instrumentation libraries send by default), the model calls' token counts kept; tool
names alone, no arguments and no token counts, where only the count of calls can tell and
loops run 5-8 calls (fewer cannot be told from pagination).
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from jobs.simulate import FleetConfig, run_labels, simulate
from streams.ingest.pricing import PriceTable, price_event
from streams.contracts.events import validate
from streams.detect.runs import RunAssembler


# fleet -> (simulator options, whether the model calls report their token counts)
FLEETS: dict[str, tuple[dict, bool]] = {
    "arguments": ({}, True),
    "tokens": ({"tool_args": False}, True),
    "names": ({"tool_args": False, "loop_repeats": (5, 8)}, False),
}


def score(seed: int, runs: int, loop_fraction: float, fleet: str = "arguments") -> dict:
    options, usage = FLEETS[fleet]
    config = FleetConfig(seed=seed, runs=runs, loop_fraction=loop_fraction, **options)
    prices = PriceTable()
    events = []
    for raw in simulate(config):
        if not usage and raw["type"] == "llm_call":
            raw["input_tokens"] = raw["output_tokens"] = raw["cache_read_input_tokens"] = 0
        event = validate(raw)
        price_event(prices, event)
        events.append(event)
    assembler = RunAssembler(idle_timeout_ms=30 * 60_000)
    rows = assembler.apply(events, now_ms=0)
    detected = {row["run_id"] for row in rows if row["loop_detected"]}
    truth = {run_id for run_id, label in run_labels(config).items() if label["loop"]}
    hits = len(detected & truth)
    return {
        "seed": seed, "runs": len(rows), "loops": len(truth), "detected": len(detected),
        "precision": hits / len(detected) if detected else 1.0, "recall": hits / len(truth) if truth else 1.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--loop-fraction", type=float, default=0.05)
    parser.add_argument("--fleet", choices=tuple(FLEETS), default="arguments")
    args = parser.parse_args(argv)
    results = [score(seed, args.runs, args.loop_fraction, args.fleet) for seed in range(1, args.seeds + 1)]
    table = Table(title=f"Loop detection on {args.seeds} simulated fleets of {args.runs} runs ({args.fleet})")
    for column in ("seed", "runs", "loops", "detected", "precision", "recall"):
        table.add_column(column, justify="right")
    for result in results:
        table.add_row(*(f"{value:.3f}" if isinstance(value, float) else str(value) for value in result.values()))
    hits = sum(round(r["recall"] * r["loops"]) for r in results)
    detected = sum(r["detected"] for r in results)
    loops = sum(r["loops"] for r in results)
    table.add_row("all", str(sum(r["runs"] for r in results)), str(loops), str(detected),
                  f"{hits / detected:.3f}", f"{hits / loops:.3f}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
