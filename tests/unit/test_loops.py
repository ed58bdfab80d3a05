"""Loop detection: repeats, cycles and step budgets are found at once; pagination and retries are not loops."""

from streams.contracts.events import args_hash
from streams.detect.loops import LoopPolicy, find_loop
from streams.detect.runs import RunAssembler
from tests.unit.test_runs import T0, event

POLICY = LoopPolicy()


def scan(calls, steps=None, budget=200):
    """The first finding as the calls arrive one by one, and after which call."""
    for index in range(1, len(calls) + 1):
        finding = find_loop(calls[:index], steps or index, budget, POLICY)
        if finding:
            return finding, index
    return None, None


def test_three_identical_calls_are_a_loop_found_on_the_third():
    finding, at = scan([("search", "h1")] * 3)
    assert (finding.rule, at) == ("repeat", 3)


def test_a_retry_is_not_a_loop():
    assert scan([("search", "h1"), ("search", "h1"), ("book", "h2")])[0] is None


def test_pagination_is_not_a_loop():
    assert scan([("search", f"page{page}") for page in range(10)])[0] is None


def test_a_cycle_with_the_same_arguments_is_a_loop():
    finding, at = scan([("open", "a"), ("read", "b")] * 3)
    assert (finding.rule, at) == ("cycle", 6)
    finding, at = scan([("a", "1"), ("b", "2"), ("c", "3")] * 3)
    assert (finding.rule, at) == ("cycle", 9)


def test_a_cycle_with_changing_arguments_is_not_a_loop():
    calls = [("open", f"file{turn}") if index % 2 == 0 else ("read", "b") for turn in range(3) for index in range(2)]
    assert scan(calls)[0] is None


def test_steps_over_the_budget_are_a_loop():
    finding = find_loop([("a", "1"), ("b", "2")], steps=41, budget=40, policy=POLICY)
    assert finding.rule == "step_budget"


def test_assembler_alerts_once_while_the_run_goes_on_and_resolves_at_its_end():
    assembler = RunAssembler(30 * 60_000)
    call = {"tool": "lookup", "args_hash": args_hash('{"id":1}')}
    events = [event("e0", "r1", "run_start", T0)] + [
        event(f"e{i}", "r1", "tool_call", T0 + i * 1000, **call) for i in range(1, 5)
    ]
    assert assembler.apply(events[:3], now_ms=1) == []
    assert assembler.take_alerts() == []
    assembler.apply(events[3:], now_ms=2)
    (firing,) = assembler.take_alerts()
    assert (firing["kind"], firing["status"], firing["action"], firing["run_id"]) == ("loop", "firing", "stop_run", "r1")
    assert firing["ts"] == T0 + 3000 and len(firing["evidence"]["calls"]) == 3
    (row,) = assembler.apply([event("e9", "r1", "run_end", T0 + 9000, outcome="aborted")], now_ms=3)
    assert row["loop_detected"] is True
    (resolved,) = assembler.take_alerts()
    assert resolved["status"] == "resolved" and resolved["fingerprint"] == firing["fingerprint"]
    assert resolved["alert_id"] != firing["alert_id"]
