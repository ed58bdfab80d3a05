"""Canary rollback, deployments and budgets through the real broker, processors and chdb."""

import orjson
import pytest
from confluent_kafka import Producer

from tests.conftest import RunningStack
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

T0 = 1_793_600_000_000
POLICY = """
[agents.spender.budget]
run_usd = 0.05
[tenants.globex]
day_usd = 0.01
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("rollouts")
    policy = data_dir / "policy.toml"
    policy.write_text(POLICY)
    running = RunningStack(data_dir, {"TRACKSIDE_POLICY_FILE": str(policy)})
    running.start()
    yield running
    assert running.stop() == 0


def _run_events(n: int, version: str, ok: bool, start: int, agent: str = "shop-bot") -> list[dict]:
    run_id = f"{agent}-{version}-{n}"
    base = {"run_id": run_id, "agent_id": agent, "agent_version": version}
    return [
        {**base, "event_id": f"{run_id}-0", "ts": start, "type": "run_start"},
        {**base, "event_id": f"{run_id}-1", "ts": start + 1000, "type": "llm_call", "model": "gpt-4o-mini",
         "input_tokens": 500, "output_tokens": 80, "cost_usd": 0.002},
        {**base, "event_id": f"{run_id}-2", "ts": start + 2000, "type": "tool_call", "tool": "lookup",
         "args": {"n": n}, "status": "ok"},
        {**base, "event_id": f"{run_id}-3", "ts": start + 3000, "type": "run_end",
         "outcome": "success" if ok else "failure"},
    ]


def test_a_bad_canary_is_rolled_back_once_with_its_evidence(stack: RunningStack):
    deployments = [
        {"agent_id": "shop-bot", "version": "v1", "role": "stable", "traffic_pct": 100, "ts": T0 - 86_400_000},
        {"agent_id": "shop-bot", "version": "v2", "role": "canary", "traffic_pct": 30, "ts": T0},
        {"agent_id": "shop-bot", "version": "v3", "role": "beta", "ts": T0},  # not a role: a dead letter
    ]
    lines = b"\n".join(orjson.dumps(d) for d in deployments)
    result = stack.cli("publish", "--deployments", "-", input=lines)
    assert b"produced=3" in result.stdout
    assert stack.wait_for_count("SELECT count() FROM deployments WHERE agent_id = 'shop-bot'", 2) == 2
    assert stack.wait_for_count("SELECT count() FROM dead_letters WHERE topic = 'agent.deployments'", 1) == 1
    (dead,) = stack.query("SELECT error FROM dead_letters WHERE topic = 'agent.deployments'")
    assert dead["error"].startswith("role: must be one of stable, canary")

    # 300 runs, one every 10 s: the canary takes 3 in 10 and succeeds 3 times in 10, stable 9 in 10
    events = []
    for n in range(300):
        canary = n % 10 in (1, 4, 7)
        events += _run_events(n, "v2" if canary else "v1", (n % 10 < 3) if canary else (n % 10 != 5),
                              T0 + n * 10_000)
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}"})
    for event in events:
        producer.produce("agent.events", value=orjson.dumps(event), key=event["run_id"].encode())
    producer.flush(10)

    wait_until(lambda: stack.on_topic("trackside.rollbacks"), 60, "a rollback")
    assert stack.wait_for_count("SELECT count() FROM runs WHERE agent_id = 'shop-bot'", 300) == 300
    stack.wait_until_processed()
    rollbacks = stack.on_topic("trackside.rollbacks")
    assert len(rollbacks) == 1, "at most one rollback per (agent, from_version)"
    (decision,) = rollbacks
    assert (decision["agent_id"], decision["from_version"], decision["to_version"]) == ("shop-bot", "v2", "v1")
    evidence = decision["evidence"]
    assert evidence["decision"] == "rollback" and 20 <= evidence["canary_runs"] < 90
    success = next(m for m in evidence["metrics"] if m["metric"] == "success_rate")
    assert success["worse"] and success["p_value"] <= success["threshold"]
    assert "success_rate" in decision["reason"]

    # the alerts it names are on the alerts topic and table; the table mirrors the rollback
    assert decision["alert_ids"]
    assert stack.wait_for_count("SELECT count() FROM rollbacks", 1) == 1
    (row,) = stack.query("SELECT rollback_id, alert_ids, evidence FROM rollbacks")
    assert row["rollback_id"] == decision["rollback_id"] and row["alert_ids"] == decision["alert_ids"]
    assert orjson.loads(row["evidence"]) == evidence
    stored = stack.query("SELECT alert_id, kind, status FROM alerts WHERE agent_id = 'shop-bot' AND "
                         "alert_id IN {ids:Array(String)}", {"ids": decision["alert_ids"]})
    assert {r["alert_id"] for r in stored} == set(decision["alert_ids"])
    assert {r["status"] for r in stored} == {"firing"} and "success_rate" in {r["kind"] for r in stored}
    (canary,) = stack.query("SELECT decision, stable_version, inferred FROM canaries WHERE agent_id = 'shop-bot'")
    assert canary == {"decision": "rollback", "stable_version": "v1", "inferred": False}
    # the rolled-back version is paused: one pause_version control by trackside, on the topic and in the table
    pauses = [c for c in stack.on_topic("trackside.controls") if c["action"] == "pause_version"]
    assert [(c["agent_id"], c["agent_version"], c["issued_by"], c["evidence"]["rollback_id"]) for c in pauses] == [
        ("shop-bot", "v2", "trackside", decision["rollback_id"])]
    assert stack.wait_for_count("SELECT count() FROM controls WHERE action = 'pause_version'", 1) == 1

    # deploy tooling takes the canary away: its alerts resolve, once each
    stack.cli("publish", "--deployments", "-", input=orjson.dumps(
        {"agent_id": "shop-bot", "version": "v2", "role": "canary", "traffic_pct": 0, "ts": T0 + 4_000_000}))
    resolved_sql = ("SELECT count() FROM alerts WHERE agent_id = 'shop-bot' AND status = 'resolved' "
                    "AND fingerprint IN (SELECT fingerprint FROM alerts WHERE alert_id IN {ids:Array(String)})")
    resolved = stack.wait_for_count(resolved_sql, len(decision["alert_ids"]), timeout=30,
                                    parameters={"ids": decision["alert_ids"]})
    assert resolved == len(decision["alert_ids"])


def test_a_run_over_its_cost_envelope_is_stopped_while_it_goes_on(stack: RunningStack):
    base = {"run_id": "spendy", "agent_id": "spender", "agent_version": "v1"}
    start = T0 + 5_000_000  # after the other test's runs: event time is per partition
    calls = [{**base, "event_id": f"spendy-{n}", "ts": start + n * 1000, "type": "llm_call", "model": "gpt-4o",
              "input_tokens": 1000, "output_tokens": 100, "cost_usd": 0.03} for n in range(2)]
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}"})
    for event in calls:
        producer.produce("agent.events", value=orjson.dumps(event), key=b"spendy")
    producer.flush(10)
    alerts = wait_until(lambda: stack.on_topic("trackside.alerts"), 60, "an alert on the run spendy",
                        done=lambda alerts: any(a["run_id"] == "spendy" for a in alerts))
    (alert,) = [a for a in alerts if a["run_id"] == "spendy"]
    assert (alert["kind"], alert["status"], alert["action"]) == ("budget", "firing", "stop_run")
    assert alert["evidence"]["limit_usd"] == 0.05 and alert["evidence"]["cost_usd"] == pytest.approx(0.06)
    assert stack.count("SELECT count() FROM runs WHERE run_id = 'spendy'") == 0, "the run is still going"


def test_a_tenant_budget_sums_runs_of_agents_on_other_partitions(stack: RunningStack):
    # alpha and beta live on metrics partitions 2 and 3, tenant globex on 1 (of 4): each run's
    # cost travels to the tenant's partition, and the third run goes over $0.01
    assert stack.settings.partitions == 4
    start = T0 + 6_000_000
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}"})
    for n, agent in enumerate(["alpha", "beta", "alpha"]):
        for event in _run_events(n, "v1", True, start + n * 60_000, agent=agent):
            event["tenant"] = "globex"
            if event["type"] == "llm_call":
                event["cost_usd"] = 0.004
            producer.produce("agent.events", value=orjson.dumps(event), key=event["run_id"].encode())
    producer.flush(10)
    alerts = wait_until(lambda: stack.on_topic("trackside.alerts"), 60, "a tenant_day budget alert",
                        done=lambda alerts: any(a["kind"] == "budget" and a["evidence"].get("scope") == "tenant_day"
                                                for a in alerts))
    (alert,) = [a for a in alerts if a["kind"] == "budget" and a["evidence"].get("scope") == "tenant_day"]
    assert alert["evidence"]["subject"] == "globex" and alert["evidence"]["runs"] == 3
    assert alert["evidence"]["spent_usd"] == pytest.approx(0.012)
