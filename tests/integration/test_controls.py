"""Controls by hand (SPEC §9): `trackside stop / pause / resume` put a control on
`trackside.controls`, keyed by its subject, and the `controls` table mirrors the topic; a control
for a run nobody knows is stored and harmless; what is not a control is a dead letter."""

import getpass

import orjson
import pytest
from confluent_kafka import Producer

from tests.conftest import read_to_end

pytestmark = pytest.mark.integration


def test_controls_by_hand_land_on_the_topic_and_in_the_table(stack):
    assert stack.cli("stop", "run-nobody-knows", "--reason", "looping on search", "--by", "ana").returncode == 0
    assert stack.cli("pause", "support-bot", "v2", "--reason", "bad canary").returncode == 0
    assert stack.cli("resume", "support-bot", "v2", "--reason", "fixed", "--by", "deploy-bot").returncode == 0
    refused = stack.cli("pause", "support-bot", "v2", check=False)  # no reason: refused, nothing sent
    assert refused.returncode == 2 and b"--reason" in refused.stderr
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}"})
    producer.produce("trackside.controls", value=b'{"action": "stop_run"}', key=b"r")
    assert producer.flush(10) == 0

    messages, _ = read_to_end(stack.settings.kafka_config, "trackside.controls")
    sent = sorted(((message.key(), orjson.loads(message.value())) for message in messages),
                  key=lambda sent: sent[1].get("ts", 1 << 62))  # the malformed one last
    assert [(key, control["action"], control.get("issued_by")) for key, control in sent] == [
        (b"run-nobody-knows", "stop_run", "ana"), (b"support-bot/v2", "pause_version", getpass.getuser()),
        (b"support-bot/v2", "resume_version", "deploy-bot"), (b"r", "stop_run", None)]
    # a version's controls share a key, so a compacted topic keeps its latest state in one partition
    assert len({message.partition() for message in messages if message.key() == b"support-bot/v2"}) == 1
    assert stack.wait_for_count("SELECT count() FROM controls", 3) == 3
    rows = stack.query("SELECT control_id, action, agent_id, agent_version, run_id, reason, issued_by FROM controls "
                       "ORDER BY ts")
    assert [(row["action"], row["run_id"], row["agent_id"], row["agent_version"], row["reason"]) for row in rows] == [
        ("stop_run", "run-nobody-knows", "", "", "looping on search"),
        ("pause_version", "", "support-bot", "v2", "bad canary"),
        ("resume_version", "", "support-bot", "v2", "fixed")]
    assert {row["control_id"] for row in rows} == {control["control_id"] for _, control in sent[:3]}
    sql = "SELECT count() FROM dead_letters WHERE topic = 'trackside.controls' AND error LIKE '%epoch milliseconds%'"
    assert stack.wait_for_count(sql, 1) == 1
