"""Malformed agent-event messages, each with the words its dead-letter reason must contain.

Shared by the unit tests of validation and the integration tests of the dead letters.
"""

import orjson

GOOD = {
    "event_id": "ok-1", "ts": "2026-11-01T00:00:00Z", "type": "llm_call", "run_id": "run-1",
    "agent_id": "support-bot", "agent_version": "v1", "model": "gpt-4o", "provider": "openai",
    "input_tokens": 1000, "output_tokens": 100,
}


def _with(**changes) -> bytes:
    event = dict(GOOD)
    for name, value in changes.items():
        if value is _DROP:
            event.pop(name)
        else:
            event[name] = value
    return orjson.dumps(event)


_DROP = object()

# (name, raw message value, a fragment the reason must contain)
MALFORMED: list[tuple[str, bytes | None, str]] = [
    ("not json", b"hello there", "not valid JSON"),
    ("truncated json", b'{"event_id": "x", "ts":', "not valid JSON"),
    ("json array", b'[{"event_id": "x"}]', "must be a JSON object"),
    ("json string", b'"an event"', "must be a JSON object"),
    ("json null", b"null", "must be a JSON object"),
    ("empty value", b"", "not valid JSON"),
    ("invalid utf-8", b'{"event_id": "\xff\xfe", "ts": 1}', "not valid JSON"),
    ("NaN literal", b'{"event_id": "x", "ts": NaN}', "not valid JSON"),
    ("missing event_id", _with(event_id=_DROP), "'event_id': required"),
    ("missing ts", _with(ts=_DROP), "'ts': required"),
    ("missing type", _with(type=_DROP), "'type': required"),
    ("missing run_id", _with(run_id=_DROP), "'run_id': required"),
    ("missing agent_id", _with(agent_id=_DROP), "'agent_id': required"),
    ("missing agent_version", _with(agent_version=_DROP), "'agent_version': required"),
    ("numeric event_id", _with(event_id=42), "'event_id': expected a string"),
    ("empty run_id", _with(run_id="  "), "'run_id': must not be empty"),
    ("unknown type", _with(type="teleport"), "'type': must be one of"),
    ("ts not a date", _with(ts="yesterday"), "'ts': not an RFC 3339"),
    ("ts without zone", _with(ts="2026-11-01T00:00:00"), "'ts': RFC 3339 needs a time zone"),
    ("ts boolean", _with(ts=True), "'ts': expected an RFC 3339"),
    ("ts far future", _with(ts=4102444800000), "'ts': event time"),
    ("ts before 2000", _with(ts=86400000), "'ts': event time"),
    ("negative tokens", _with(input_tokens=-5), "'input_tokens': must be between"),
    ("fractional tokens", _with(output_tokens=1.5), "'output_tokens': expected a whole number"),
    ("tokens as string", _with(input_tokens="1000"), "'input_tokens': expected a whole number"),
    ("bad llm status", _with(status="maybe"), "'status': must be one of"),
    ("negative cost", _with(cost_usd=-0.01), "'cost_usd': must be a finite number"),
    ("attributes not object", _with(attributes=[1, 2]), "'attributes': expected an object"),
    ("tool_call without tool", _with(type="tool_call"), "'tool': required"),
    ("tool args not object", _with(type="tool_call", tool="search", args="q=1"), "'args': expected an object"),
    ("run_end without outcome", _with(type="run_end"), "'outcome': required"),
    ("run_end bad outcome", _with(type="run_end", outcome="won"), "'outcome': must be one of"),
    ("score above 1", _with(type="run_end", outcome="success", score=1.5), "'score': must be between 0 and 1"),
    ("huge agent_id", _with(agent_id="a" * 1000), "'agent_id': longer than"),
]
