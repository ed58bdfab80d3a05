"""Property: whatever mix of adversarial and valid messages arrives, the processors keep going,
every bad message ends in the DLQ topic and `dead_letters` with a reason, and every valid
event is processed (issue 6.3). Real broker, real processors, real chdb.

Which messages are bad is decided by the same `parse` the ingest stage uses (its rules are
unit-tested in tests/unit/test_events.py); this test checks the pipeline's accounting: each
message ends in exactly one place, and the stream goes on.
"""

from __future__ import annotations

import itertools

import orjson
import pytest
from confluent_kafka import Producer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.contracts.events import InvalidEvent, parse
from tests.conftest import read_to_end
from tests.fuzz import message, valid_event

pytestmark = pytest.mark.integration

_landed_ids: set[str] = set()  # valid event ids sent by earlier examples: a repeat counts once


def _outcome(value: bytes) -> str | None:
    """The event_id a message lands under, or None for a dead letter."""
    try:
        return parse(value)["event_id"]
    except InvalidEvent:
        return None


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(message, min_size=100, max_size=250))
def test_every_message_is_processed_or_a_dead_letter(stack, messages):
    before_events = stack.count("SELECT count() FROM events")
    before_dead = stack.count("SELECT count() FROM dead_letters")
    valid = [orjson.dumps(valid_event()) for _ in range(len(messages) // 2)]
    stream = [m for pair in itertools.zip_longest(messages, valid) for m in pair if m is not None]
    outcomes = [_outcome(m) for m in stream]
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}", "message.max.bytes": 16 << 20,
                         "linger.ms": 5})
    for value in stream:
        producer.produce("agent.events", value=value)
    assert producer.flush(30) == 0
    new_ids = {o for o in outcomes if o is not None} - _landed_ids
    _landed_ids.update(new_ids)
    want_events = len(new_ids)
    want_dead = sum(o is None for o in outcomes)
    assert stack.wait_for_count("SELECT count() FROM events", before_events + want_events) == before_events + want_events
    assert stack.wait_for_count("SELECT count() FROM dead_letters", before_dead + want_dead) == before_dead + want_dead
    # every dead letter says why
    assert stack.count("SELECT count() FROM dead_letters WHERE error = ''") == 0


def test_ten_megabyte_messages_are_dead_letters_and_the_stream_goes_on(stack):
    before = stack.count("SELECT count() FROM dead_letters WHERE payload_bytes >= 10000000")
    big = orjson.dumps({**valid_event(), "attributes": {"blob": "x" * 10_000_000}})
    after = orjson.dumps(valid_event())
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}", "message.max.bytes": 16 << 20})
    for value in (big, big, after):
        producer.produce("agent.events", value=value)
    assert producer.flush(30) == 0
    assert stack.wait_for_count(
        "SELECT count() FROM dead_letters WHERE payload_bytes >= 10000000", before + 2) == before + 2
    (row,) = stack.query("SELECT error, length(payload) AS kept FROM dead_letters WHERE payload_bytes >= 10000000 "
                         "LIMIT 1")
    assert "larger than the limit" in row["error"] and row["kept"] == 1 << 20  # the table keeps the first MB
    event_id = orjson.loads(after)["event_id"]
    assert stack.wait_for_count(f"SELECT count() FROM events WHERE event_id = '{event_id}'", 1) == 1


def test_the_dlq_topic_holds_every_dead_letter(stack):
    stack.wait_until_processed()
    on_topic, _ = read_to_end(stack.settings.kafka_config, "agent.events.dlq")
    assert len(on_topic) == stack.count("SELECT count() FROM dead_letters")
