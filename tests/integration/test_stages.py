"""The processor stages on the real broker and chdb: a message that raises is a dead letter and the
stage goes on; a stage that stops raises a `pipeline` alert, resolved when it catches up."""

import os
import signal

import orjson
import pytest
from confluent_kafka import Producer

from streams.contracts.messages import EventBatch
from tests.conftest import RunningStack, metric_value, read_to_end
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

T0 = 1_793_491_200_000


def _run(run_id: str, ts: int) -> list[dict]:
    base = {"run_id": run_id, "agent_id": "stages", "agent_version": "v1"}
    return [{**base, "event_id": f"{run_id}-0", "ts": ts, "type": "run_start"},
            {**base, "event_id": f"{run_id}-1", "ts": ts + 1000, "type": "tool_call", "tool": "search", "args": {}},
            {**base, "event_id": f"{run_id}-2", "ts": ts + 2000, "type": "run_end", "outcome": "success"}]


def _produce(stack: RunningStack, topic: str, values: list[bytes], key: bytes | None = None, **options) -> None:
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}"})
    for value in values:
        producer.produce(topic, value=value, key=key, **options)
    assert producer.flush(30) == 0


def _publish(stack: RunningStack, events: list[dict]) -> None:
    for event in events:
        _produce(stack, "agent.events", [orjson.dumps(event)], key=event["run_id"].encode())


def test_a_message_that_raises_is_a_dead_letter_and_the_stage_goes_on(tmp_path):
    stack = RunningStack(tmp_path / "stack")
    stack.start()
    try:
        _publish(stack, _run("before", T0))
        wait_until(lambda: stack.count("SELECT count() FROM runs WHERE run_id = 'before'"), 60, "the first run")
        # A batch whose rows are not packed events: the assembler raises on it. Before the
        # guard, that ended the faust agent and no run was assembled again.
        bad = EventBatch(0, [["not", "an", "event"]]).encode()
        _produce(stack, "trackside.event-batches", [bad], partition=0)
        _publish(stack, _run("after", T0 + 60_000))
        wait_until(lambda: stack.count("SELECT count() FROM runs WHERE run_id = 'after'"), 60,
                   "a run assembled after the message that raised")
        (letter,) = wait_until(
            lambda: stack.query("SELECT source, error, payload FROM dead_letters WHERE topic = 'trackside.event-batches'"),
            30, "the dead letter of the batch that raised")
        assert letter["source"].startswith("trackside.event-batches:0:")
        assert letter["error"].startswith("assemble_runs raised ") and letter["payload"] == bad.decode()
        assert metric_value(stack.metrics(), 'trackside_stage_failures_total{stage="assemble_runs"}') == 1
        messages, _ = read_to_end(stack.settings.kafka_config, "agent.events.dlq")
        (copy,) = [m for m in messages if dict(m.headers())["trackside.source"].decode() == letter["source"]]
        assert copy.value() == bad
    finally:
        assert stack.stop() == 0


def test_a_stopped_stage_raises_a_pipeline_alert_resolved_when_it_catches_up(tmp_path):
    stack = RunningStack(tmp_path / "stack", {"TRACKSIDE_PIPELINE_LAG_ALERT_SECONDS": "3"})
    stack.start()
    worker = int((stack.data_dir / "run/worker-0.pid").read_text().split()[0])
    try:
        _publish(stack, _run("warm", T0))
        wait_until(lambda: stack.count("SELECT count() FROM runs"), 60, "a first run")
        metrics = stack.metrics()
        assert metric_value(metrics, 'trackside_stage_lag_seconds{stage="assemble_runs"}') < 3
        os.kill(worker, signal.SIGSTOP)  # the faust worker stops processing, alive
        try:
            _publish(stack, _run("stuck", T0 + 60_000))
            # both stages live in the stopped worker; the assembler has the new events in hand
            (firing,) = wait_until(
                lambda: stack.query("SELECT evidence, summary FROM alerts WHERE kind = 'pipeline' AND status = 'firing' "
                                    "AND JSONExtractString(evidence, 'stage') = 'assemble_runs'"),
                30, "a pipeline alert about the assembler while the worker is stopped")
            assert orjson.loads(firing["evidence"])["lag_seconds"] > 3
            assert metric_value(stack.metrics(), 'trackside_stage_lag_seconds{stage="assemble_runs"}') > 3
        finally:
            os.kill(worker, signal.SIGCONT)
        wait_until(lambda: stack.count("SELECT count() FROM runs WHERE run_id = 'stuck'"), 60, "the run once resumed")
        wait_until(lambda: stack.count("SELECT countIf(status = 'firing') - countIf(status = 'resolved') "
                                       "FROM alerts WHERE kind = 'pipeline'"),
                   30, "every pipeline alert resolved", done=lambda still_firing: still_firing == 0)
    finally:
        assert stack.stop() == 0


def test_the_embedded_brokers_memory_is_in_metrics_and_alerts_past_its_bound(tmp_path):
    stack = RunningStack(tmp_path / "stack", {"TRACKSIDE_BROKER_MEMORY_ALERT_BYTES": "1000000"})  # 1 MB: passed at once
    stack.start()
    try:
        broker = int((stack.data_dir / "run/broker.pid").read_text().split()[0])
        resident = wait_until(
            lambda: next((float(line.split()[-1]) for line in stack.metrics().splitlines()
                          if line.startswith("trackside_broker_resident_bytes ")), None),
            30, "the broker's memory in /metrics", done=lambda value: value is not None and value > 1e6)
        with open(f"/proc/{broker}/status") as status:  # the figure is the broker's own VmRSS
            vm_rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
        assert 0.5 < resident / vm_rss < 2
        (firing,) = wait_until(
            lambda: [a for a in stack.on_topic("trackside.alerts") if a["kind"] == "pipeline"
                     and a["evidence"].get("bound_bytes") == 1_000_000], 30, "the broker memory alert")
        assert firing["status"] == "firing" and firing["evidence"]["resident_bytes"] > 1_000_000
    finally:
        assert stack.stop() == 0
