"""Loop detection on a simulated fleet: every injected loop is found, nothing else."""

from jobs.simulate import FleetConfig, run_labels, simulate
from streams.contracts.events import validate
from streams.detect.runs import RunAssembler


def test_injected_loops_of_the_simulator_are_found_with_no_false_alarm():
    config = FleetConfig(seed=5, runs=400, loop_fraction=0.05)
    assembler = RunAssembler(30 * 60_000)
    events = [validate(raw) for raw in simulate(config)]
    for normalised in events:
        normalised["cost_source"] = ""
    rows = assembler.apply(events, now_ms=0)
    detected = {row["run_id"] for row in rows if row["loop_detected"]}
    labelled = {run_id for run_id, label in run_labels(config).items() if label["loop"]}
    assert labelled and detected == labelled


def test_without_arguments_the_tokens_find_every_loop_and_nothing_else():
    """Tool calls without arguments (instrumentation's default): the model calls' tokens tell a
    call made again (the same output, the same result) from pagination."""
    config = FleetConfig(seed=5, runs=400, loop_fraction=0.05, tool_args=False)
    events = [validate(raw) for raw in simulate(config)]
    assert not any(event["args_hash"] for event in events)
    for normalised in events:
        normalised["cost_source"] = ""
    rows = RunAssembler(30 * 60_000).apply(events, now_ms=0)
    detected = {row["run_id"] for row in rows if row["loop_detected"]}
    labelled = {run_id for run_id, label in run_labels(config).items() if label["loop"]}
    assert labelled and detected == labelled
