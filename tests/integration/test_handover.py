"""The sink's hand-overs to the processors under a message size limit (issue 11, defect 2).

Tansu enforces no message size (we measured: neither a topic's `max.message.bytes` nor a
broker limit; 20 MB messages are taken), so the limit here is librdkafka's own: the sink's
producer gets `message.max.bytes` = 30 KB through TRACKSIDE_KAFKA_MESSAGE_MAX_BYTES and
refuses larger messages with MSG_SIZE_TOO_LARGE. Events here pack to ~3.5 KB, so a batch of
ten in one partition is already over it; the sink's batches are cut at 20 KB.
"""


import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from streams.ingest.sink import GROUP
from tests.waiting import wait_until
from tests.conftest import RunningStack, metric_value

pytestmark = pytest.mark.integration

PRODUCER_LIMIT = 30_000
HANDOVER_LIMIT = 20_000
LIMITS = {"TRACKSIDE_KAFKA_MESSAGE_MAX_BYTES": str(PRODUCER_LIMIT), "TRACKSIDE_HANDOVER_MAX_BYTES": str(HANDOVER_LIMIT)}
T0 = 1_793_700_000_000


def _run(run: str, ts: int, message: str) -> list[dict]:
    """A run of four events: start, two failing tool calls with `message`, end."""
    common = {"run_id": run, "agent_id": "handover", "agent_version": "v1"}
    return [
        {**common, "event_id": f"{run}-0", "ts": ts, "type": "run_start"},
        *({**common, "event_id": f"{run}-{i}", "ts": ts + i, "type": "tool_call", "tool": "search",
           "status": "error", "error_message": message} for i in (1, 2)),
        {**common, "event_id": f"{run}-3", "ts": ts + 3, "type": "run_end", "outcome": "failure"},
    ]


def _publish(stack: RunningStack, events: list[dict], partition: int = 0) -> None:
    """All to one partition in one flush, so that the sink's polls hold many events of it."""
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}", "linger.ms": 200})
    for event in events:
        producer.produce("agent.events", value=orjson.dumps(event), key=event["run_id"].encode(), partition=partition)
    assert producer.flush(30) == 0


def _event_batches(stack: RunningStack, partition: int) -> list[bytes]:
    """Every message of trackside.event-batches in `partition`, read without a consumer group."""
    consumer = Consumer({"bootstrap.servers": f"127.0.0.1:{stack.port}", "group.id": "test-audit",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    consumer.assign([TopicPartition("trackside.event-batches", partition, OFFSET_BEGINNING)])
    values = []
    try:
        while (message := consumer.poll(10)) is not None and message.error() is None:
            values.append(message.value())
    finally:
        consumer.close()
    return values


def _failures(stack: RunningStack) -> float:
    return metric_value(stack.metrics(), 'trackside_handover_failures_total{topic="trackside.event-batches"}')


def test_batches_stay_under_the_limit_and_every_run_is_assembled(tmp_path):
    runs = 60
    events = [event for n in range(runs) for event in _run(f"h-{n}", T0 + n * 10, "x" * 1500 + "é" * 500)]
    stack = RunningStack(tmp_path / "stack", LIMITS)
    stack.start()
    try:
        _publish(stack, events)
        assert stack.wait_for_count("SELECT count() FROM runs WHERE agent_id = 'handover'", runs) == runs
        batches = _event_batches(stack, 0)
        assert len(batches) > 1 and max(map(len, batches)) <= HANDOVER_LIMIT
        assert sum(len(orjson.loads(batch)["events"]) for batch in batches) >= len(events)
        assert "trackside_handover_failures_total{" not in stack.metrics()
    finally:
        assert stack.stop() == 0


def test_a_refused_hand_over_holds_the_offsets_is_counted_and_logged(tmp_path):
    # Seven text fields of 4096 three-byte characters: one event packs to ~86 KB, over the
    # producer's limit however it is batched: the broker side never takes it.
    wide = "€" * 4096
    refused = {"event_id": "wide", "ts": T0, "type": "tool_call", "run_id": "wide", "agent_id": "handover",
               "agent_version": "v1", "task_id": wide, "session_id": wide, "tenant": wide, "environment": wide,
               "error_type": wide, "error_message": wide, "tool": wide, "status": "error"}
    first = _run("before", T0, "fine")
    stack = RunningStack(tmp_path / "stack", LIMITS)
    stack.start()
    try:
        _publish(stack, first)
        assert stack.wait_for_count("SELECT count() FROM runs WHERE run_id = 'before'", 1) == 1
        wait_until(lambda: stack.committed(GROUP, "agent.events").get(0), 30, "the first run's offsets committed",
                   done=lambda offset: offset == len(first))

        _publish(stack, [refused, *_run("after", T0 + 10, "fine")])
        wait_until(lambda: "the broker refused" in stack.output.read_text(errors="replace"), 30, "the refusal logged")
        assert "offsets not committed" in stack.output.read_text(errors="replace")
        metrics = stack.metrics()
        assert metric_value(metrics, 'trackside_handover_failures_total{topic="trackside.event-batches"}') >= 1
        assert metric_value(metrics, "trackside_handover_retrying") == 1
        # retries go on, and the offsets stay before the refused event
        wait_until(lambda: _failures(stack), 30, "a second refused attempt", done=lambda failures: failures >= 2)
        assert stack.committed(GROUP, "agent.events")[0] == len(first)
        assert stack.count("SELECT count() FROM runs WHERE run_id = 'after'") == 0
    finally:
        assert stack.stop() == 0


def test_thousands_of_runs_closing_at_once_reach_the_store_in_messages_under_the_limit(tmp_path):
    # 2,000 runs left open (no run_end), then one event 35 minutes later: the watermark passes
    # them all in one batch, and their rows (~1.3 MB) are more than one message may hold (faust's
    # producer refuses 1 MB): they travel in parts, and none goes to the dead letters.
    runs = 2_000
    common = {"agent_id": "handover", "agent_version": "v1"}
    events = [{**common, "event_id": f"open-{n}", "ts": T0 + n, "type": "run_start", "run_id": f"open-{n}",
               "task_id": f"task-{n}-" + "t" * 400} for n in range(runs)]
    later = {**common, "event_id": "later", "ts": T0 + 35 * 60_000, "type": "run_start", "run_id": "later"}
    stack = RunningStack(tmp_path / "stack")
    stack.start()
    try:
        _publish(stack, events)
        assert stack.wait_for_count("SELECT count() FROM events", runs) == runs
        _publish(stack, [later])
        assert stack.wait_for_count("SELECT count() FROM runs WHERE outcome = 'timeout'", runs) == runs
        stack.wait_until_processed()
        assert stack.count("SELECT count() FROM dead_letters") == 0
        # the metrics stage's rows too: each closed run is in its window
        assert stack.count("SELECT sum(runs) FROM agent_metrics WHERE agent_id = 'handover'") == runs
    finally:
        assert stack.stop() == 0
