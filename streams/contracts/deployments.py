"""Deployment events (SPEC §5): deploy tooling's rollout changes, checked field by field."""

from __future__ import annotations

from typing import Any

import orjson

from streams.contracts.events import InvalidEvent, _check_amount, _check_choice, _check_id, _check_object, parse_ts

ROLES = ("stable", "canary", "shadow")
# A deployment without a traffic share: a stable version takes the rest, a shadow gets copies of
# all of it (what a traffic mirror does by default), a canary none until it says so.
DEFAULT_TRAFFIC_PCT = {"stable": 100.0, "shadow": 100.0}
MAX_CONFIG_CHARS = 65_536  # a config is a few hundred bytes; a prompt belongs there as its sha


def parse_deployment(value: bytes | None) -> dict:
    """A deployment event (SPEC §5) checked field by field; InvalidEvent says what is wrong."""
    try:
        raw = orjson.loads(value or b"")
    except orjson.JSONDecodeError as error:
        raise InvalidEvent(f"not JSON: {error}") from None
    if not isinstance(raw, dict):
        raise InvalidEvent("a deployment event must be a JSON object")
    checks = {"agent_id": _check_id, "version": _check_id, "role": lambda v: _check_choice(v, ROLES),
              "traffic_pct": _check_amount, "ts": parse_ts}
    event: dict[str, Any] = {}
    for name, check in checks.items():
        if name not in raw:
            if name == "traffic_pct":
                event[name] = DEFAULT_TRAFFIC_PCT.get(raw.get("role"), 0.0)
                continue
            raise InvalidEvent(f"{name}: required")
        try:
            event[name] = check(raw[name])
        except ValueError as error:
            raise InvalidEvent(f"{name}: {error}") from None
    if event["traffic_pct"] > 100:
        raise InvalidEvent(f"traffic_pct: must be between 0 and 100, got {event['traffic_pct']}")
    # The version's immutable configuration (model, provider, prompt_sha, tools, params, ...):
    # any JSON object, kept as canonical JSON (keys sorted) so that equal configs compare equal;
    # absent when the event has none.
    if raw.get("config") is not None:
        try:
            event["config"] = _check_object(raw["config"])
        except ValueError as error:
            raise InvalidEvent(f"config: {error}") from None
        if len(event["config"]) > MAX_CONFIG_CHARS:
            raise InvalidEvent(f"config: {len(event['config'])} characters of JSON, at most {MAX_CONFIG_CHARS}")
    return event
