"""Live loop alerts on the real broker and chdb: sent while the run goes on, resolved once, mirrored in `alerts`."""

import orjson
import pytest
from confluent_kafka import Producer

from tests.waiting import wait_until

pytestmark = pytest.mark.integration

T0 = 1_793_500_000_000


def _event(n, kind, **fields):
    return {"event_id": f"loop-run-{n}", "ts": T0 + n * 1000, "type": kind, "run_id": "loop-run",
            "agent_id": "looper", "agent_version": "v1", **fields}


def _alerts(stack, want: int, timeout: float = 30) -> list[dict]:
    """The alerts of loop-run on the topic, once there are `want` of them."""
    return wait_until(lambda: [alert for alert in stack.on_topic("trackside.alerts") if alert["run_id"] == "loop-run"],
                      timeout, f"{want} alerts of loop-run", done=lambda alerts: len(alerts) >= want)


def test_loop_alert_goes_out_while_the_run_is_open_and_resolves_at_its_end(stack):
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}"})
    lookup = {"tool": "lookup_order", "args": {"order": 42}}
    for event in [_event(0, "run_start")] + [_event(n, "tool_call", **lookup) for n in (1, 2, 3)]:
        producer.produce("agent.events", value=orjson.dumps(event), key=b"loop-run")
    producer.flush(10)

    (firing,) = _alerts(stack, 1)
    assert (firing["kind"], firing["status"], firing["action"], firing["severity"]) == ("loop", "firing", "stop_run", "critical")
    assert [call["tool"] for call in firing["evidence"]["calls"]] == ["lookup_order"] * 3
    assert stack.count("SELECT count() FROM runs WHERE run_id = 'loop-run'") == 0, "the run is still going"

    producer.produce("agent.events", value=orjson.dumps(_event(9, "run_end", outcome="aborted")), key=b"loop-run")
    producer.flush(10)
    assert stack.wait_for_count("SELECT count() FROM runs WHERE run_id = 'loop-run' AND loop_detected", 1) == 1
    alerts = _alerts(stack, 2)
    assert [alert["status"] for alert in alerts] == ["firing", "resolved"]
    assert alerts[0]["fingerprint"] == alerts[1]["fingerprint"]

    # The table mirrors the topic.
    assert stack.wait_for_count("SELECT count() FROM alerts WHERE run_id = 'loop-run'", 2) == 2
    stored = stack.query("SELECT alert_id, status, action, evidence FROM alerts WHERE run_id = 'loop-run' ORDER BY ts")
    assert [row["alert_id"] for row in stored] == [alert["alert_id"] for alert in alerts]
    assert orjson.loads(stored[0]["evidence"]) == alerts[0]["evidence"]

    # The firing alert asked to stop the run: one stop_run control, also when the same alert
    # comes again (as the processors may send it after a kill -9)
    producer.produce("trackside.alerts", value=orjson.dumps(firing), key=firing["fingerprint"].encode())
    producer.flush(10)
    stack.wait_until_processed()
    stops = [c for c in stack.on_topic("trackside.controls") if c["run_id"] == "loop-run"]
    assert [(c["action"], c["issued_by"], c["alert_id"]) for c in stops] == [("stop_run", "trackside", firing["alert_id"])]
    assert stack.wait_for_count("SELECT count() FROM controls WHERE run_id = 'loop-run'", 1) == 1


def test_a_malformed_message_on_the_alerts_topic_is_a_dead_letter(stack):
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}"})
    producer.produce("trackside.alerts", value=b'{"not": "an alert"}', key=b"x")
    producer.flush(10)
    assert stack.wait_for_count(
        "SELECT count() FROM dead_letters WHERE topic = 'trackside.alerts' AND error LIKE 'unreadable trackside.alerts message%'", 1
    ) == 1
