"""The bulk decoder of the ingest stage (streams/ingest/decode.py) against `contracts.events.parse`:
the same row or the same reason for every message, whatever is thrown at it. No services."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.simulate import FleetConfig, simulate
from streams.contracts import events as contract
from streams.contracts.events import InvalidEvent, parse
from streams.ingest import decode
from streams.ingest.decode import decode_events, event_row
from tests.fuzz import json_value, message
from tests.malformed import MALFORMED

T0 = 1_793_491_200_000


def one_by_one(values: list[bytes | None], **options) -> list:  # noqa: ANN003
    out = []
    for value in values:
        try:
            out.append(event_row(parse(value, **options)))
        except InvalidEvent as error:
            out.append(str(error))
    return out


def in_bulk(values: list[bytes | None], **options) -> list:  # noqa: ANN003
    return [str(row) if isinstance(row, InvalidEvent) else row for row in decode_events(values, **options)]


_edge_text = st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "\t\n", "é" * 4096, "é" * 4097, "x" * 256,
                                                              "x" * 257, "\u2028", "😀" * 3]))
# Per field kind: values the contract takes, and odd ones (edges on both sides, wrong types).
_VALID = {
    "id": st.text(st.characters(codec="utf-8"), min_size=1, max_size=8).filter(lambda text: not text.isspace()),
    "text": st.text(max_size=12),
    "count": st.integers(0, 10**9),
    "amount": st.one_of(st.floats(0, 1e9), st.integers(0, 10**9)),
    "fraction": st.floats(0, 1),
    "object": st.dictionaries(st.text(max_size=6), json_value, max_size=4),
    "timestamp": st.one_of(st.integers(T0 - 10**11, T0), st.floats(T0, T0 + 1e6),
                           st.sampled_from(["2026-11-01T00:00:00Z", "2026-11-01T00:00:00.5+02:00"])),
}
_ODD = {
    "id": st.sampled_from(["  ", "", "x" * 256, "y" * 257, "é" * 256, "\u00a0"]),
    "text": _edge_text,
    "count": st.sampled_from([-1, 10**9 + 1, 2**64, True, 1.0, 1.5, "1"]),
    "amount": st.sampled_from([-0.0, -1e-9, 1e9 + 1, 1e300, True, "1", 2**70]),
    "fraction": st.sampled_from([0, 1, 1.0000001, -0.1]),
    "object": json_value,
    "timestamp": st.sampled_from(["2026-11-01", "2026-11-01T00:00:00", "1999-12-31T23:59:59Z", "soon", 1e30, -5,
                                  T0 + 10**12, 946_684_800_000, 946_684_799_999]),
}


@st.composite
def event_message(draw) -> bytes:  # noqa: ANN001
    """An event of any type with any of its fields (and sometimes a field of another type, an
    unknown one, a null, a wrong type or a repeated required field), written by orjson or by
    the standard library (which escapes non-ASCII as \\uXXXX)."""
    kind = draw(st.sampled_from(contract.EVENT_TYPES + ("teleport",)))
    event: dict = {"type": kind}
    fields = contract.COMMON_FIELDS + contract.TYPE_FIELDS.get(kind, ())
    for field in fields:
        if field.name == "type":
            continue
        if field.required and draw(st.integers(0, 30)) == 0:
            continue  # missing
        if not field.required and draw(st.booleans()):
            continue
        odd = draw(st.integers(0, 30)) == 0
        if draw(st.integers(0, 40)) == 0:
            event[field.name] = draw(st.one_of(st.none(), json_value))
        elif field.kind == "choice":
            event[field.name] = draw(st.text(max_size=5) if odd else st.sampled_from(field.choices))
        else:
            event[field.name] = draw((_ODD if odd else _VALID)[field.kind])
    if draw(st.integers(0, 8)) == 0:
        other = draw(st.sampled_from([f for fs in contract.TYPE_FIELDS.values() for f in fs]))
        event[other.name] = draw(_VALID.get(other.kind, _edge_text))
    if draw(st.integers(0, 8)) == 0:
        event[draw(st.text(min_size=1, max_size=6))] = draw(json_value)
    try:
        raw = json.dumps(event).encode() if draw(st.booleans()) else orjson.dumps(event)
    except TypeError:  # orjson refuses integers past 64 bits
        raw = json.dumps(event).encode()
    if draw(st.integers(0, 12)) == 0:
        name = draw(st.sampled_from(["event_id", "run_id", "type", "ts", "agent_id", "agent_version", "model"]))
        raw = raw[:-1] + b', "' + name.encode() + b'": ' + json.dumps(draw(json_value)).encode() + b"}"
    return raw


_examples: list = []


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(st.one_of(event_message(), message), min_size=1, max_size=40), st.booleans())
def test_the_same_row_or_the_same_reason_as_one_by_one(values, keep_raw_args):
    _examples.append(values)
    assert in_bulk(values, keep_raw_args=keep_raw_args, max_bytes=300_000) == \
        one_by_one(values, keep_raw_args=keep_raw_args, max_bytes=300_000)


def test_the_examples_were_mostly_events_and_often_valid():
    # what the property above saw (it ran first): enough valid events of every type to matter
    values = [value for example in _examples for value in example]
    rows = [row for row in decode_events(values) if not isinstance(row, InvalidEvent)]
    assert len(values) > 1000 and len(rows) >= 100, (len(values), len(rows))
    assert {row[decode.INDEX["type"]] for row in rows} == set(contract.EVENT_TYPES)


@pytest.mark.parametrize(("name", "value", "reason"), MALFORMED, ids=[case[0] for case in MALFORMED])
def test_each_malformed_kind_keeps_its_reason(name, value, reason):
    (error,) = decode_events([value])
    assert isinstance(error, InvalidEvent) and reason in str(error)


def test_a_repeated_field_is_found_when_another_event_lacks_it():
    # one event lacks run_id, the next has it twice: per poll the name occurs once per event,
    # but the duplicate must not pass
    lacks = b'{"event_id": "a", "ts": 1793491200000, "type": "run_start", "agent_id": "x", "agent_version": "v1"}'
    twice = (b'{"event_id": "b", "ts": 1793491200000, "type": "run_start", "run_id": "r", "agent_id": "x", '
             b'"agent_version": "v1", "run_id": "s"}')
    first, second = decode_events([lacks, twice])
    assert "'run_id': required" in str(first)
    assert "'run_id': given more than once" in str(second)


def test_a_simulated_fleet_takes_the_fast_path(monkeypatch):
    values = [orjson.dumps(event) for event in simulate(FleetConfig(seed=3, runs=300))]
    exact = []
    monkeypatch.setattr(decode, "parse", lambda value, **options: exact.append(value) or parse(value, **options))
    rows = decode_events(values)
    assert not any(isinstance(row, InvalidEvent) for row in rows)
    # the exact path only for what the contract keeps in attributes (an llm_call's error_message)
    assert all(b'"error_message"' in value and b'"llm_call"' in value for value in exact)
    assert len(exact) < len(values) / 20
    assert rows == one_by_one(values)
