"""Agent events (SPEC §4) defined once: their fields, their validation and their JSON Schema.
`parse`: one Kafka message's bytes -> a normalised `events` row, or `InvalidEvent` saying which field is wrong."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

import orjson

from streams.errors import TracksideError

CORE_TYPES = ("run_start", "llm_call", "tool_call", "run_end")
# Governance signals: stored, counted, and summed per run (its guardrail hits, approvals and live
# evaluations); they are not steps and do not change a run's cost or outcome.
OTHER_TYPES = ("approval", "policy_hit", "feedback")
EVENT_TYPES = CORE_TYPES + OTHER_TYPES
OUTCOMES = ("success", "failure", "escalated", "aborted")
APPROVAL_STATUSES = ("requested", "granted", "denied", "expired")
POLICY_DECISIONS = ("blocked", "warned", "redacted", "allowed")

MAX_ID_CHARS = 256
MAX_TEXT_CHARS = 4096
MAX_COUNT = 10**9
# Event time must lie between these; further out is a broken clock, not an event.
EARLIEST_TS_MS = 946_684_800_000  # 2000-01-01
MAX_FUTURE_MS = 24 * 3600 * 1000


class InvalidEvent(TracksideError):
    """A message that is not a valid agent event; `str()` is the reason for the DLQ."""


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # a key of _CHECKS
    required: bool = False
    choices: tuple[str, ...] = ()
    about: str = ""
    column: str = ""  # the `events` column it is stored in, when not its name

    @property
    def stored_as(self) -> str:
        return self.column or self.name


COMMON_FIELDS = (
    Field("event_id", "id", True, about="unique; redelivery of the same id is counted once"),
    Field("ts", "timestamp", True, about="event time: RFC 3339 string or epoch milliseconds"),
    Field("type", "choice", True, EVENT_TYPES),
    Field("run_id", "id", True, about="one agent run = one task attempt"),
    Field("agent_id", "id", True, about="gen_ai.agent.id"),
    Field("agent_version", "id", True, about="gen_ai.agent.version"),
    Field("task_id", "text"),
    Field("session_id", "text"),
    Field("tenant", "text"),
    Field("environment", "text"),
    Field("attributes", "object", about="anything else; stored as JSON"),
)

TYPE_FIELDS: dict[str, tuple[Field, ...]] = {
    "llm_call": (
        Field("model", "text", about="gen_ai.request.model"),
        Field("provider", "text", about="gen_ai.provider.name"),
        Field("input_tokens", "count"),
        Field("output_tokens", "count"),
        Field("cache_read_input_tokens", "count"),
        Field("latency_ms", "amount"),
        Field("status", "choice", choices=("ok", "error")),
        Field("error_type", "text"),
        Field("cost_usd", "amount", about="when absent, priced from genai-prices"),
    ),
    "tool_call": (
        Field("tool", "text", True, about="gen_ai.tool.name"),
        Field("args", "object", about="gen_ai.tool.call.arguments; stored hashed unless configured"),
        Field("args_hash", "text"),
        Field("status", "choice", choices=("ok", "error", "timeout")),
        Field("latency_ms", "amount"),
        Field("error_type", "text"),
        Field("error_message", "text"),
        Field("cost_usd", "amount"),
    ),
    "run_end": (
        Field("outcome", "choice", True, OUTCOMES),
        Field("score", "fraction"),
        Field("error_type", "text"),
        Field("error_message", "text"),
    ),
    # SPEC §4: every type-specific field of these three is optional, so that they are never refused
    # for a field an agent leaves out; what is there is checked.
    "approval": (
        Field("status", "choice", choices=APPROVAL_STATUSES),
        Field("action", "text", about="what needed approval"),
        Field("approver", "text"),
        Field("wait_ms", "amount", about="request to decision"),
    ),
    "policy_hit": (
        Field("policy", "text", about="the guardrail's name"),
        Field("decision", "choice", choices=POLICY_DECISIONS),
        Field("tool", "text"),
    ),
    "feedback": (
        Field("score", "fraction", about="a live evaluation, 0..1"),
        Field("label", "text"),
        # `source` of `events` says where the message was read from
        Field("source", "text", about="user, eval or other", column="feedback_source"),
    ),
}

# The normalised event: every column of `events` except the ones the ingest stage adds.
COLUMNS = (
    "event_id", "ts", "type", "run_id", "agent_id", "agent_version",
    "task_id", "session_id", "tenant", "environment",
    "model", "provider", "input_tokens", "output_tokens", "cache_read_input_tokens",
    "latency_ms", "status", "error_type", "error_message",
    "tool", "args_hash", "args", "outcome", "score", "cost_usd", "attributes",
    "action", "approver", "wait_ms", "policy", "decision", "label", "feedback_source",
)
_TEXT_DEFAULTS = {name: "" for name in COLUMNS}
_TEXT_DEFAULTS.update(
    input_tokens=0, output_tokens=0, cache_read_input_tokens=0,
    latency_ms=None, score=None, cost_usd=None, ts=0, wait_ms=None,
)


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _check_id(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_type_name(value)}")
    if not value or value.isspace():
        raise ValueError("must not be empty")
    if len(value) > MAX_ID_CHARS:
        raise ValueError(f"longer than {MAX_ID_CHARS} characters ({len(value)})")
    return value


def _check_text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_type_name(value)}")
    if len(value) > MAX_TEXT_CHARS:
        raise ValueError(f"longer than {MAX_TEXT_CHARS} characters ({len(value)})")
    return value


def _check_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {_type_name(value)}")
    if not 0 <= value <= MAX_COUNT:
        raise ValueError(f"must be between 0 and {MAX_COUNT}, got {value}")
    return value


def _check_amount(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {_type_name(value)}")
    if not math.isfinite(value) or value < 0 or value > MAX_COUNT:
        raise ValueError(f"must be a finite number between 0 and {MAX_COUNT}, got {value}")
    return float(value)


def _check_fraction(value: Any) -> float:
    value = _check_amount(value)
    if value > 1:
        raise ValueError(f"must be between 0 and 1, got {value}")
    return value


def _check_object(value: Any) -> str:
    if not isinstance(value, dict):
        raise ValueError(f"expected an object, got {_type_name(value)}")
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def parse_ts(value: Any) -> int:
    """Event time in epoch milliseconds from an RFC 3339 string or epoch milliseconds."""
    if isinstance(value, bool):
        raise ValueError("expected an RFC 3339 string or epoch milliseconds, got boolean")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"must be finite, got {value}")
        ms = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"not an RFC 3339 timestamp: {value[:64]!r}") from None
        if moment.tzinfo is None:
            raise ValueError(f"RFC 3339 needs a time zone offset: {value[:64]!r}")
        ms = int(moment.timestamp() * 1000)
    else:
        raise ValueError(f"expected an RFC 3339 string or epoch milliseconds, got {_type_name(value)}")
    latest = time.time_ns() // 1_000_000 + MAX_FUTURE_MS
    if not EARLIEST_TS_MS <= ms <= latest:
        raise ValueError(f"event time {ms} ms is before 2000 or more than a day in the future")
    return ms


def _check_choice(value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices or not isinstance(value, str):
        shown = value[:64] if isinstance(value, str) else _type_name(value)
        raise ValueError(f"must be one of {', '.join(choices)}; got {shown!r}")
    return value


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "id": _check_id,
    "text": _check_text,
    "count": _check_count,
    "amount": _check_amount,
    "fraction": _check_fraction,
    "object": _check_object,
    "timestamp": parse_ts,
}


def args_hash(args_json: str) -> str:
    """Stable hash of canonical (sorted-key) JSON tool arguments: equal arguments, equal hash."""
    return hashlib.sha256(args_json.encode()).hexdigest()[:32]


_Check = Callable[[Any], Any]


def _check_of(field: Field) -> _Check:
    if field.kind == "choice":
        return lambda value: _check_choice(value, field.choices)
    return _CHECKS[field.kind]


# Per event type: every field's check, and the names that must be present.
_CHECKS_BY_TYPE = {
    kind: {field.name: (field.stored_as, _check_of(field)) for field in COMMON_FIELDS + TYPE_FIELDS.get(kind, ())}
    for kind in EVENT_TYPES
}
_REQUIRED_BY_TYPE = {
    kind: tuple(field.name for field in COMMON_FIELDS + TYPE_FIELDS.get(kind, ()) if field.required)
    for kind in EVENT_TYPES
}
_TYPE_CHECK = _check_of(COMMON_FIELDS[2])


def validate(raw: Any, *, keep_raw_args: bool = False) -> dict:
    """The normalised event for one decoded JSON value, or `InvalidEvent` with the reason.

    Fields that the contract does not name are kept, under their names, in `attributes`.
    """
    if not isinstance(raw, dict):
        raise InvalidEvent(f"an event must be a JSON object, got {_type_name(raw)}")
    kind = raw.get("type")
    if kind is None:
        raise InvalidEvent("field 'type': required")
    try:
        _TYPE_CHECK(kind)
    except ValueError as error:
        raise InvalidEvent(f"field 'type': {error}") from None
    for name in _REQUIRED_BY_TYPE[kind]:
        if raw.get(name) is None:
            raise InvalidEvent(f"field {name!r}: required")
    checks = _CHECKS_BY_TYPE[kind]
    event = dict(_TEXT_DEFAULTS)
    extra = None
    # Only the fields present are looked at: most of an event's optional fields are absent.
    for name, value in raw.items():
        known = checks.get(name)
        if known is None:
            if extra is None:
                extra = {}
            extra[name] = value
            continue
        if value is None:
            continue
        column, check = known
        try:
            event[column] = check(value)
        except ValueError as error:
            raise InvalidEvent(f"field {name!r}: {error}") from None
    if extra:
        attributes = orjson.loads(event["attributes"]) if event["attributes"] else {}
        event["attributes"] = orjson.dumps({**extra, **attributes}, option=orjson.OPT_SORT_KEYS).decode()
    if kind == "tool_call":
        args_json = event["args"]
        if args_json:
            event["args_hash"] = event["args_hash"] or args_hash(args_json)
        if not keep_raw_args:
            event["args"] = ""
    if kind in ("llm_call", "tool_call") and not event["status"]:
        event["status"] = "ok"
    return event


def parse(value: bytes | None, *, max_bytes: int = 1_000_000, keep_raw_args: bool = False) -> dict:
    """Decode and validate the value of one `agent.events` message."""
    if value is None:
        raise InvalidEvent("empty message (no value)")
    if len(value) > max_bytes:
        raise InvalidEvent(f"message of {len(value)} bytes is larger than the limit of {max_bytes}")
    try:
        raw = orjson.loads(value)
    except orjson.JSONDecodeError as error:
        raise InvalidEvent(f"not valid JSON: {error}") from None
    if isinstance(raw, dict):
        _reject_duplicate_fields(value)
    return validate(raw, keep_raw_args=keep_raw_args)


_DUPLICATE = object()  # a key no JSON object can have: marks an object with a repeated key


def _reject_duplicate_fields(value: bytes) -> None:
    """An identity field given twice (`{"event_id": "a", "event_id": "b"}`) is ambiguous: JSON
    parsers disagree on which one wins, so such an event is rejected, not guessed at.

    orjson keeps the last value silently. The exact check with the standard library runs only
    when the quoted name of one of the six required fields occurs more than once in the bytes
    (it may also be a value); that pre-check costs a valid event ~2 us (measured), a repeated
    optional field is not looked for: the last value wins.
    """
    count = value.count
    if not (count(b'"event_id"') > 1 or count(b'"run_id"') > 1 or count(b'"type"') > 1 or count(b'"ts"') > 1
            or count(b'"agent_id"') > 1 or count(b'"agent_version"') > 1):
        return

    def pairs(items: list[tuple[str, Any]]) -> dict:
        obj = dict(items)
        if len(obj) != len(items):
            seen: set[str] = set()
            obj[_DUPLICATE] = next(key for key, _ in items if key in seen or seen.add(key))
        return obj

    top = json.loads(value, object_pairs_hook=pairs)
    name = top.get(_DUPLICATE)
    if name is not None:
        raise InvalidEvent(f"field {name!r}: given more than once")


def json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of an agent event, made from the field table above."""
    kinds = {
        "id": {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS},
        "text": {"type": "string", "maxLength": MAX_TEXT_CHARS},
        "count": {"type": "integer", "minimum": 0, "maximum": MAX_COUNT},
        "amount": {"type": "number", "minimum": 0, "maximum": MAX_COUNT},
        "fraction": {"type": "number", "minimum": 0, "maximum": 1},
        "object": {"type": "object"},
        "timestamp": {
            "oneOf": [{"type": "string", "format": "date-time"}, {"type": "integer", "minimum": EARLIEST_TS_MS}]
        },
    }

    def properties(fields: tuple[Field, ...]) -> dict:
        out = {}
        for field in fields:
            spec = {"enum": list(field.choices)} if field.kind == "choice" else dict(kinds[field.kind])
            if field.about:
                spec["description"] = field.about
            out[field.name] = spec
        return out

    def required(fields: tuple[Field, ...]) -> list[str]:
        return [field.name for field in fields if field.required]

    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://trackside.dev/schema/agent-event.json",
        "title": "Trackside agent event",
        "type": "object",
        "properties": properties(COMMON_FIELDS),
        "required": required(COMMON_FIELDS),
        "allOf": [
            {
                "if": {"properties": {"type": {"const": kind}}},
                "then": {"properties": properties(fields), "required": required(fields)},
            }
            for kind, fields in TYPE_FIELDS.items()
        ],
    }
