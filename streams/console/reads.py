"""What the console's API and pages read from the store (SPEC §10): one function per endpoint,
each one or two queries with explicit FINAL, parameters bound by the server, never formatted in."""

from __future__ import annotations

from typing import Any, Callable

import orjson

# A reader: (SQL, parameters) -> rows as dicts (`Store.query_json` or `RemoteStore.query_json`).
Read = Callable[[str, dict], list[dict]]

MS = "toUnixTimestamp64Milli({column}) AS {column}"

FLEET = """
WITH (SELECT max(ended_at) FROM runs FINAL) AS newest
SELECT
    agent_id,
    agent_version,
    count() AS runs,
    countIf(outcome = 'success') AS successes,
    successes / runs AS success_rate,
    if(successes = 0, NULL, toFloat64(sum(cost_usd)) / successes) AS cost_per_success,
    quantile(0.95)(duration_ms) AS p95_duration_ms,
    countIf(loop_detected) / runs AS loop_rate,
    ifNull(sum(tool_errors) / nullIf(sum(tool_calls), 0), 0) AS tool_error_rate
FROM runs FINAL
WHERE ended_at > newest - toIntervalHour({hours:UInt32})
GROUP BY agent_id, agent_version
ORDER BY runs DESC, agent_id, agent_version
"""

# Everything a version's role and state come from, newest first per version.
ROLES = """
SELECT agent_id, version AS agent_version, argMax(role, ts) AS role, argMax(traffic_pct, ts) AS traffic_pct
FROM deployments FINAL GROUP BY agent_id, version
"""
CANARY_VERSIONS = "SELECT agent_id, version AS agent_version, argMax(decision, updated_at) AS verdict FROM canaries FINAL GROUP BY agent_id, version"
ROLLED_BACK = "SELECT DISTINCT agent_id, from_version AS agent_version FROM rollbacks FINAL"
PAUSED = """
SELECT agent_id, agent_version FROM controls FINAL
WHERE action IN ('pause_version', 'resume_version')
GROUP BY agent_id, agent_version HAVING argMax(action, ts) = 'pause_version'
"""
DRIFTING = """
SELECT DISTINCT agent_id, agent_version FROM alerts FINAL
WHERE kind = 'drift' AND (fingerprint, ts) IN (SELECT fingerprint, max(ts) FROM alerts FINAL GROUP BY fingerprint)
  AND status = 'firing'
"""

# `status=firing`: the conditions firing now (their newest alert is a firing one). Filtered inside,
# converted outside: the output's `ts` (epoch ms) would otherwise shadow the column in WHERE.
ALERTS = """
SELECT alert_id, toUnixTimestamp64Milli(ts) AS ts, kind, severity, status, fingerprint, agent_id, agent_version,
       run_id, summary, evidence, action
FROM
(
    SELECT * FROM alerts FINAL
    WHERE ({status:String} = ''
           OR ({status:String} = 'firing' AND status = 'firing'
               AND (fingerprint, ts) IN (SELECT fingerprint, max(ts) FROM alerts FINAL GROUP BY fingerprint))
           OR ({status:String} = 'resolved' AND status = 'resolved'))
      AND ({kind:String} = '' OR kind = {kind:String})
      AND ({agent_id:String} = '' OR agent_id = {agent_id:String})
      AND ({severity:String} = '' OR severity = {severity:String})
    ORDER BY ts DESC, alert_id
    LIMIT {limit:UInt32}
)
ORDER BY ts DESC, alert_id
"""

CANARY_COLUMNS = ("agent_id, version, stable_version, toUnixTimestamp64Milli(since) AS since, inferred, "
                  "decision AS verdict, toUnixTimestamp64Milli(decided_at) AS decided_at, canary_runs, stable_runs, "
                  "reason, evidence, toUnixTimestamp64Milli(updated_at) AS updated_at")
CANARIES = f"SELECT {CANARY_COLUMNS} FROM canaries FINAL ORDER BY updated_at DESC, agent_id, version"
CANARY = (f"SELECT {CANARY_COLUMNS} FROM canaries FINAL WHERE agent_id = {{agent_id:String}} "
          "AND version = {version:String} ORDER BY since DESC LIMIT 1")

