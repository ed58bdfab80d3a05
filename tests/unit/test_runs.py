"""Run assembly: closing on run_end and on idle timeout, duplicates, late and out-of-order events."""

import pytest

from streams.detect.runs import RunAssembler

MIN = 60_000
T0 = 1_793_491_200_000


def event(event_id, run_id, kind, ts, **fields):
    base = {
        "event_id": event_id, "ts": ts, "type": kind, "run_id": run_id, "agent_id": "bot",
        "agent_version": "v1", "task_id": "", "session_id": "", "tenant": "", "environment": "",
        "input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0, "status": "ok",
        "error_type": "", "error_message": "", "tool": "", "args_hash": "", "outcome": "",
        "score": None, "cost_usd": None, "cost_source": "", "policy": "", "decision": "", "wait_ms": None,
    }
    base.update(fields)
    return base


def a_run(run_id, start, outcome="success", prefix=None):
    prefix = prefix or run_id
    return [
        event(f"{prefix}-0", run_id, "run_start", start),
        event(f"{prefix}-1", run_id, "llm_call", start + 1000, input_tokens=100, output_tokens=10,
              cost_usd=0.5, cost_source="reported"),
        event(f"{prefix}-2", run_id, "tool_call", start + 2000, tool="search", args_hash="h1", status="error"),
        event(f"{prefix}-3", run_id, "tool_call", start + 1500, tool="lookup", args_hash="h2"),
        event(f"{prefix}-4", run_id, "run_end", start + 3000, outcome=outcome),
    ]


def test_run_closes_at_run_end_with_its_numbers():
    rows = RunAssembler(30 * MIN).apply(a_run("r1", T0), now_ms=0)
    assert len(rows) == 1
    row = rows[0]
    assert row["outcome"] == "success"
    assert (row["steps"], row["llm_calls"], row["tool_calls"], row["tool_errors"]) == (3, 1, 2, 1)
    assert row["cost_usd"] == 0.5 and row["cost_source"] == "reported"
    assert row["duration_ms"] == 3000
    assert row["tool_path"] == ["lookup", "search"]  # by event time, not arrival
    assert row["version"] == 10 and row["event_count"] == 5


def test_a_retry_is_a_call_right_after_a_failed_call_of_the_same_tool_in_event_time():
    calls = [("search", "error", 1), ("search", "ok", 2), ("lookup", "timeout", 3), ("search", "ok", 4),
             ("search", "ok", 5), ("fetch", "timeout", 6), ("fetch", "timeout", 7), ("fetch", "ok", 8)]
    events = [event("s", "r1", "run_start", T0)] + [
        event(f"c{i}", "r1", "tool_call", T0 + at * 1000, tool=tool, status=status) for i, (tool, status, at) in enumerate(calls)]
    events.append(event("e", "r1", "run_end", T0 + 9000, outcome="success"))
    arrived = events[:1] + events[1:-1][::-1] + events[-1:]  # the calls arrive last first
    (row,) = RunAssembler(30 * MIN).apply(arrived, now_ms=0)
    assert row["tool_retries"] == ["search", "fetch", "fetch"]
    assert row["tool_errors"] == 4


def test_duplicates_are_applied_once():
    assembler = RunAssembler(30 * MIN)
    events = a_run("r1", T0)
    rows = assembler.apply(events[:3] + events[:3] + events[3:], now_ms=0)
    assert rows[0]["steps"] == 3 and rows[0]["cost_usd"] == 0.5
    assert assembler.duplicates == 3
    # A redelivery after the run closed changes nothing and emits nothing.
    assert assembler.apply(events, now_ms=0) == []


def test_idle_run_times_out_once_the_watermark_passes():
    assembler = RunAssembler(30 * MIN, allowed_lateness_ms=2 * MIN)
    open_run = a_run("idle", T0)[:3]
    assert assembler.apply(open_run, now_ms=0) == []
    # 31 minutes later, minus 2 minutes of lateness, is not yet 30 minutes of idleness.
    assert assembler.apply(a_run("other", T0 + 31 * MIN)[:1], now_ms=0) == []
    rows = assembler.apply(a_run("later", T0 + 33 * MIN)[:1], now_ms=0)
    assert [(row["run_id"], row["outcome"], row["closed_by"]) for row in rows] == [("idle", "timeout", "idle_timeout")]
    assert rows[0]["ended_at"] == T0 + 2000


