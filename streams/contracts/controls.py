"""Controls (SPEC §9): what Trackside, or a person through it, tells agents and deploy tooling
to do now. One constructor, the message key, and the check of a message read back."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import orjson

from streams.contracts.messages import InvalidMessage
from streams.errors import TracksideError

STOP_RUN, PAUSE_VERSION, RESUME_VERSION = "stop_run", "pause_version", "resume_version"
ACTIONS = (STOP_RUN, PAUSE_VERSION, RESUME_VERSION)
TRACKSIDE = "trackside"  # `issued_by` of the controls Trackside issues by itself
MAX_REASON_CHARS = 2000


class InvalidControl(InvalidMessage, TracksideError):
    """Not a control; `str()` is the reason (for the caller, or the dead letters)."""


def make_control(*, action: str, reason: str, issued_by: str, ts: int, run_id: str = "", agent_id: str = "",
                 agent_version: str = "", alert_id: str = "", evidence: dict[str, Any] | None = None,
                 episode: str = "") -> dict:
    """A control message. `stop_run` names a run, the version actions an agent and version.
    `episode` (e.g. the alert that asked for it) makes the id the same each time the same
    control is issued again, so it lands once; without one, the id is new."""
    control = {
        "control_id": "", "ts": ts, "action": action, "agent_id": agent_id, "agent_version": agent_version,
        "run_id": run_id, "reason": reason, "issued_by": issued_by, "alert_id": alert_id, "evidence": evidence or {},
    }
    check_control(control)
    subject = subject_of(control)
    control["control_id"] = (hashlib.sha1(f"{action}|{subject}|{episode}".encode()).hexdigest()[:32] if episode
                             else uuid.uuid4().hex)
    return control


def subject_of(control: dict) -> str:
    """What a control is about, and its message key: the run, or `agent_id/agent_version` (so a
    compacted topic keeps each version's latest state)."""
    if control["action"] == STOP_RUN:
        return control["run_id"]
    return f"{control['agent_id']}/{control['agent_version']}"


def check_control(control: Any) -> dict:
    """The control if its fields are those of SPEC §9 with the right types; InvalidControl else."""
    if not isinstance(control, dict):
        raise InvalidControl(f"a control is a JSON object, not {type(control).__name__}")
    for name in ("control_id", "action", "agent_id", "agent_version", "run_id", "reason", "issued_by", "alert_id"):
        if not isinstance(control.get(name, ""), str):
            raise InvalidControl(f"field {name!r} must be a string")
    ts = control.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
        raise InvalidControl("field 'ts' must be epoch milliseconds")
    if not isinstance(control.get("evidence", {}), dict):
        raise InvalidControl("field 'evidence' must be an object")
    action = control.get("action")
    if action not in ACTIONS:
        raise InvalidControl(f"action must be one of {', '.join(ACTIONS)}, not {str(action)[:64]!r}")
    if action == STOP_RUN and not control.get("run_id"):
        raise InvalidControl("stop_run needs a run_id")
    if action != STOP_RUN and not (control.get("agent_id") and control.get("agent_version")):
        raise InvalidControl(f"{action} needs an agent_id and an agent_version")
    if not control.get("reason", "").strip():
        raise InvalidControl("a control needs a reason")
    if len(control["reason"]) > MAX_REASON_CHARS:
        raise InvalidControl(f"the reason is longer than {MAX_REASON_CHARS} characters")
    if not control.get("issued_by", "").strip():
        raise InvalidControl("a control needs issued_by")
    return control


def parse_control(value: bytes | None) -> dict:
    """A control read from `trackside.controls`; InvalidControl for anything else."""
    try:
        control = orjson.loads(value or b"")
    except orjson.JSONDecodeError as error:
        raise InvalidControl(f"not JSON: {error}") from None
    check_control(control)
    if not control.get("control_id"):
        raise InvalidControl("a control needs a control_id")
    return control
