"""Failure modes across the fleet on the real broker and chdb: one root cause failing agents of
different metrics partitions, after different tools and in different versions, is one mode with its
breakdown per agent and version; a near miss (the same exception class, another cause) is another;
and the mode that spreads to a second agent is one incident, sent again with the same fingerprint."""

from collections import Counter

import orjson
import pytest
from confluent_kafka import Producer

from streams.contracts.topics import agent_partition
from tests.conftest import RunningStack
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

T0 = 1_793_610_000_000  # a window boundary
MIN = 60_000
AGENTS = ("modes-booking", "modes-support", "modes-refunds")
TOOLS = ("search_flights", "get_booking", "send_email", "issue_refund")
PAYMENTS = ("ConnectionError: HTTPSConnectionPool(host='payments.internal', port=443): Max retries exceeded with "
            "url: /v2/charges/ch_{n}a9f (Caused by NewConnectionError('Failed to establish a new connection: "
            "[Errno 111] Connection refused'))")
MISSING = "1 validation error for {model}\n{field}\n  Field required [type=missing, input_value={{'id': {n}}}, input_type=dict]"
RANGE = ("1 validation error for {model}\nquantity\n  Input should be less than or equal to 10 "
         "[type=less_than_equal, input_value={n}, input_type=int]")


def _run(run_id: str, agent: str, version: str, at: int, tool: str, outcome: str = "success",
         error_type: str = "", message: str = "") -> list[dict]:
    def event(n: int, kind: str, **fields) -> dict:
        return {"event_id": f"{run_id}-{n}", "ts": at + n * 200, "type": kind, "run_id": run_id,
                "agent_id": agent, "agent_version": version, **fields}

    end = {"outcome": outcome, **({"error_type": error_type, "error_message": message} if message else {})}
    return [event(0, "run_start"), event(1, "llm_call", model="gpt-4o-mini", input_tokens=200, output_tokens=20),
            event(2, "tool_call", tool=tool, args={"n": run_id}), event(3, "run_end", **end)]


def _fleet() -> tuple[list[dict], dict[str, str]]:
    """(events, run_id -> family). The payments outage fails booking from minute 2 and support
    from minute 20; missing fields fail booking and refunds; a quantity out of range fails support."""
    events, family = [], {}
    for minute in range(40):
        for a, agent in enumerate(AGENTS):
            at = T0 + minute * MIN + a * 7_000
            run_id = f"{agent}-{minute}"
            tool = TOOLS[(minute + a) % len(TOOLS)]  # the last tool has nothing to do with the failure
            version = f"v{1 + minute % 2}"
            cause = None
            if minute >= 2 and minute % 3 == 2 and (agent == AGENTS[0] or (agent == AGENTS[1] and minute >= 20)):
                cause = ("payments", "failure", "", PAYMENTS.format(n=minute * 7919))
            elif minute % 5 == 1 and agent in (AGENTS[0], AGENTS[2]):
                cause = ("missing_field", "failure", "ValidationError",
                         MISSING.format(model=("CreateOrder", "RefundRequest")[minute % 2],
                                        field=("customer_id", "email", "booking_ref")[minute % 3], n=minute))
            elif minute % 5 == 3 and agent == AGENTS[1]:
                cause = ("out_of_range", "failure", "ValidationError", RANGE.format(model="CreateOrder", n=40 + minute))
            if cause is None:
                events += _run(run_id, agent, version, at, tool)
            else:
                events += _run(run_id, agent, version, at, tool, *cause[1:])
                family[run_id] = cause[0]
    # later runs move every partition's watermark on
    for a, agent in enumerate(AGENTS):
        events += _run(f"{agent}-late", agent, "v1", T0 + 50 * MIN + a, TOOLS[0])
    return events, family


