"""Adversarial agent-event messages for property tests (hypothesis strategies): valid events
with one thing wrong, noise, and JSON that is not an event. Shared by the unit test of the bulk
decoder and the integration test of the dead letters."""

from __future__ import annotations

import itertools
import json

from hypothesis import strategies as st

T0 = 1_793_700_000_000
_ids = itertools.count()

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                      st.text(max_size=30))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


def _dumps(value) -> bytes:  # noqa: ANN001
    # the standard library writes what orjson refuses: integers past 64 bits, Infinity
    return json.dumps(value).encode()


def valid_event(kind: str = "llm_call") -> dict:
    n = next(_ids)
    return {"event_id": f"ok-{n}", "ts": T0 + n, "type": kind, "run_id": f"run-{n % 50}", "agent_id": "fuzz",
            "agent_version": "v1", "model": "gpt-4o-mini", "input_tokens": 10, "output_tokens": 2}


@st.composite
def mutated(draw) -> bytes:
    """A valid event with one thing wrong (or, sometimes, harmlessly odd)."""
    event = valid_event(draw(st.sampled_from(["llm_call", "tool_call", "run_start", "run_end"])))
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
