"""Rows the store will never take do not stall the sink (issue 11, defect 4). Real chdb.

chdb takes almost any value of the right type (it clamps dates, reads NULL as the default),
so the poison here is a row whose value the table's column type cannot hold: a negative
count for a UInt32 column, in a `trackside.metric-results` message as a processor could
send it. And a batch chdb itself refuses (TOO_MANY_PARTS: valid events spanning more than
100 months, the `events` partitions) is split until it lands, with nothing dead-lettered.
"""

import orjson
import pyarrow as pa
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from streams.contracts import tables
from tests.conftest import RunningStack

pytestmark = pytest.mark.integration

T0 = 1_793_700_000_000
MONTH_MS = 31 * 24 * 3600 * 1000


def _metrics_row(agent: str, runs: int) -> dict:
    row = {field.name: {} if pa.types.is_map(field.type) else 0 for field in tables.AGENT_METRICS}
    return {**row, "agent_id": agent, "agent_version": "v1", "window_start": T0, "window_end": T0 + 300_000,
            "runs": runs, "is_final": True, "version": 1, "updated_at": T0}


def _produce(stack: RunningStack, topic: str, values: list[bytes], partition: int = 0) -> list[int]:
    """Produce in one flush (so one poll of the sink is likely to hold them all); their offsets."""
    offsets: list[int] = []
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}", "linger.ms": 100})
    for value in values:
        producer.produce(topic, value=value, partition=partition,
                         on_delivery=lambda error, message: offsets.append(message.offset()))
    assert producer.flush(30) == 0
    return sorted(offsets)


def _dlq(stack: RunningStack) -> list:
    """Every message of the DLQ topic, read without a consumer group."""
    consumer = Consumer({"bootstrap.servers": f"127.0.0.1:{stack.port}", "group.id": "test-audit",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    partitions = range(stack.settings.partitions)
    consumer.assign([TopicPartition("agent.events.dlq", p, OFFSET_BEGINNING) for p in partitions])
    messages, ended = [], set()
    try:
        while len(ended) < len(partitions) and (message := consumer.poll(10)) is not None:
            if message.error() is None:
                messages.append(message)
            else:
                ended.add(message.partition())
    finally:
        consumer.close()
    return messages


def test_a_poison_row_is_dead_lettered_and_the_rest_of_the_poll_lands(stack):
    poison = {"metrics": [_metrics_row("poison-b", 2), _metrics_row("poison-bad", -1)]}
    values = [orjson.dumps({"metrics": [_metrics_row("poison-a", 1)]}), orjson.dumps(poison),
              orjson.dumps({"metrics": [_metrics_row("poison-c", 3)]})]
    offsets = _produce(stack, "trackside.metric-results", values)
    source = f"trackside.metric-results:0:{offsets[1]}"

    assert stack.wait_for_count(f"SELECT count() FROM dead_letters WHERE source = '{source}'", 1) == 1
    (dead,) = stack.query("SELECT error, payload FROM dead_letters WHERE source = {s:String}", {"s": source})
    assert "agent_metrics" in dead["error"] and dead["payload"] == values[1].decode()
    landed = "SELECT count() FROM agent_metrics WHERE agent_id IN ('poison-a', 'poison-b', 'poison-c')"
    assert stack.wait_for_count(landed, 3) == 3, "the good rows of the poll, and of the poison's message, land"
    assert stack.count("SELECT count() FROM agent_metrics WHERE agent_id = 'poison-bad'") == 0
    assert "bisected: 1 poison" in stack.output.read_text(errors="replace")
    (copy,) = [m for m in _dlq(stack) if dict(m.headers())["trackside.source"] == source.encode()]
    assert copy.value() == values[1] and b"agent_metrics" in dict(copy.headers())["trackside.error"]

    # the stream goes on
    event = {"event_id": "after-poison", "ts": T0, "type": "run_start", "run_id": "after-poison",
             "agent_id": "poison", "agent_version": "v1"}
    _produce(stack, "agent.events", [orjson.dumps(event)])
    assert stack.wait_for_count("SELECT count() FROM events WHERE event_id = 'after-poison'", 1) == 1


def test_a_batch_the_store_refuses_whole_is_split_and_lands(stack):
    # valid events (since 2000) over 101 months: one insert would span 101 partitions
    events = [{"event_id": f"old-{n}", "ts": 1_000_000_000_000 + n * MONTH_MS, "type": "run_start",
               "run_id": f"old-{n}", "agent_id": "backfill", "agent_version": "v1"} for n in range(101)]
    _produce(stack, "agent.events", [orjson.dumps(event) for event in events], partition=1)
    query = "SELECT count() FROM events WHERE agent_id = 'backfill'"
    assert stack.wait_for_count(query, len(events), timeout=60) == len(events)
    assert stack.count("SELECT count() FROM dead_letters WHERE source LIKE 'agent.events:1:%'") == 0
    assert "TOO_MANY_PARTS" in stack.output.read_text(errors="replace"), "the store refused the batch whole"
