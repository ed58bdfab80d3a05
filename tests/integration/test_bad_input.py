"""Property: whatever mix of adversarial and valid messages arrives, the processors keep going,
every bad message ends in the DLQ topic and `dead_letters` with a reason, and every valid
event is processed (issue 6.3). Real broker, real processors, real chdb.

Which messages are bad is decided by the same `parse` the ingest stage uses (its rules are
unit-tested in tests/unit/test_events.py); this test checks the pipeline's accounting: each
message ends in exactly one place, and the stream goes on.
"""

from __future__ import annotations

import itertools
import json

import orjson
import pytest
from confluent_kafka import Producer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.contracts.events import InvalidEvent, parse
from tests.conftest import read_to_end

pytestmark = pytest.mark.integration

T0 = 1_793_700_000_000
_ids = itertools.count()

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                      st.text(max_size=30))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


def _dumps(value) -> bytes:  # noqa: ANN001
    # the standard library writes what orjson refuses: integers past 64 bits, Infinity
    return json.dumps(value).encode()


def _valid(kind: str = "llm_call") -> dict:
    n = next(_ids)
    return {"event_id": f"ok-{n}", "ts": T0 + n, "type": kind, "run_id": f"run-{n % 50}", "agent_id": "fuzz",
            "agent_version": "v1", "model": "gpt-4o-mini", "input_tokens": 10, "output_tokens": 2}


@st.composite
def mutated(draw) -> bytes:
    """A valid event with one thing wrong (or, sometimes, harmlessly odd)."""
    event = _valid(draw(st.sampled_from(["llm_call", "tool_call", "run_start", "run_end"])))
    event["event_id"] = f"m-{next(_ids)}"
    how = draw(st.sampled_from(["drop", "retype", "extra", "type", "ts", "huge", "nest", "dup", "nan", "utf8"]))
    field = draw(st.sampled_from(sorted(event)))
    if how == "drop":
        event.pop(field)
    elif how == "retype":
        event[field] = draw(json_value)
    elif how == "extra":  # unknown fields are kept in attributes: still valid
        event[draw(st.text(min_size=1, max_size=12))] = draw(json_value)
    elif how == "type":
        event["type"] = draw(st.text(max_size=20))
    elif how == "ts":
        event["ts"] = draw(st.one_of(st.integers(-2**63, 2**63), st.sampled_from(
            ["1970-01-01T00:00:00Z", "2999-01-01T00:00:00Z", "2026-13-45T99:00:00Z", "yesterday", ""])))
    elif how == "huge":
        event[field] = "x" * draw(st.sampled_from([5_000, 300_000, 1_200_000]))
    elif how == "nest":
        depth = draw(st.sampled_from([50, 2_000]))
        event["attributes"] = json.loads("[" * depth + "]" * depth) if depth < 1000 else None
        if depth >= 1000:
            return _dumps(event)[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
    elif how == "dup":
        raw = _dumps(event)
        return raw[:-1] + b', "' + field.encode() + b'": ' + _dumps(draw(json_value)) + b"}"
    elif how == "nan":
        raw = _dumps(event)
        return raw[:-1] + b', "cost_usd": ' + draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999"])) + b"}"
    elif how == "utf8":
        raw = _dumps(event)
        return raw.replace(b'"fuzz"', b'"fu\xff\xfezz"')
    return _dumps(event)


message = st.one_of(
    mutated(),
    st.binary(max_size=300),  # noise
    json_value.map(_dumps),  # JSON that is not an event
)


_landed_ids: set[str] = set()  # valid event ids sent by earlier examples: a repeat counts once


def _outcome(value: bytes) -> str | None:
    """The event_id a message lands under, or None for a dead letter."""
    try:
        return parse(value)["event_id"]
    except InvalidEvent:
        return None


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(message, min_size=400, max_size=700))
def test_every_message_is_processed_or_a_dead_letter(stack, messages):
    before_events = stack.count("SELECT count() FROM events")
    before_dead = stack.count("SELECT count() FROM dead_letters")
    valid = [orjson.dumps(_valid()) for _ in range(len(messages) // 2)]
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
    big = orjson.dumps({**_valid(), "attributes": {"blob": "x" * 10_000_000}})
    after = orjson.dumps(_valid())
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