def test_one_mode_per_cause_across_agents_and_one_incident_as_it_spreads(stack):
    partitions = stack.settings.partitions
    assert len({agent_partition(agent, partitions) for agent in AGENTS}) > 1  # the agents' runs close apart
    events, family = _fleet()
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}"})
    spread_at = T0 + 20 * MIN

    def publish(part: list[dict]) -> None:
        for event in part:
            producer.produce("agent.events", value=orjson.dumps(event), key=event["run_id"].encode())
        assert producer.flush(30) == 0

    # as it happens: the outage in one agent first, its incident, then its spread to a second agent
    publish([e for e in events if e["ts"] < spread_at])
    first = wait_until(
        lambda: stack.query("SELECT evidence FROM alerts FINAL WHERE kind = 'failure_cluster' "
                            "AND agent_id = {agent:String}", {"agent": AGENTS[0]}),
        90, "the incident of the outage in one agent",
        done=lambda alerts: any("ConnectionError" in orjson.loads(a["evidence"])["label"] for a in alerts))
    assert first
    publish([e for e in events if e["ts"] >= spread_at])
    failed = wait_until(
        lambda: stack.query("SELECT run_id, agent_id, agent_version, failure_cluster_id FROM runs FINAL "
                            "WHERE agent_id IN {agents:Array(String)} AND outcome != 'success'", {"agents": list(AGENTS)}),
        120, "every failed run with its mode",
        done=lambda rows: len(rows) == len(family) and all(row["failure_cluster_id"] for row in rows))
    # The runs' rows with their modes say the last failed run was clustered, not that everything it
    # gave has landed: the modes' rows and breakdown are other tables of that result, the incidents
    # of the other two modes go through the alerts topic. Read them once the whole pipeline has
    # committed what it read (the suite flaked once, cause unproven; these reads were its races).
    stack.wait_until_processed()
    modes: dict[str, set[str]] = {}
    for row in failed:
        modes.setdefault(family[row["run_id"]], set()).add(row["failure_cluster_id"])
    assert all(len(ids) == 1 for ids in modes.values()), modes
    mode = {name: next(iter(ids)) for name, ids in modes.items()}
    assert len(set(mode.values())) == 3  # the near miss (same class, another cause) is a mode of its own

    rows = {row["cluster_id"]: row for row in stack.query(
        "SELECT cluster_id, agent_id, size, agents, kind, label FROM failure_clusters FINAL "
        "WHERE cluster_id IN {ids:Array(String)}", {"ids": list(mode.values())})}
    payments = rows[mode["payments"]]
    assert payments["agents"] == sorted(AGENTS[:2]) and payments["agent_id"] == AGENTS[0]
    assert payments["size"] == sum(name == "payments" for name in family.values())
    assert payments["kind"] == "failure|connection" and payments["label"].startswith("ConnectionError: HTTPSConnectionPool(host=<str>")
    assert rows[mode["missing_field"]]["agents"] == sorted((AGENTS[0], AGENTS[2]))
    breakdown = stack.query(
        "SELECT agent_id, agent_version, runs FROM failure_cluster_agents FINAL WHERE cluster_id = {id:String}",
        {"id": mode["payments"]})
    expected: dict[tuple[str, str], int] = {}
    for row in failed:
        if family[row["run_id"]] == "payments":
            key = (row["agent_id"], row["agent_version"])
            expected[key] = expected.get(key, 0) + 1
    assert {(r["agent_id"], r["agent_version"]): r["runs"] for r in breakdown} == expected
    assert len(expected) == 4  # two agents, two versions each

    incidents = wait_until(
        lambda: stack.query("SELECT alert_id, fingerprint, status, agent_id, evidence FROM alerts FINAL "
                            "WHERE kind = 'failure_cluster' AND JSONExtractString(evidence, 'cluster_id') = {id:String} "
                            "ORDER BY ts", {"id": mode["payments"]}),
        60, "the payments incident, sent again when it spread", done=lambda alerts: len(alerts) >= 2)
    assert len({a["fingerprint"] for a in incidents}) == 1 and len({a["alert_id"] for a in incidents}) == len(incidents)
    assert [a["status"] for a in incidents] == ["firing", "firing"]
    assert {a["agent_id"] for a in incidents} == {AGENTS[0]}
    agents = [orjson.loads(a["evidence"])["agents"] for a in incidents]
    assert agents == [[AGENTS[0]], sorted(AGENTS[:2])]
    assert orjson.loads(incidents[1]["evidence"])["versions"][AGENTS[1]]
    # one incident per mode, not one per agent: nothing else fired about these agents' failures
    fingerprints = {row["fingerprint"] for row in stack.query(
        "SELECT fingerprint FROM alerts FINAL WHERE kind = 'failure_cluster' "
        "AND JSONExtractString(evidence, 'cluster_id') IN {ids:Array(String)}", {"ids": list(mode.values())})}
    assert len(fingerprints) == 3


