"""Loop detection: repeats, cycles and step budgets are found at once; pagination and retries are not loops."""

from streams.contracts.events import args_hash
from streams.detect.loops import LoopPolicy, find_loop
from streams.detect.runs import RunAssembler
from tests.unit.test_runs import T0, event

POLICY = LoopPolicy()


def scan(calls, steps=None, budget=200):
    """The first finding as the calls arrive one by one, and after which call; a call is
    (tool, args_hash) or (tool, args_hash, decision)."""
    calls = [call if len(call) == 3 else (*call, None) for call in calls]
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
    finding = find_loop([("a", "1", None), ("b", "2", None)], steps=41, budget=40, policy=POLICY)
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


def test_calls_without_arguments_are_a_suspected_loop_only_at_the_count():
    # three calls of one tool whose arguments are unknown (content capture off) are not a loop
    assert scan([("search", "")] * 4)[0] is None
    finding, at = scan([("search", "")] * 5)
    assert (finding.rule, finding.basis, at) == ("tool_count", "count", 5)
    assert finding.evidence()["basis"] == "count" and "count of calls alone" in finding.summary
    # other tools in between, or known arguments, are not the count rule's
    assert scan([("search", ""), ("read", "")] * 5)[0] is None
    assert scan([("search", "")] * 4 + [("search", "h1")])[0] is None
    assert scan([("search", "h1")] * 3)[0].basis == "arguments"
    assert find_loop([("a", "", None)], steps=41, budget=40, policy=POLICY).basis == "steps"


def test_a_suspected_loop_warns_and_asks_to_stop_the_run_only_by_policy():
    def first_alert(policy: LoopPolicy) -> dict:
        assembler = RunAssembler(30 * 60_000, loop_policy=policy)
        events = [event("e0", "r1", "run_start", T0)] + [
            event(f"e{i}", "r1", "tool_call", T0 + i * 1000, tool="search") for i in range(1, 6)]
        assembler.apply(events, now_ms=1)
        (firing,) = assembler.take_alerts()
        return firing

    warned = first_alert(LoopPolicy())
    assert (warned["severity"], warned.get("action"), warned["evidence"]["basis"]) == ("warning", None, "count")
    assert "may be looping" in warned["summary"]
    stopped = first_alert(LoopPolicy(stop_on_count=True))
    assert (stopped["severity"], stopped["action"]) == ("warning", "stop_run")


def test_calls_without_arguments_are_a_loop_when_the_tokens_say_the_same_call_came_back():
    # each call decided by a model call of its own that wrote 42 tokens, the conversation
    # growing by the same result (150 tokens, give or take a rounded one) every turn
    looped = [("fetch", "", (1000 * k, 900 + 150 * k + k // 2, 42)) for k in range(3)]
    finding, at = scan(looped)
    assert (finding.rule, finding.basis, at) == ("repeat", "tokens", 3)
    assert finding.evidence()["tokens"] == {"output_tokens": 42, "input_growth": [150, 151]}
    assert scan([("fetch", "", (1000 * k, 900 + 150 * k + k % 2 * 2, 42)) for k in range(3)])[0] is None
    # pagination: the same request written each time, results of other sizes
    paged = [("fetch", "", (1000 * k, 900 + size, 42)) for k, size in enumerate((0, 150, 420))]
    assert scan(paged)[0] is None
    # other outputs, a retry without a model call of its own, or no model call: not this rule
    assert scan([("fetch", "", (1000 * k, 900 + 150 * k, 40 + k)) for k in range(3)])[0] is None
    assert scan([("fetch", "", (0, 900, 42))] * 3)[0] is None
    assert scan(looped[:2] + [("fetch", "", None)])[0] is None


def test_the_assembler_finds_a_loop_in_the_tokens_of_calls_without_arguments():
    assembler = RunAssembler(30 * 60_000)
    events = [event("e0", "r1", "run_start", T0)]
    for turn in range(3):
        at = T0 + 10_000 * (turn + 1)
        events += [event(f"m{turn}", "r1", "llm_call", at, input_tokens=900 + 160 * turn, output_tokens=35),
                   event(f"t{turn}", "r1", "tool_call", at + 2000, tool="fetch")]
    assembler.apply(events, now_ms=1)
    (firing,) = assembler.take_alerts()
    assert (firing["severity"], firing["action"], firing["evidence"]["basis"]) == ("critical", "stop_run", "tokens")
    assert firing["ts"] == T0 + 32_000  # at the third call