def test_late_event_of_a_closed_run_updates_its_row():
    assembler = RunAssembler(30 * MIN)
    events = a_run("r1", T0)
    first = assembler.apply(events[:4] + events[4:], now_ms=0)[0]
    late = event("r1-late", "r1", "llm_call", T0 + 2500, input_tokens=5, cost_usd=0.25, cost_source="reported")
    second = assembler.apply([late], now_ms=0)[0]
    assert second["version"] > first["version"]
    assert second["cost_usd"] == 0.75 and second["llm_calls"] == 2


def test_closed_runs_are_forgotten_after_another_idle_timeout():
    assembler = RunAssembler(30 * MIN)
    assembler.apply(a_run("r1", T0), now_ms=0)
    assert "r1" in assembler.closed
    assembler.apply(a_run("r2", T0 + 61 * MIN), now_ms=0)
    assert "r1" not in assembler.closed and "r1" not in assembler.open and "r1" not in assembler.tombstones


def test_a_closed_run_is_kept_for_the_lateness_then_as_a_tombstone_that_counts_its_stragglers_late():
    assembler = RunAssembler(30 * MIN, allowed_lateness_ms=2 * MIN)  # kept for 2 minutes of watermark
    events = a_run("r1", T0)
    assembler.apply(events, now_ms=0)
    assert assembler.closed["r1"].frozen
    straggler = event("r1-late", "r1", "tool_call", T0 + 2500, tool="fetch", args_hash="h3")
    # the watermark 1 minute past the run: still kept, the straggler updates the row
    assembler.apply([event("o-1", "other", "run_start", T0 + 3 * MIN)], now_ms=0)
    (row,) = assembler.apply([straggler], now_ms=0)
    assert row["run_id"] == "r1" and row["tool_calls"] == 3 and row["event_count"] == len(events) + 1
    assert assembler.apply([straggler], now_ms=0) == [] and assembler.duplicates == 1  # frozen again, still deduplicated
    # the watermark 3 minutes past it: a tombstone, the next straggler is late and changes nothing
    assembler.apply([event("o-2", "other", "llm_call", T0 + 5 * MIN)], now_ms=0)
    assert "r1" not in assembler.closed and "r1" in assembler.tombstones
    late = assembler.late_events
    assert assembler.apply([event("r1-later", "r1", "tool_call", T0 + 2600, tool="fetch", args_hash="h4")], 0) == []
    assert assembler.late_events == late + 1 and "r1" not in assembler.open
    # another idle timeout after the run: forgotten
    assembler.apply([event("o-3", "other", "llm_call", T0 + 34 * MIN)], now_ms=0)
    assert "r1" not in assembler.tombstones


def test_a_redelivered_event_leaves_a_closed_run_small():
    """After a restart agents and the sink redeliver what was in flight: a closed run that has the
    events already stays frozen (thawed, it stayed large until forgotten: no row is made of a
    duplicate, which is what froze it again)."""
    assembler = RunAssembler(30 * MIN, allowed_lateness_ms=2 * MIN)
    events = a_run("r1", T0)
    assembler.apply(events, now_ms=0)
    assert assembler.closed["r1"].frozen
    assert assembler.apply(events, now_ms=0) == [] and assembler.duplicates == len(events)
    assert assembler.closed["r1"].frozen


def test_a_frozen_run_thaws_for_a_late_event_and_gives_the_row_it_would_have_given_whole():
    whole, frozen = RunAssembler(30 * MIN), RunAssembler(30 * MIN)
    events = a_run("r1", T0)
    late = [event("r1-x", "r1", "tool_call", T0 + 2400, tool="fetch", args_hash="h1", cost_usd=0.5,
                  cost_source="reported"), event("r1-y", "r1", "llm_call", T0 + 2600, input_tokens=7)]
    (expected,) = whole.apply(events + late, now_ms=0)
    frozen.apply(events, now_ms=0)
    (row,) = frozen.apply(late, now_ms=0)
    assert row == expected


def test_a_quiet_open_run_is_frozen_and_goes_on_as_it_would_have_whole():
    events = a_run("r1", T0)
    quiet = RunAssembler(30 * MIN, allowed_lateness_ms=2 * MIN)
    quiet.apply(events[:3], now_ms=0)
    # another run moves the watermark 2 minutes past r1's last event: r1 is quiet, frozen
    quiet.apply([event("o-1", "other", "run_start", T0 + 4 * MIN + 2000)], now_ms=0)
    assert "r1" in quiet.open and quiet.open["r1"].frozen
    assert quiet.apply(events[2:3], now_ms=0) == [] and quiet.duplicates == 1  # a redelivery: still frozen
    assert quiet.open["r1"].frozen
    (row,) = quiet.apply(events[3:], now_ms=0)
    (whole,) = RunAssembler(30 * MIN, allowed_lateness_ms=2 * MIN).apply(events, now_ms=0)
    assert row == whole