def _incidents(stack: RunningStack, agent: str) -> list[dict]:
    """The `failure_cluster` alerts about the mode that failed `agent` first, as stored."""
    return [{**row, "evidence": orjson.loads(row["evidence"])} for row in stack.query(
        "SELECT alert_id, fingerprint, status, agent_id, evidence FROM alerts FINAL "
        "WHERE kind = 'failure_cluster' AND agent_id = {agent:String} ORDER BY ts", {"agent": agent})]


def test_an_open_incident_survives_a_restart_of_up_and_is_updated_as_the_mode_spreads(tmp_path):
    """The payments outage fails one agent, its incident fires; `up` restarts; the outage spreads to
    a second agent (of another metrics partition): the same incident is updated to list both, never
    sent again as new, and resolves once the fleet has run an hour without it."""
    first, second = "restart-booking", "restart-support"
    stack = RunningStack(tmp_path / "stack")
    assert agent_partition(first, stack.settings.partitions) != agent_partition(second, stack.settings.partitions)
    producer_config = {"bootstrap.servers": f"127.0.0.1:{stack.port}"}

    def publish(minutes: range, failing: set[str]) -> None:
        producer = Producer(producer_config)
        for minute in minutes:
            for a, agent in enumerate((first, second)):
                run_id = f"{agent}-{minute}"
                cause = ("failure", "", PAYMENTS.format(n=minute * 7919)) if agent in failing else ()
                for event in _run(run_id, agent, "v1", T0 + minute * MIN + a * 7_000, TOOLS[minute % 4], *cause):
                    producer.produce("agent.events", value=orjson.dumps(event), key=run_id.encode())
        assert producer.flush(30) == 0

    stack.start()
    try:
        publish(range(0, 6), failing={first})  # six failed runs of the first agent
        (fired,) = wait_until(lambda: _incidents(stack, first), 90, "the incident of the outage in one agent")
        assert (fired["status"], fired["evidence"]["condition"], fired["evidence"]["agents"]) == ("firing", "new", [first])
        stack.wait_until_processed()  # the mode's rows landed too
    finally:
        assert stack.stop() == 0
    stack.start()
    try:
        publish(range(6, 12), failing={first, second})
        updated = wait_until(lambda: _incidents(stack, first), 90, "the incident updated with the second agent",
                             done=lambda alerts: any(second in a["evidence"]["agents"] for a in alerts))
        # the outage is over (its 12 failed runs folded in: those of the second agent come from
        # another partition, which a loaded machine may run minutes behind), then an hour and more
        # of runs that all succeed: the mode is quiet
        stack.wait_until_processed()
        publish(range(70, 100, 5), failing=set())
        alerts = wait_until(lambda: _incidents(stack, first), 90, "the incident resolved once quiet",
                            done=lambda alerts: any(a["status"] == "resolved" for a in alerts))
        stack.wait_until_processed()
        alerts = _incidents(stack, first)
        assert [a["alert_id"] for a in updated] == [a["alert_id"] for a in alerts][: len(updated)]
        # one incident: one fingerprint, one episode, fired once as new, updated once, resolved once
        assert {a["fingerprint"] for a in alerts} == {fired["fingerprint"]}
        assert {a["evidence"]["episode"] for a in alerts} == {fired["evidence"]["episode"]}
        assert [(a["status"], a["evidence"]["agents"]) for a in alerts] == [
            ("firing", [first]), ("firing", sorted((first, second))), ("resolved", sorted((first, second)))]
        assert alerts[1]["evidence"]["spread_to"] == second and alerts[0]["alert_id"] == fired["alert_id"]
        assert alerts[2]["evidence"]["size"] == 6 + 12
        # and nothing else about these failures: no incident named after the second agent, none sent twice
        assert _incidents(stack, second) == []
        # (the embedded broker keeps its topics in memory: what it holds was sent after the restart)
        sent = Counter(a["alert_id"] for a in stack.on_topic("trackside.alerts") if a["kind"] == "failure_cluster")
        assert set(sent) == {a["alert_id"] for a in alerts[1:]} and set(sent.values()) == {1}
    finally:
        assert stack.stop() == 0
