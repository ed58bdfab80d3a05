"""Governance signals on the real broker and chdb: approval, policy_hit and feedback events land in
their columns, are summed per run and per window, and a guardrail spike is one `policy` alert."""

import orjson
import pytest
from confluent_kafka import Producer

from streams.store.saved_queries import load_query
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

T0 = 1_793_599_800_000  # a window boundary
WINDOW = 300_000
AGENT = "guarded"
BASELINE_WINDOWS, RUNS_PER_WINDOW, SPIKE = 12, 30, 12  # the spike window: 12 of its 30 runs blocked


def _run(window: int, i: int, *, blocked: bool) -> list[dict]:
    run_id = f"{AGENT}-{window}-{i}"
    start = T0 + window * WINDOW + i * 5_000

    def event(n: int, kind: str, **fields) -> dict:
        return {"event_id": f"{run_id}-{n}", "ts": start + n * 100, "type": kind, "run_id": run_id,
                "agent_id": AGENT, "agent_version": "v1", **fields}

    events = [event(0, "run_start"), event(1, "llm_call", model="gpt-4o-mini", input_tokens=100, output_tokens=10),
              event(2, "tool_call", tool="refund", args={"order": i})]
    if blocked:
        events.append(event(3, "policy_hit", policy="refund_limit", decision="blocked", tool="refund"))
    if i % 10 == 0:  # a human gate: asked, then decided after a wait
        events += [event(4, "approval", status="requested", action="refund over $200"),
                   event(5, "approval", status="denied" if i % 20 == 0 else "granted", wait_ms=1_000.0 * (1 + i),
                         approver="kim")]
    if i % 3 == 0:
        events.append(event(7, "feedback", score=0.5 if blocked else 1.0, source="user", label="thumbs"))
    events.append(event(6, "run_end", outcome="escalated" if i % 15 == 1 else "success"))
    return events


def _fleet() -> list[dict]:
    events = []
    for window in range(BASELINE_WINDOWS + 1):
        tripped = SPIKE if window == BASELINE_WINDOWS else 1
        for i in range(RUNS_PER_WINDOW):
            events += _run(window, i, blocked=i < tripped)
    # later runs move every partition's watermark past the spike window and its lateness
    for i in range(RUNS_PER_WINDOW):
        events += _run(BASELINE_WINDOWS + 2, i, blocked=False)
    return events


def test_governance_signals_are_summed_and_a_guardrail_spike_alerts_once(stack):
    events = _fleet()
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}"})
    for event in events:
        producer.produce("agent.events", value=orjson.dumps(event), key=event["run_id"].encode())
    assert producer.flush(30) == 0
    runs = len({event["run_id"] for event in events})
    assert stack.wait_for_count(f"SELECT count() FROM runs WHERE agent_id = '{AGENT}'", runs) == runs

    # each field in its column
    gate = stack.query(f"SELECT status, action, approver, wait_ms FROM events WHERE run_id = '{AGENT}-0-0' "
                       "AND type = 'approval' ORDER BY ts")
    assert gate == [{"status": "requested", "action": "refund over $200", "approver": "", "wait_ms": None},
                    {"status": "denied", "action": "", "approver": "kim", "wait_ms": 1000.0}]
    (hit,) = stack.query(f"SELECT policy, decision, tool FROM events WHERE run_id = '{AGENT}-0-0' AND type = 'policy_hit'")
    assert hit == {"policy": "refund_limit", "decision": "blocked", "tool": "refund"}
    (feedback,) = stack.query(f"SELECT score, label, feedback_source, startsWith(source, 'agent.events:') AS read "
                              f"FROM events WHERE run_id = '{AGENT}-0-0' AND type = 'feedback'")
    assert feedback == {"score": 0.5, "label": "thumbs", "feedback_source": "user", "read": 1}

    # per run
    (run,) = stack.query(f"SELECT steps, policy_hits, approvals_requested, approvals_denied, approval_waits_ms, "
                         f"feedback_count, feedback_score FROM runs WHERE run_id = '{AGENT}-0-0'")
    assert run == {"steps": 2, "policy_hits": {"refund_limit:blocked": 1}, "approvals_requested": 1,
                   "approvals_denied": 1, "approval_waits_ms": [1000.0], "feedback_count": 1, "feedback_score": 0.5}

    # per window: the spike window, once final
    spike_start = T0 + BASELINE_WINDOWS * WINDOW
    window = wait_until(lambda: stack.query(
        "SELECT runs, policy_hits, policy_hits_by, guardrail_runs, guardrail_rate, approvals_requested, "
        "approvals_granted, approvals_denied, approval_wait_p50_ms, escalations, escalation_steps_p50, "
        "feedback_count, feedback_score FROM agent_metrics WHERE agent_id = {agent:String} "
        "AND window_start = fromUnixTimestamp64Milli({start:Int64}, 'UTC')", {"agent": AGENT, "start": spike_start}),
        30, "the spike window's row", done=lambda rows: rows and rows[0]["runs"] == RUNS_PER_WINDOW)[0]
    assert window["policy_hits"] == SPIKE and window["policy_hits_by"] == {"refund_limit:blocked": SPIKE}
    assert window["guardrail_runs"] == SPIKE and window["guardrail_rate"] == pytest.approx(SPIKE / RUNS_PER_WINDOW)
    # gates at i = 0, 10, 20: denied at 0 and 20, waits 1, 11 and 21 s
    assert (window["approvals_requested"], window["approvals_granted"], window["approvals_denied"]) == (3, 1, 2)
    assert window["approval_wait_p50_ms"] == 11_000.0
    assert (window["escalations"], window["escalation_steps_p50"]) == (2, 2.0)  # i = 1 and 16
    assert window["feedback_count"] == 10  # i = 0, 3, ..., 27: 4 of them blocked (score 0.5), 6 not (1.0)
    assert window["feedback_score"] == pytest.approx((4 * 0.5 + 6 * 1.0) / 10)

    # one `policy` alert for the spike, naming the policy, mirrored in `alerts`
    alerts = wait_until(lambda: [a for a in stack.on_topic("trackside.alerts") if a["agent_id"] == AGENT], 30,
                        "the policy alert", done=lambda found: any(a["kind"] == "policy" for a in found))
    (policy,) = [a for a in alerts if a["kind"] == "policy"]
    assert (policy["status"], policy["agent_version"], policy["severity"]) == ("firing", "v1", "critical")
    assert policy["evidence"]["window"] == spike_start and policy["evidence"]["flagged_runs"] == SPIKE
    assert policy["evidence"]["baseline_runs"] == BASELINE_WINDOWS * RUNS_PER_WINDOW
    assert "refund_limit:blocked" in policy["summary"]
    assert not [a for a in alerts if a["kind"] == "escalation"], "the escalation rate did not change"
    assert stack.wait_for_count(f"SELECT count() FROM alerts WHERE kind = 'policy' AND agent_id = '{AGENT}'", 1) == 1

    # the saved query an on-call engineer opens next
    sql, params = load_query("guardrail_hits")
    (row,) = stack.query(sql, {**params, "agent_id": AGENT, "days": 1})
    assert (row["policy"], row["decision"], row["runs_hit"], row["alert_firing"]) == ("refund_limit", "blocked",
                                                                                      BASELINE_WINDOWS + SPIKE, 1)
