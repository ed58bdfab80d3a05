"""All 200 real tau-bench runs through the whole pipeline: cost per successful task and loops,
checked against values computed here, independently of the pipeline."""

from pathlib import Path

import orjson
import pytest

from jobs.tau_bench import expected_cost, import_runs

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "tau-bench" / "gpt-4o-airline.json"


def loops_by_brute_force(events: list[dict], repeats: int = 3, max_period: int = 3) -> set[str]:
    """Runs with, anywhere in their tool calls, one call (or a cycle of 2..max_period distinct
    calls) repeated `repeats` times back to back; LLM calls in between do not count."""
    calls: dict[str, list[tuple[str, str]]] = {}
    for event in sorted(events, key=lambda e: e["ts"]):
        if event["type"] == "tool_call":
            args = orjson.dumps(event.get("args", {}), option=orjson.OPT_SORT_KEYS)
            calls.setdefault(event["run_id"], []).append((event["tool"], args))
    looping = set()
    for run_id, sequence in calls.items():
        for period in range(1, max_period + 1):
            for start in range(len(sequence) - period * repeats + 1):
                block = sequence[start:start + period * repeats]
                pattern = block[:period]
                if (period == 1 or len(set(pattern)) == period) and block == pattern * repeats:
                    looping.add(run_id)
    return looping


@pytest.fixture(scope="module")
def replay(stack, tmp_path_factory):
    if not DATA.exists():
        pytest.skip(f"{DATA} is not here")
    result = stack.cli("import", "tau-bench", str(DATA))
    return import_runs(DATA), result


def test_every_run_lands_with_its_outcome(stack, replay):
    events, result = replay
    assert b"produced=4018 rejected=0" in result.stdout
    assert stack.wait_for_count("SELECT count() FROM runs", 200) == 200
    assert stack.count("SELECT countIf(outcome = 'success') FROM runs") == 84
    assert stack.count("SELECT sum(tool_calls) FROM runs") == 1164


def test_cost_per_successful_task_matches_genai_prices_computed_here(stack, replay):
    events, _ = replay
    expected = float(sum(expected_cost(events).values())) / 84
    assert stack.wait_for_count("SELECT sum(runs) FROM agent_metrics", 200) == 200
    (row,) = stack.query(
        "SELECT toFloat64(sum(cost_usd)) / sum(successes) AS per_success FROM agent_metrics "
        "WHERE agent_id = 'tau-airline-gpt4o'"
    )
    assert row["per_success"] == pytest.approx(expected, rel=1e-6)


def test_loops_found_live_are_the_loops_in_the_transcripts(stack, replay):
    events, _ = replay
    expected = loops_by_brute_force(events)
    assert expected == {"tau-airline-9-2"}  # book_reservation, think, ... three times over
    assert stack.wait_for_count("SELECT count() FROM runs", 200) == 200
    found = {row["run_id"] for row in stack.query("SELECT run_id FROM runs WHERE loop_detected")}
    assert found == expected
    alerted = {row["run_id"] for row in stack.query("SELECT run_id FROM alerts WHERE kind = 'loop' AND status = 'firing'")}
    assert alerted == expected
