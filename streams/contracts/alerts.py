"""Alerts (SPEC §6): one constructor, stable fingerprints and idempotent ids.
What a fingerprint and an id stand for: streams/contracts/README.md, "Alerts"."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any

# SPEC §6's kinds, and beyond them a canary's loop rate, p95 duration, guardrail actions, denied
# approvals and late escalations (streams.detect.rollout), spikes of guardrail actions (`policy`) and
# escalations against a version's own baseline (streams.detect.governance), a stage of Trackside
# itself that stopped or fell behind (streams.ops.watch), and a release candidate failed by its
# evaluation gate (`trackside gate`, streams.ops.gates)
KINDS = ("loop", "drift", "cost", "success_rate", "error_rate", "failure_cluster", "budget", "loop_rate", "latency",
         "guardrail", "denial", "escalation", "policy", "pipeline", "gate")
SEVERITIES = ("info", "warning", "critical")
FIRING, RESOLVED = "firing", "resolved"


def utc_text(ms: int) -> str:
    """Epoch milliseconds as alert summaries write a time."""
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def fingerprint(kind: str, *subject: str) -> str:
    return hashlib.sha1("|".join((kind, *subject)).encode()).hexdigest()[:24]


def make_alert(
    *,
    kind: str,
    severity: str,
    status: str,
    fingerprint: str,
    ts: int,
    agent_id: str,
    agent_version: str = "",
    run_id: str = "",
    summary: str,
    evidence: dict[str, Any],
    action: str = "",
    episode: str = "",
) -> dict:
    """An alert message; `episode` tells apart two firings of one fingerprint (e.g. its start)."""
    if kind not in KINDS or severity not in SEVERITIES or status not in (FIRING, RESOLVED):
        raise ValueError(f"not an alert: kind={kind!r} severity={severity!r} status={status!r}")
    alert = {
        "alert_id": hashlib.sha1(f"{fingerprint}|{status}|{episode}".encode()).hexdigest()[:32],
        "ts": ts,
        "kind": kind,
        "severity": severity,
        "status": status,
        "fingerprint": fingerprint,
        "agent_id": agent_id,
        "agent_version": agent_version,
        "run_id": run_id,
        "summary": summary,
        "evidence": evidence,
    }
    if action:
        alert["action"] = action
    return alert


def cleared(alert: dict, ts: int) -> dict:
    """The `resolved` alert of a firing one: same fingerprint, its summary marked cleared."""
    return make_alert(
        kind=alert["kind"], severity=alert["severity"], status=RESOLVED, fingerprint=alert["fingerprint"],
        ts=ts, agent_id=alert["agent_id"], agent_version=alert["agent_version"],
        summary="cleared: " + alert["summary"], evidence=alert["evidence"], episode=alert["alert_id"])
