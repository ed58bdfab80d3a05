"""Validation of agent events: every malformed kind is rejected with its reason; valid ones normalise."""

import json
from pathlib import Path

import orjson
import pytest

from streams.contracts.events import COLUMNS, InvalidEvent, args_hash, json_schema, parse
from tests.malformed import GOOD, MALFORMED


@pytest.mark.parametrize(("name", "value", "reason"), MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_is_rejected_with_its_reason(name, value, reason):
    with pytest.raises(InvalidEvent) as caught:
        parse(value)
    assert reason in str(caught.value)


def test_there_are_at_least_twenty_kinds_of_malformed_message():
    assert len({name for name, _, _ in MALFORMED}) >= 20


def test_valid_event_is_normalised_to_every_column():
    event = parse(orjson.dumps(GOOD))
    assert set(event) == set(COLUMNS)
    assert event["ts"] == 1_793_491_200_000
    assert event["status"] == "ok"  # default for calls
    assert event["cost_usd"] is None


def test_epoch_millis_and_rfc3339_give_the_same_time():
    as_text = parse(orjson.dumps({**GOOD, "ts": "2026-11-01T01:00:00.250+01:00"}))
    as_millis = parse(orjson.dumps({**GOOD, "ts": 1_793_491_200_250}))
    assert as_text["ts"] == as_millis["ts"]


def test_oversized_message_is_rejected_before_decoding():
    with pytest.raises(InvalidEvent, match="larger than the limit"):
        parse(orjson.dumps({**GOOD, "attributes": {"blob": "x" * 2000}}), max_bytes=1000)


def test_tool_args_are_hashed_canonically_and_not_kept_by_default():
    base = {**GOOD, "type": "tool_call", "tool": "search"}
    first = parse(orjson.dumps({**base, "args": {"q": "shoes", "page": 1}}))
    second = parse(orjson.dumps({**base, "args": {"page": 1, "q": "shoes"}}))
    other = parse(orjson.dumps({**base, "args": {"q": "shoes", "page": 2}}))
    assert first["args_hash"] == second["args_hash"] != other["args_hash"]
    assert first["args"] == ""
    kept = parse(orjson.dumps({**base, "args": {"q": "shoes"}}), keep_raw_args=True)
    assert json.loads(kept["args"]) == {"q": "shoes"}
    assert kept["args_hash"] == args_hash('{"q":"shoes"}')


def test_other_event_types_are_accepted():
    for kind in ("approval", "policy_hit", "feedback"):
        assert parse(orjson.dumps({**GOOD, "type": kind}))["type"] == kind


def test_committed_json_schema_is_the_generated_one():
    committed = json.loads((Path(__file__).parents[2] / "streams/contracts/schemas/agent-event.json").read_text())
    assert committed == json_schema()


def test_fields_outside_the_contract_are_kept_in_attributes():
    event = parse(orjson.dumps({**GOOD, "gpu": "a100", "attributes": {"team": "x"}}))
    assert json.loads(event["attributes"]) == {"gpu": "a100", "team": "x"}


def test_a_field_given_twice_is_rejected_not_guessed():
    from streams.contracts.events import InvalidEvent, parse

    twice = (b'{"event_id": "a", "ts": 1793491200000, "type": "run_start", "run_id": "r", "agent_id": "x", '
             b'"agent_version": "v1", "event_id": "b"}')
    try:
        parse(twice)
    except InvalidEvent as error:
        assert "field 'event_id': given more than once" in str(error)
    else:
        raise AssertionError("a duplicate event_id was accepted")
    # a field name that is also a value, or repeated inside attributes, is fine
    fine = (b'{"event_id": "run_id", "ts": 1793491200000, "type": "run_start", "run_id": "r", "agent_id": "x", '
            b'"agent_version": "v1", "attributes": {"a": {"k": 1}, "b": {"k": 2}}}')
    assert parse(fine)["event_id"] == "run_id"


def test_money_too_large_for_its_column_is_refused_not_wrapped():
    # Decimal(18, 9) holds less than 1e9: pyarrow's unsafe cast (kept for rounding) turned
    # 1e10 into 0 silently; now the row is refused, and the sink sends it to the dead letters.
    import pyarrow as pa

    from streams.contracts import tables

    schema = pa.schema([("cost_usd", pa.decimal128(18, 9))])
    assert tables.to_arrow([{"cost_usd": 0.1}, {"cost_usd": None}], schema).column(0).to_pylist()[0] == \
        pa.array([0.1], pa.float64()).cast(pa.decimal128(18, 9), safe=False).to_pylist()[0]
    with pytest.raises(pa.ArrowInvalid, match="cost_usd"):
        tables.to_arrow([{"cost_usd": 0.5}, {"cost_usd": 1e10}], schema)


def test_governance_fields_are_checked_and_stored_in_their_columns():
    base = {"event_id": "e", "ts": 1_793_491_200_000, "run_id": "r", "agent_id": "a", "agent_version": "v"}
    approval = parse(orjson.dumps({**base, "type": "approval", "status": "denied", "action": "refund $500",
                                   "approver": "kim", "wait_ms": 42_000}))
    assert (approval["status"], approval["action"], approval["approver"], approval["wait_ms"]) == (
        "denied", "refund $500", "kim", 42_000.0)
    hit = parse(orjson.dumps({**base, "type": "policy_hit", "policy": "pii", "decision": "redacted", "tool": "email"}))
    assert (hit["policy"], hit["decision"], hit["tool"]) == ("pii", "redacted", "email")
    feedback = parse(orjson.dumps({**base, "type": "feedback", "score": 0.25, "label": "wrong", "source": "user"}))
    # `source` of `events` is where the message was read from: the feedback's own goes beside it
    assert (feedback["score"], feedback["label"], feedback["feedback_source"]) == (0.25, "wrong", "user")
    assert "source" not in feedback and feedback["attributes"] == ""
    # every type-specific field is optional
    assert parse(orjson.dumps({**base, "type": "approval"}))["status"] == ""
    for kind, field, value in (("approval", "status", "maybe"), ("policy_hit", "decision", "shrugged"),
                               ("feedback", "score", 1.5), ("approval", "wait_ms", -1)):
        with pytest.raises(InvalidEvent, match=field):
            parse(orjson.dumps({**base, "type": kind, field: value}))