_TIMES = ("started_at", "ended_at", "updated_at")
RUN = """
SELECT * REPLACE ({times}, toFloat64(cost_usd) AS cost_usd)
FROM runs FINAL WHERE run_id = {{run_id:String}}
""".format(times=", ".join(MS.format(column=c) for c in _TIMES))
RUN_EVENTS = """
SELECT * EXCEPT (source) REPLACE (toUnixTimestamp64Milli(ts) AS ts, toUnixTimestamp64Milli(ingested_at) AS ingested_at,
                                  toFloat64(cost_usd) AS cost_usd)
FROM events FINAL WHERE run_id = {run_id:String}
ORDER BY ts, event_id
"""

HEALTH = "SELECT 1 AS ok"


def _keyed(rows: list[dict]) -> set[tuple[str, str]]:
    return {(row["agent_id"], row["agent_version"]) for row in rows}


def fleet(read: Read, hours: int = 24) -> list[dict]:
    """Per agent and version over the `hours` that end with the newest run: SPEC §10's fields.

    role: the newest deployment's (SPEC §5), else `canary` for a version the rollout analysed as
    one (roles inferred from traffic), else `stable`. state, first that holds: `rolled_back` (a
    rollback decision was sent for it; such a version is usually also paused, automatically),
    `paused` (its newest version control is a pause), `drifting` (a drift alert fires for it),
    `canary` (under analysis), `healthy`."""
    rows = read(FLEET, {"hours": hours})
    roles = {(r["agent_id"], r["agent_version"]): r["role"] for r in read(ROLES, {})}
    canaries = _keyed(read(CANARY_VERSIONS, {}))
    rolled_back, paused, drifting = (_keyed(read(sql, {})) for sql in (ROLLED_BACK, PAUSED, DRIFTING))
    out = []
    for row in rows:
        key = (row["agent_id"], row["agent_version"])
        role = roles.get(key) or ("canary" if key in canaries else "stable")
        state = ("rolled_back" if key in rolled_back else "paused" if key in paused
                 else "drifting" if key in drifting else "canary" if role == "canary" else "healthy")
        out.append({"agent_id": key[0], "agent_version": key[1], "role": role, "runs": row["runs"],
                    "success_rate": row["success_rate"], "cost_per_success": row["cost_per_success"],
                    "p95_duration_ms": row["p95_duration_ms"], "loop_rate": row["loop_rate"],
                    "tool_error_rate": row["tool_error_rate"], "state": state})
    return out


def alerts(read: Read, *, status: str = "", kind: str = "", agent_id: str = "", severity: str = "",
           limit: int = 500) -> list[dict]:
    """Alerts as they were sent (SPEC §6), newest first; `status=firing`: those firing now."""
    rows = read(ALERTS, {"status": status, "kind": kind, "agent_id": agent_id, "severity": severity, "limit": limit})
    for row in rows:
        row["evidence"] = _json(row["evidence"])
        if not row["action"]:
            del row["action"]
    return rows


def canaries(read: Read) -> list[dict]:
    return [_canary(row) for row in read(CANARIES, {})]


def canary(read: Read, agent_id: str, version: str) -> dict | None:
    rows = read(CANARY, {"agent_id": agent_id, "version": version})
    return _canary(rows[0]) if rows else None


def run(read: Read, run_id: str) -> dict | None:
    """The run as landed in `runs` with its events in event-time order, or None when it has no row."""
    rows = read(RUN, {"run_id": run_id})
    if not rows:
        return None
    return {**rows[0], "events": run_events(read, run_id)}


def run_events(read: Read, run_id: str) -> list[dict]:
    events = read(RUN_EVENTS, {"run_id": run_id})
    for event in events:
        for name in ("attributes", "args"):
            event[name] = _json(event[name]) if event[name] else None
    return events


def healthy(read: Read) -> bool:
    return read(HEALTH, {}) == [{"ok": 1}]


def _canary(row: dict) -> dict:
    return {**row, "inferred": bool(row["inferred"]), "evidence": _json(row["evidence"])}


def _json(text: str) -> Any:
    try:
        return orjson.loads(text) if text else {}
    except orjson.JSONDecodeError:
        return text
