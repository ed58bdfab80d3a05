"""Restarts on the real broker and chdb: per-run state and windows survive, nothing is counted twice."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer

from jobs.simulate import DEFAULT_START_MS, CanarySpec, FleetConfig, genai_prices_fn, simulate, truth
from streams.contracts.controls import STOP_RUN, subject_of
from streams.client import Trackside, VersionPaused
from streams.contracts.topics import EVENT_BATCHES
from streams.processors.app import APP_ID
from tests.conftest import RunningStack, committed_offsets
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


def _fleet(seed: int, runs: int = 200, canary: CanarySpec | None = None, **config) -> tuple[list[dict], dict]:  # noqa: ANN003
    events = list(simulate(FleetConfig(seed=seed, runs=runs, price_fn=genai_prices_fn, canary=canary, **config)))
    return events, truth(events, price_fn=genai_prices_fn)


def _publish(stack: RunningStack, events: list[dict]) -> None:
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}", "linger.ms": 5})
    for event in events:
        producer.produce("agent.events", value=orjson.dumps(event), key=event["run_id"].encode())
    assert producer.flush(30) == 0


def _check_everything_landed_once(stack: RunningStack, events: list[dict], expected: dict) -> None:
    runs = expected["runs"]
    assert stack.wait_for_count("SELECT count() FROM runs", len(runs)) == len(runs)
    assert stack.count("SELECT count() FROM events") == len({event["event_id"] for event in events})
    landed = {
        row["run_id"]: (row["outcome"], row["steps"], round(row["cost"], 9))
        for row in stack.query("SELECT run_id, outcome, steps, toFloat64(cost_usd) AS cost FROM runs")
    }
    assert landed == {run_id: (run["outcome"], run["steps"], round(run["cost_usd"], 9)) for run_id, run in runs.items()}
    stack.wait_until_processed()
    in_windows = stack.count("SELECT sum(runs) FROM agent_metrics")
    assert in_windows == len(runs), stack.query(
        "SELECT agent_id, agent_version, toStartOfFiveMinutes(ended_at) AS w, count() AS runs FROM runs "
        "GROUP BY ALL EXCEPT SELECT agent_id, agent_version, window_start, runs FROM agent_metrics"
    )
    for row in stack.query(
        "SELECT agent_id, agent_version, toFloat64(sum(cost_usd)) AS cost, sum(successes) AS successes "
        "FROM agent_metrics GROUP BY agent_id, agent_version"
    ):
        group = expected["groups"][(row["agent_id"], row["agent_version"])]
        assert row["successes"] == group["successes"]
        assert row["cost"] == pytest.approx(group["cost_usd"], rel=1e-6)


def _ids_on_topic(stack: RunningStack, topic: str = "trackside.alerts", key: str = "alert_id") -> list[str]:
    """Every id sent on a topic, once the stack has processed everything (so sent all it will)."""
    stack.wait_until_processed()
    return [message[key] for message in stack.on_topic(topic)]


def _episode(control: dict) -> tuple[str, str, str]:
    """What an automatic control is about, once (SPEC §9): (action, subject, episode), the episode
    being the alert that asked for a stop_run or the rollback of a pause_version."""
    episode = control["alert_id"] if control["action"] == STOP_RUN else control["evidence"]["rollback_id"]
    return control["action"], subject_of(control), episode


def _split_mid_run(events: list[dict]) -> int:
    """An index in the middle of the stream where several runs are open."""
    return len(events) // 2


def test_kill_9_of_the_faust_worker_mid_stream_loses_and_doubles_nothing(tmp_path):
    # a clearly bad canary at 30% from the 30th minute, so that a rollback decision is in the
    # stream too (at 50% it had more runs than the stable version: by SPEC §5 it is the stable one)
    canary = CanarySpec("support-bot", "v1.6.0-rc1", share=0.3, success_rate=0.2, cost_multiplier=3.0,
                        start_ms=DEFAULT_START_MS + 30 * 60_000)
    events, expected = _fleet(seed=21, runs=300, canary=canary)
    half = _split_mid_run(events)
    stack = RunningStack(tmp_path / "stack")
    stack.start()
    try:
        _publish(stack, events[:half])
        first_half = len({e["event_id"] for e in events[:half]})
        assert stack.wait_for_count("SELECT count() FROM events", first_half) == first_half
        wait_until(lambda: committed_offsets(stack.settings.kafka_config, APP_ID, EVENT_BATCHES.name), 60,
                   "the worker to commit part of the first half", done=lambda offsets: sum(offsets.values()) > 0)
        pid = int((stack.data_dir / "run/worker-0.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        _publish(stack, events[half:])
        _check_everything_landed_once(stack, events, expected)
        assert "worker-0 exited" in stack.output.read_text()
        sent = _ids_on_topic(stack)
        assert sent, "the fleet raises loop and failure-cluster alerts"
        twice = [i for i in set(sent) if sent.count(i) > 1]
        assert not twice, ("an alert went out twice", stack.query(
            "SELECT kind, status, agent_id, agent_version, run_id, summary FROM alerts "
            "WHERE alert_id IN {ids:Array(String)}", {"ids": twice}))
        rollbacks = _ids_on_topic(stack, "trackside.rollbacks", "rollback_id")
        assert len(rollbacks) == len(set(rollbacks)), "a rollback went out twice"
        # roles are inferred here (no deployment events): other newer versions may be judged too
        assert "v1.6.0-rc1" in {row["from_version"] for row in stack.query("SELECT from_version FROM rollbacks")}
        # Every control asked for is on the topic once and in `controls` once: a stop_run per
        # firing alert that asks for one, a pause_version per rollback decision.
        asked = Counter(
            [(STOP_RUN, alert["run_id"], alert["alert_id"]) for alert in stack.on_topic("trackside.alerts")
             if alert["status"] == "firing" and alert.get("action") == STOP_RUN and alert.get("run_id")]
            + [("pause_version", f"{decision['agent_id']}/{decision['from_version']}", decision["rollback_id"])
               for decision in stack.on_topic("trackside.rollbacks")])
        assert any(action == STOP_RUN for action, _, _ in asked), "the fleet loops: some alerts ask to stop runs"
        controls = stack.on_topic("trackside.controls")
        assert Counter(_episode(control) for control in controls) == asked
        ids = _ids_on_topic(stack, "trackside.controls", "control_id")
        assert len(ids) == len(set(ids)) == sum(asked.values()), "a control went out twice"
        assert stack.wait_for_count("SELECT count() FROM controls", len(ids)) == len(ids)  # FINAL: one row an id
        stored = stack.query("SELECT control_id, action, run_id, agent_id, agent_version, alert_id, evidence, "
                             "issued_by FROM controls")
        assert Counter(_episode({**row, "evidence": orjson.loads(row["evidence"])}) for row in stored) == asked
        assert {row["control_id"] for row in stored} == set(ids)
        assert {row["issued_by"] for row in stored} == {"trackside"}
    finally:
        assert stack.stop() == 0


def test_a_control_sent_before_a_restart_of_up_is_not_sent_again_and_pauses_stay_in_force(tmp_path):
    # The sink remembers the controls it sent; that memory is in `up`, so after a restart it
    # is read back from `controls` (the embedded broker forgets its topics, the store does not).
    # What asked for them comes again (a real Kafka redelivers what was not committed): nothing.
    # The pauses in force are put back on the fresh broker's topic, where agent clients learn them.
    t0 = 1_793_500_000_000
    stack = RunningStack(tmp_path / "stack")
    stack.start()
    try:
        lookup = {"type": "tool_call", "tool": "lookup_order", "args": {"order": 42}}
        _publish(stack, [{"event_id": f"loop-{n}", "ts": t0 + n * 1000, "run_id": "loop-run", "agent_id": "looper",
                          "agent_version": "v2", **({"type": "run_start"} if n == 0 else lookup)} for n in range(4)])
        (alert,) = wait_until(lambda: stack.on_topic("trackside.alerts"), 60, "the loop alert", done=bool)
        assert (alert["status"], alert["action"]) == ("firing", STOP_RUN)
        decision = {"rollback_id": "rollback-looper-v2", "ts": t0 + 5000, "agent_id": "looper", "from_version": "v2",
                    "to_version": "v1", "reason": "loops", "alert_ids": [alert["alert_id"]], "evidence": {}}
        producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}"})
        producer.produce("trackside.rollbacks", value=orjson.dumps(decision), key=b"looper")
        assert producer.flush(10) == 0
        # a version paused and resumed by hand is not in force
        for command in ("pause", "resume"):
            assert stack.cli(command, "looper", "v0", "--reason", "by hand").returncode == 0
        assert stack.wait_for_count("SELECT count() FROM controls", 4) == 4
        before = {row["control_id"]: row["action"] for row in stack.query("SELECT control_id, action FROM controls")}
        assert sorted(before.values()) == ["pause_version", "pause_version", "resume_version", "stop_run"]
        (pause,) = [c for c in stack.on_topic("trackside.controls") if c["action"] == "pause_version" and c["agent_version"] == "v2"]
    finally:
        assert stack.stop() == 0
    stack.start()
    try:
        # the fresh broker holds the pause in force, as it was sent, and nothing else
        assert stack.on_topic("trackside.controls") == [pause]
        client = Trackside(f"127.0.0.1:{stack.port}", "looper", "v2")
        try:
            with pytest.raises(VersionPaused, match="rolled back to v1"):
                client.start_run(wait_s=30)
        finally:
            client.close()
        # the same alert and decision again, and a new alert: only the new one is a control
        other = {**alert, "alert_id": "another-alert", "run_id": "another-run"}
        producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}"})
        for value in (alert, other):
            producer.produce("trackside.alerts", value=orjson.dumps(value), key=value["fingerprint"].encode())
        producer.produce("trackside.rollbacks", value=orjson.dumps(decision), key=b"looper")
        assert producer.flush(10) == 0
        stack.wait_until_processed()  # the sink sends a control before it commits what asked for it
        sent = [control for control in stack.on_topic("trackside.controls") if control != pause]
        assert [(control["action"], control["run_id"], control["alert_id"]) for control in sent] == [
            (STOP_RUN, "another-run", "another-alert")], "a control sent before the restart went out again"
        assert stack.wait_for_count("SELECT count() FROM controls", 5) == 5
        after = {row["control_id"] for row in stack.query("SELECT control_id FROM controls")}
        assert after == set(before) | {sent[0]["control_id"]}
    finally:
        assert stack.stop() == 0


def test_open_runs_survive_a_restart_of_the_whole_stack(tmp_path):
    events, expected = _fleet(seed=22)
    half = _split_mid_run(events)
    stack = RunningStack(tmp_path / "stack")
    stack.start()
    _publish(stack, events[:half])
    stack.wait_for_count("SELECT count() FROM events", len({e["event_id"] for e in events[:half]}))
    stack.wait_until_processed()
    assert stack.stop() == 0
    # The embedded broker forgets everything; the store remembers the open runs' events.
    stack.start()
    try:
        _publish(stack, events[half:])
        _check_everything_landed_once(stack, events, expected)
    finally:
        assert stack.stop() == 0


def test_up_recovers_after_kill_9(tmp_path):
    stack = RunningStack(tmp_path / "stack")
    stack.start()
    children = [int(path.read_text().split()[0]) for path in (stack.data_dir / "run").glob("*.pid")]
    assert len(children) == 2  # broker and worker-0
    stack.process.send_signal(signal.SIGKILL)
    stack.process.wait(10)
    wait_until(lambda: [pid for pid in children if Path(f"/proc/{pid}").exists()], 10,
               "the children to end with up's kill -9", done=lambda alive: not alive)
    stack.start()
    try:
        events, expected = _fleet(seed=23)
        _publish(stack, events)
        assert stack.wait_for_count("SELECT count() FROM runs", len(expected["runs"])) == len(expected["runs"])
    finally:
        assert stack.stop() == 0


def test_a_clean_stop_lands_what_the_embedded_broker_still_holds(tmp_path):
    # A fleet published much faster than the sink lands it (small polls, each one committed),
    # then SIGTERM at once: the broker keeps nothing when it stops, so `up` lands its backlog
    # before it stops the broker.
    events, expected = _fleet(seed=24, runs=2_000)
    stack = RunningStack(tmp_path / "stack", {"TRACKSIDE_INGEST_BATCH_MAX": "100"})
    stack.start()
    try:
        _publish(stack, events)  # every event acknowledged by the broker
        backlog = len(events) - stack.count("SELECT count() FROM events")
    finally:
        assert stack.stop() == 0
    stopping = stack.output.read_text()
    assert backlog > len(events) // 4, "the sink kept up: nothing was left to drain"
    stack.start()
    try:
        assert stack.count("SELECT count() FROM events") == len({event["event_id"] for event in events})
        assert "into the store in" in stopping, stopping[-1500:]  # the drain's log line
        # The runs come back from the stored events, without new traffic for the ones that
        # ended (the assemblers are woken at start) ...
        ended = {run_id for run_id, run in expected["runs"].items() if run["outcome"] != "timeout"}
        wait_until(lambda: {row["run_id"] for row in stack.query("SELECT run_id FROM runs")}, 90,
                   "the runs that ended before the stop", done=lambda landed: ended <= landed)
        # ... and the ones that time out once event time moves on (a later fleet)
        later, later_expected = _fleet(seed=25, runs=200, start_ms=DEFAULT_START_MS + 6 * 3_600_000)
        _publish(stack, later)
        want = len(expected["runs"]) + len(later_expected["runs"])
        assert stack.wait_for_count("SELECT count() FROM runs", want) == want
    finally:
        assert stack.stop() == 0
