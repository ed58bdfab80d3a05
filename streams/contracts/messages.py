"""The messages Trackside's stages send each other over its internal topics, defined once."""

from __future__ import annotations

import operator

# The fields of a normalised event the assembler reads; the ingest stage sends only these,
# as positional rows (`pack`), which cost a third of dicts to encode and decode.
EVENT_FIELDS = (
    "event_id", "ts", "type", "run_id", "agent_id", "agent_version", "task_id", "session_id",
    "tenant", "environment", "input_tokens", "output_tokens", "cache_read_input_tokens",
    "status", "error_type", "error_message", "tool", "args_hash", "outcome", "score",
    "cost_usd", "cost_source",
)


pack = operator.itemgetter(*EVENT_FIELDS)


def unpack(rows: list[list]) -> list[dict]:
    return [dict(zip(EVENT_FIELDS, row)) for row in rows]