def test_a_quiet_frozen_run_closed_as_idle_is_not_frozen_again():
    quiet = RunAssembler(30 * MIN, allowed_lateness_ms=2 * MIN)
    quiet.apply(a_run("r1", T0)[:3], now_ms=0)
    quiet.apply([event("o-1", "other", "run_start", T0 + 4 * MIN + 2000)], now_ms=0)
    held = quiet.open["r1"].event_ids  # frozen while quiet
    rows = quiet.apply([event("o-2", "other", "run_start", T0 + 40 * MIN)], now_ms=0)
    assert [row["run_id"] for row in rows] == ["r1"]  # idle past the watermark
    assert quiet.closed["r1"].event_ids is held  # what it froze is kept, not copied again


def test_cost_sources_combine():
    assembler = RunAssembler(30 * MIN)
    events = a_run("r1", T0)
    events[1]["cost_source"] = "price_table"
    events.insert(2, event("r1-x", "r1", "llm_call", T0 + 1100, cost_usd=None, cost_source="unknown"))
    row = assembler.apply(events, now_ms=0)[0]
    assert row["cost_source"] == "unknown" and row["unpriced_calls"] == 1


def test_a_redelivery_after_the_run_was_forgotten_makes_no_phantom_run():
    assembler = RunAssembler(30 * MIN)
    events = a_run("r1", T0)
    assembler.apply(events, now_ms=0)
    assembler.apply(a_run("r2", T0 + 120 * MIN), now_ms=0)
    assert "r1" not in assembler.closed
    assert assembler.apply([events[1]], now_ms=0) == []
    assert assembler.late_events == 1 and "r1" not in assembler.open
    assert assembler.apply(a_run("r3", T0 + 200 * MIN)[:2], now_ms=0) == []


def test_governance_events_are_summed_per_run_and_are_not_steps():
    start = T0
    events = a_run("r1", start)[:-1] + [
        event("g1", "r1", "policy_hit", start + 1100, policy="pii", decision="redacted", tool="search"),
        event("g2", "r1", "policy_hit", start + 1200, policy="pii", decision="redacted"),
        event("g3", "r1", "policy_hit", start + 1300, policy="refund_limit", decision="blocked"),
        event("g4", "r1", "approval", start + 1400, status="requested"),
        event("g5", "r1", "approval", start + 1600, status="denied", wait_ms=200.0),
        event("g6", "r1", "approval", start + 1700, status="granted", wait_ms=90.0),
        event("g7", "r1", "approval", start + 1800, status=""),  # no status: stored, not counted
        event("g8", "r1", "feedback", start + 2900, score=0.2),
        event("g9", "r1", "feedback", start + 2950, score=0.6),
        event("g10", "r1", "feedback", start + 2960),  # no score: nothing to average
        event("r1-4", "r1", "run_end", start + 3000, outcome="escalated"),
    ]
    (row,) = RunAssembler(30 * MIN).apply(events, now_ms=0)
    assert row["steps"] == 3 and row["outcome"] == "escalated"
    assert row["policy_hits"] == {"pii:redacted": 2, "refund_limit:blocked": 1}
    assert (row["approvals_requested"], row["approvals_granted"], row["approvals_denied"],
            row["approvals_expired"]) == (1, 1, 1, 0)
    assert row["approval_waits_ms"] == [90.0, 200.0]
    assert row["feedback_count"] == 2 and row["feedback_score"] == pytest.approx(0.4)
    (plain,) = RunAssembler(30 * MIN).apply(a_run("r2", start), now_ms=0)
    assert (plain["policy_hits"], plain["approvals_requested"], plain["approval_waits_ms"], plain["feedback_score"]) == (
        {}, 0, [], None)


def test_feedback_after_the_end_counts_but_does_not_make_the_run_longer():
    assembler = RunAssembler(30 * MIN)
    (closed,) = assembler.apply(a_run("r1", T0), now_ms=0)
    (again,) = assembler.apply([event("late-feedback", "r1", "feedback", T0 + 40_000, score=1.0)], now_ms=1)
    assert again["feedback_count"] == 1 and again["event_count"] == closed["event_count"] + 1
    assert (again["ended_at"], again["duration_ms"]) == (closed["ended_at"], closed["duration_ms"]) == (T0 + 3000, 3000)
