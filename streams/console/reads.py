"""What the console's API and pages read from the store (SPEC §10): one function per endpoint,
each one or two queries with explicit FINAL, parameters bound by the server, never formatted in."""

from __future__ import annotations

from typing import Any, Callable

import orjson

# A reader: (SQL, parameters) -> rows as dicts (`Store.query_json` or `RemoteStore.query_json`).
Read = Callable[[str, dict], list[dict]]

MS = "toUnixTimestamp64Milli({column}) AS {column}"

# FINAL merges rows of one key across parts; `events` is partitioned by month of `ts`, and its key
# holds toDate(ts), so the rows of one key are always in one partition: FINAL need not merge across
# partitions, and a partition of one merged part is read as it is (3x faster on a month of events).
EVENTS_FINAL = "SETTINGS do_not_merge_across_partitions_select_final = 1"

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

# The kinds the alerts page offers as filters: those of the newest 5,000 alerts.
ALERT_KINDS = """
SELECT DISTINCT kind FROM (SELECT kind, ts, alert_id FROM alerts FINAL ORDER BY ts DESC, alert_id LIMIT 5000)
ORDER BY kind
"""

CANARY_COLUMNS = ("agent_id, version, stable_version, toUnixTimestamp64Milli(since) AS since, inferred, "
                  "decision AS verdict, toUnixTimestamp64Milli(decided_at) AS decided_at, canary_runs, stable_runs, "
                  "reason, evidence, toUnixTimestamp64Milli(updated_at) AS updated_at, role")
CANARIES = f"SELECT {CANARY_COLUMNS} FROM canaries FINAL ORDER BY updated_at DESC, agent_id, version"
CANARY = (f"SELECT {CANARY_COLUMNS} FROM canaries FINAL WHERE agent_id = {{agent_id:String}} "
          "AND version = {version:String} ORDER BY since DESC LIMIT 1")

_TIMES = ("started_at", "ended_at", "updated_at")
RUN = """
SELECT * REPLACE ({times}, toFloat64(cost_usd) AS cost_usd)
FROM runs FINAL WHERE run_id = {{run_id:String}}
""".format(times=", ".join(MS.format(column=c) for c in _TIMES))
# PREWHERE: the run's events are found in the few granules that hold them (the run_ids bloom filter)
# before any other column is read. Before FINAL, which is exact here: every row of an event (its
# redeliveries) has the event's run_id.
RUN_EVENTS = """
SELECT * EXCEPT (source) REPLACE (toUnixTimestamp64Milli(ts) AS ts, toUnixTimestamp64Milli(ingested_at) AS ingested_at,
                                  toFloat64(cost_usd) AS cost_usd)
FROM events FINAL PREWHERE run_id = {run_id:String}
ORDER BY ts, event_id
""" + EVENTS_FINAL

HEALTH = "SELECT 1 AS ok"


def _keyed(rows: list[dict]) -> set[tuple[str, str]]:
    return {(row["agent_id"], row["agent_version"]) for row in rows}


def fleet(read: Read, hours: int = 24) -> list[dict]:
    """Per agent and version over the `hours` that end with the newest run: SPEC §10's fields.

    role: the newest deployment's (SPEC §5), else `canary` for a version the rollout analysed as
    one (roles inferred from traffic), else `stable`. state, first that holds: `rolled_back` (a
    rollback decision was sent for it; such a version is usually also paused, automatically),
    `paused` (its newest version control is a pause), `drifting` (a drift alert fires for it),
    `canary` (under analysis: a canary, or a shadow, which is analysed like one but never rolled
    back), `healthy`."""
    rows = read(FLEET, {"hours": hours})
    roles = {(r["agent_id"], r["agent_version"]): r["role"] for r in read(ROLES, {})}
    canaries = _keyed(read(CANARY_VERSIONS, {}))
    rolled_back, paused, drifting = (_keyed(read(sql, {})) for sql in (ROLLED_BACK, PAUSED, DRIFTING))
    out = []
    for row in rows:
        key = (row["agent_id"], row["agent_version"])
        role = roles.get(key) or ("canary" if key in canaries else "stable")
        state = ("rolled_back" if key in rolled_back else "paused" if key in paused
                 else "drifting" if key in drifting else "canary" if role in ("canary", "shadow") else "healthy")
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


def alert_kinds(read: Read) -> list[str]:
    return [row["kind"] for row in read(ALERT_KINDS, {})]


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


# --- what the pages read besides the API's ------------------------------------------------------------

FLEET_SERIES = """
WITH (SELECT max(ended_at) FROM runs FINAL) AS newest
SELECT agent_id, agent_version, bucket, n_runs AS runs, n_successes / n_runs AS success_rate,
       cost / nullIf(n_successes, 0) AS cost_per_success, p95 AS p95_duration_ms, loops / n_runs AS loop_rate,
       errors / nullIf(calls, 0) AS tool_error_rate
FROM
(
    SELECT agent_id, agent_version,
           toUnixTimestamp(toStartOfInterval(window_start, toIntervalSecond({bucket:UInt32}))) * 1000 AS bucket,
           sum(runs) AS n_runs, sum(successes) AS n_successes, toFloat64(sum(cost_usd)) AS cost,
           max(p95_duration_ms) AS p95, sum(loop_rate * runs) AS loops, sum(tool_errors) AS errors,
           sum(tool_calls) AS calls
    FROM agent_metrics FINAL
    WHERE window_end > newest - toIntervalHour({hours:UInt32})
      AND ({agent_id:String} = '' OR agent_id = {agent_id:String})
    GROUP BY agent_id, agent_version, bucket
)
ORDER BY bucket
"""
SERIES = ("runs", "success_rate", "cost_per_success", "p95_duration_ms", "loop_rate", "tool_error_rate")
POINTS = 24  # a sparkline's points over the range

RUN_ALERTS = f"""
SELECT alert_id, toUnixTimestamp64Milli(ts) AS ts, kind, severity, status, fingerprint, agent_id, agent_version,
       run_id, summary, evidence, action
FROM (SELECT * FROM alerts FINAL WHERE run_id = {{run_id:String}}) ORDER BY ts
"""
RUN_CONTROLS = """
SELECT control_id, toUnixTimestamp64Milli(ts) AS ts, action, reason, issued_by, alert_id
FROM (SELECT * FROM controls FINAL WHERE run_id = {run_id:String}) ORDER BY ts
"""
FAILURE_MODE = "SELECT cluster_id, label, size FROM failure_clusters FINAL WHERE cluster_id = {cluster_id:String} LIMIT 1"
ROLLBACKS = """
SELECT rollback_id, toUnixTimestamp64Milli(ts) AS ts, agent_id, from_version, to_version, reason, alert_ids, evidence
FROM (SELECT * FROM rollbacks FINAL) ORDER BY ts DESC
"""
DEPLOYMENTS = """
SELECT agent_id, version, role, traffic_pct, toUnixTimestamp64Milli(ts) AS ts
FROM (SELECT * FROM deployments FINAL WHERE {agent_id:String} = '' OR agent_id = {agent_id:String})
ORDER BY agent_id, ts
"""
# Both arms since the canary started, up to its `runs`-th run: the analysis ends there at the
# latest (max_runs). Filtered inside, converted outside: the output's `ended_at` (epoch ms) would
# otherwise shadow the column in WHERE.
ARM_RUNS = """
WITH (
    SELECT max(ended_at) FROM
    (
        SELECT ended_at FROM runs FINAL
        WHERE agent_id = {agent_id:String} AND agent_version = {canary:String}
          AND ended_at >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')
        ORDER BY ended_at, run_id
        LIMIT {runs:UInt32}
    )
) AS last_counted
SELECT run_id, agent_version, outcome, toFloat64(cost_usd) AS cost_usd, loop_detected, tool_calls, tool_errors,
       duration_ms, toUnixTimestamp64Milli(ended_at) AS ended_at
FROM
(
    SELECT * FROM runs FINAL
    WHERE agent_id = {agent_id:String} AND agent_version IN ({stable:String}, {canary:String})
      AND ended_at >= fromUnixTimestamp64Milli({since:Int64}, 'UTC') AND ended_at <= last_counted
)
ORDER BY ended_at, run_id
"""


def fleet_series(read: Read, hours: int, agent_id: str = "") -> dict[tuple[str, str], dict[str, list]]:
    """Per agent version, each metric of the fleet over the range in POINTS buckets (None: no run)."""
    bucket_s = max(hours * 3600 // POINTS, 300)
    rows = read(FLEET_SERIES, {"hours": hours, "bucket": bucket_s, "agent_id": agent_id})
    if not rows:
        return {}
    last = max(row["bucket"] for row in rows)
    first = last - (POINTS - 1) * bucket_s * 1000
    out: dict[tuple[str, str], dict[str, list]] = {}
    for row in rows:
        index = (row["bucket"] - first) // (bucket_s * 1000)
        if not 0 <= index < POINTS:
            continue
        series = out.setdefault((row["agent_id"], row["agent_version"]), {name: [None] * POINTS for name in SERIES})
        for name in SERIES:
            series[name][index] = row[name]
    return out


def run_context(read: Read, run_id: str, cluster_id: str) -> dict:
    """A run's alerts (with the loop's evidence), controls and failure mode."""
    alerts = read(RUN_ALERTS, {"run_id": run_id})
    for alert in alerts:
        alert["evidence"] = _json(alert["evidence"])
    loop = next((a["evidence"] for a in alerts if a["kind"] == "loop" and a["status"] == "firing"), None)
    mode = read(FAILURE_MODE, {"cluster_id": cluster_id}) if cluster_id else []
    return {"alerts": alerts, "controls": read(RUN_CONTROLS, {"run_id": run_id}), "loop": loop,
            "failure_mode": mode[0] if mode else None}


def rollbacks(read: Read) -> list[dict]:
    rows = read(ROLLBACKS, {})
    for row in rows:
        row["evidence"] = _json(row["evidence"])
    return rows


def deployments(read: Read, agent_id: str = "") -> list[dict]:
    return read(DEPLOYMENTS, {"agent_id": agent_id})


def canary_trajectory(read: Read, canary: dict, policy=None) -> dict:  # noqa: ANN001 (a CanaryPolicy)
    """The analysis replayed from the stored runs of both arms since the canary started, in the
    order they ended: after each canary run, every metric's always-valid p-value (the running
    minimum) and its threshold, up to the policy's `max_runs` canary runs (or the live analysis's
    count, when larger), where the analysis ends at the latest, with a promotion. The live
    analysis judged batch by batch, so its decision may come a few runs apart from the replay's;
    its own point of decision is `canary["canary_runs"]`."""
    from streams.detect.canary import METRICS, CanaryAnalysis, CanaryPolicy

    policy = policy or CanaryPolicy()
    rows = read(ARM_RUNS, {"agent_id": canary["agent_id"], "stable": canary["stable_version"],
                           "canary": canary["version"], "since": canary["since"],
                           "runs": max(policy.max_runs, int(canary["canary_runs"]))})
    analysis = CanaryAnalysis(policy)
    points: dict[str, list] = {metric: [] for metric in METRICS}
    runs: list[int] = []
    threshold = analysis.policy.metric_alpha
    for row in rows:
        arm = "canary" if row["agent_version"] == canary["version"] else "stable"
        analysis.add(arm, [row])
        if arm != "canary":
            continue
        # the p-values only (as decide computes them), past a decision too: the chart shows the whole run
        runs.append(analysis.arms_["canary"].n)
        for metric, p_value in analysis.p_values().items():
            points[metric].append(p_value)
    return {"runs": runs, "p_values": points, "threshold": threshold, "metrics": list(METRICS),
            "decided_at_run": canary["canary_runs"] if canary["verdict"] != "pending" else None}


DEAD_LETTERS = """
WITH (SELECT max(received_at) FROM dead_letters FINAL) AS newest
SELECT topic,
       replaceRegexpAll(replaceRegexpAll(error, 'got (\\'[^\\']*\\'|"[^"]*"|[^ ,;)]+)', 'got <value>'),
                        '-?\\\\b\\\\d+(\\\\.\\\\d+)?\\\\b', '<n>') AS reason,
       count() AS messages, sum(payload_bytes) AS bytes,
       toUnixTimestamp64Milli(max(received_at)) AS last_received,
       argMax(source, received_at) AS example_source, argMax(error, received_at) AS example_error,
       substring(argMax(payload, received_at), 1, 2000) AS example_payload
FROM dead_letters FINAL
WHERE received_at > newest - toIntervalHour({hours:UInt32})
GROUP BY topic, reason
ORDER BY messages DESC, topic, reason
LIMIT 500
"""

# The newest tool call (`_newest`): after `since`, where the time index finds it at once.
NEWEST_TOOL_CALL = """
SELECT toUnixTimestamp64Milli(maxOrNull(ts)) AS newest FROM events FINAL
WHERE type = 'tool_call' AND ({since:Int64} = 0 OR ts > fromUnixTimestamp64Milli({since:Int64}, 'UTC'))
""" + EVENTS_FINAL
NEWEST_RUN_HINT = "SELECT toUnixTimestamp64Milli(max(last_ended_at)) AS ended FROM agent_versions FINAL"
# The tool calls of the range, as a subquery of each query below.
TOOL_CALLS = """
    SELECT * FROM events FINAL
    WHERE type = 'tool_call' AND ts > fromUnixTimestamp64Milli({newest:Int64}, 'UTC') - toIntervalHour({hours:UInt32})
      AND ({agent_id:String} = '' OR agent_id = {agent_id:String})
"""
# A retry: a call right after a failed call of the same tool in its run (in event-time order),
# counted by the assembler when it closed the run (`runs.tool_retries`), over the runs that ended
# in the range: ordering each run's calls here took most of a week's page.
TOOLS = f"""
SELECT t.tool AS tool, calls, error_rate, timeout_rate, ifNull(r.retries, 0) AS retries, p50_latency_ms,
       p95_latency_ms, used_by
FROM
(
    SELECT tool, count() AS calls, countIf(status = 'error') / calls AS error_rate,
           countIf(status = 'timeout') / calls AS timeout_rate,
           quantile(0.5)(latency_ms) AS p50_latency_ms, quantile(0.95)(latency_ms) AS p95_latency_ms,
           arraySort(groupUniqArray(agent_id || ' ' || agent_version)) AS used_by
    FROM ({TOOL_CALLS})
    GROUP BY tool
) AS t
LEFT JOIN
(
    SELECT tool, count() AS retries
    FROM runs FINAL
    ARRAY JOIN tool_retries AS tool
    WHERE ended_at > fromUnixTimestamp64Milli({{newest:Int64}}, 'UTC') - toIntervalHour({{hours:UInt32}})
      AND ({{agent_id:String}} = '' OR agent_id = {{agent_id:String}})
    GROUP BY tool
) AS r ON r.tool = t.tool
ORDER BY calls DESC, tool
LIMIT 200
{EVENTS_FINAL}
"""
TOOL_SERIES = f"""
SELECT tool, toUnixTimestamp(toStartOfInterval(ts, toIntervalSecond({{bucket:UInt32}}))) * 1000 AS bucket,
       quantile(0.95)(latency_ms) AS p95_latency_ms, countIf(status IN ('error', 'timeout')) / count() AS failure_rate
FROM ({TOOL_CALLS})
GROUP BY tool, bucket
ORDER BY bucket
{EVENTS_FINAL}
"""

# The heatmap: each (feature, window) shows one test of those the window had (ks, psi, wasserstein
# for a numeric feature), the last by statistic; DRIFT_CELL is the same one.
DRIFT = """
SELECT agent_id, agent_version, toUnixTimestamp64Milli(window) AS window_ms, feature, statistic, value, p_value,
       threshold, baseline, significant
FROM drift FINAL
WHERE window > fromUnixTimestamp64Milli({newest:Int64}, 'UTC') - toIntervalHour({hours:UInt32})
  AND position(feature, '@') = 0 AND ({agent_id:String} = '' OR agent_id = {agent_id:String})
ORDER BY agent_id, agent_version, window_ms, feature, statistic
"""
# A range longer than MAX_DRIFT_COLUMNS windows shows a column per bucket of windows, each cell
# the bucket's most telling test: a drifted one first, then the smallest p-value (then the
# earliest window, then by statistic: one row). A week of 5-minute windows is 2,016 columns,
# a 14 MB page that took a second to make; bucketed it is 288.
MAX_DRIFT_COLUMNS = 288
DRIFT_BUCKETED = """
SELECT agent_id, agent_version, feature, bucket_ms,
       tupleElement(top, 1) AS window_ms, tupleElement(top, 2) AS statistic, tupleElement(top, 3) AS value,
       tupleElement(top, 4) AS p_value, tupleElement(top, 5) AS threshold, tupleElement(top, 6) AS baseline,
       tupleElement(top, 7) AS significant
FROM (
    SELECT agent_id, agent_version, feature,
           intDiv(toUnixTimestamp64Milli(window), {bucket:Int64}) * {bucket:Int64} AS bucket_ms,
           -- one aggregate carrying the whole test (half the time of one per column)
           argMin(tuple(toUnixTimestamp64Milli(window), statistic, value, p_value, threshold, baseline, significant),
                  tuple(NOT significant, ifNull(p_value, 2.0), window, statistic)) AS top
    FROM drift FINAL
    WHERE window > fromUnixTimestamp64Milli({newest:Int64}, 'UTC') - toIntervalHour({hours:UInt32})
      AND position(feature, '@') = 0 AND ({agent_id:String} = '' OR agent_id = {agent_id:String})
    GROUP BY agent_id, agent_version, feature, bucket_ms
)
ORDER BY agent_id, agent_version, bucket_ms, feature
"""
# As NEWEST_TOOL_CALL: after `since` first, where the key (agent version, window) finds it at once.
NEWEST_DRIFT_WINDOW = """
SELECT toUnixTimestamp64Milli(maxOrNull(window)) AS newest FROM drift FINAL
WHERE {since:Int64} = 0 OR window > fromUnixTimestamp64Milli({since:Int64}, 'UTC')
"""
DRIFT_CELL = """
SELECT agent_id, agent_version, toUnixTimestamp64Milli(window) AS window_ms, feature, statistic, value, p_value,
       threshold, baseline, significant
FROM drift FINAL
WHERE agent_id = {agent_id:String} AND agent_version = {agent_version:String} AND feature = {feature:String}
  AND window = fromUnixTimestamp64Milli({window:Int64}, 'UTC') AND position(feature, '@') = 0
ORDER BY statistic DESC
LIMIT 1
"""
# A numeric feature of a run, as the drift tests compute it (streams/detect/drift.py run_features).
DRIFT_NUMERIC = {
    "cost_usd": "toFloat64(cost_usd)", "total_tokens": "toFloat64(input_tokens + output_tokens)",
    "steps": "toFloat64(steps)", "duration_ms": "toFloat64(duration_ms)",
    "tool_error_rate": "if(tool_calls = 0, 0, tool_errors / tool_calls)",
}
DRIFT_CATEGORICAL = {"outcome": "toString(outcome)", "error_type": "if(error_type = '', 'none', toString(error_type))",
                     "success": "if(outcome = 'success', 'success', 'not')", "tool_mix": "arrayJoin(tool_path)"}
DRIFT_SAMPLE = """
SELECT window_ms >= {{window:Int64}} AS current, {expression} AS value{counted}
FROM (SELECT *, toUnixTimestamp64Milli(ended_at) AS window_ms FROM runs FINAL
      WHERE agent_id = {{agent_id:String}} AND agent_version = {{agent_version:String}}
        AND ended_at >= fromUnixTimestamp64Milli({{since:Int64}}, 'UTC')
        AND ended_at < fromUnixTimestamp64Milli({{until:Int64}}, 'UTC'))
{grouped}
"""


def dead_letters(read: Read, hours: int) -> list[dict]:
    return read(DEAD_LETTERS, {"hours": hours})


def _newest(read: Read, sql: str) -> int | None:
    """The newest time (epoch ms) `sql` finds after `{since}`, looked for in the day before the
    newest run's end first, and in the whole table only when nothing is there: either way the
    newest of all, exactly (what is not after `since` is older than what is). None: no rows."""
    (hint,) = read(NEWEST_RUN_HINT, {})
    since = max(int(hint["ended"] or 0) - 24 * 3_600_000, 0)
    (row,) = read(sql, {"since": since})
    if row["newest"] is None and since:
        (row,) = read(sql, {"since": 0})
    return row["newest"]


def newest_tool_call(read: Read) -> int | None:
    """The event time of the newest tool call (epoch ms), None when there is none."""
    return _newest(read, NEWEST_TOOL_CALL)


def tools(read: Read, hours: int, agent_id: str = "") -> tuple[list[dict], dict[str, dict[str, list]]]:
    """Each tool's calls, error and timeout rates, retries (a call right after a failed call of the
    same tool in its run, of the runs that ended in the range), latency, and who uses it; and its p95
    latency and failure rate over time."""
    newest = newest_tool_call(read)
    if newest is None:
        return [], {}
    rows = read(TOOLS, {"hours": hours, "agent_id": agent_id, "newest": newest})
    bucket_s = max(hours * 3600 // POINTS, 300)
    series: dict[str, dict[str, list]] = {}
    points = read(TOOL_SERIES, {"hours": hours, "bucket": bucket_s, "agent_id": agent_id, "newest": newest})
    if points:
        last = max(p["bucket"] for p in points)
        first = last - (POINTS - 1) * bucket_s * 1000
        for p in points:
            index = (p["bucket"] - first) // (bucket_s * 1000)
            if 0 <= index < POINTS:
                tool = series.setdefault(p["tool"], {"p95_latency_ms": [None] * POINTS, "failure_rate": [None] * POINTS})
                tool["p95_latency_ms"][index] = p["p95_latency_ms"]
                tool["failure_rate"][index] = p["failure_rate"]
    return rows, series


def drift(read: Read, hours: int, agent_id: str = "", *, window_s: int = 300,
          max_columns: int = MAX_DRIFT_COLUMNS) -> dict[tuple[str, str], dict]:
    """Per agent version: its columns (`windows`, epoch ms), its features, and each (feature,
    column) test. A column is a window, or, when the range holds more than `max_columns` windows,
    a bucket of `windows_per_column` windows whose cell is its most telling test (`DRIFT_BUCKETED`);
    a cell's own `window_ms` is the window of its test."""
    out: dict[tuple[str, str], dict] = {}
    newest = _newest(read, NEWEST_DRIFT_WINDOW)
    if newest is None:
        return out
    per_column = max(1, -(-hours * 3600 // (window_s * max_columns)))
    params = {"hours": hours, "agent_id": agent_id, "newest": newest}
    if per_column == 1:
        rows = read(DRIFT, params)
        column = "window_ms"
    else:
        rows = read(DRIFT_BUCKETED, {**params, "bucket": per_column * window_s * 1000})
        column = "bucket_ms"
    for row in rows:
        version = out.setdefault((row["agent_id"], row["agent_version"]),
                                 {"windows": [], "features": [], "cells": {}, "windows_per_column": per_column})
        if row[column] not in version["windows"]:
            version["windows"].append(row[column])
        if row["feature"] not in version["features"]:
            version["features"].append(row["feature"])
        version["cells"][(row["feature"], row[column])] = row
    for version in out.values():
        version["features"].sort()
    return out


def drift_test(read: Read, agent_id: str, agent_version: str, feature: str, window_ms: int) -> dict | None:
    """The test a drift heatmap cell shows (`drift`'s cell of that feature and window)."""
    rows = read(DRIFT_CELL, {"agent_id": agent_id, "agent_version": agent_version, "feature": feature,
                             "window": window_ms})
    return rows[0] if rows else None


def drift_sample(read: Read, agent_id: str, agent_version: str, feature: str, window_ms: int, window_s: int,
                 reference_windows: int = 6) -> dict | None:
    """A feature's values in one window against the version's `reference_windows` windows before it,
    from `runs`: numeric ones as quantiles, categorical ones as shares. (The test itself may have
    used another reference: its `baseline` says which.)"""
    width = window_s * 1000
    params = {"agent_id": agent_id, "agent_version": agent_version, "since": window_ms - reference_windows * width,
              "until": window_ms + width, "window": window_ms}
    if feature in DRIFT_NUMERIC:
        sql = DRIFT_SAMPLE.format(expression=DRIFT_NUMERIC[feature], counted="", grouped="")
        rows = read(sql, params)
        arms = {True: sorted(r["value"] for r in rows if r["current"]), False: sorted(r["value"] for r in rows if not r["current"])}
        from streams.detect.estimators import quantile

        qs = (0.05, 0.25, 0.5, 0.75, 0.95)
        return {"kind": "numeric", "quantiles": list(qs),
                "current": [quantile(arms[True], q) for q in qs], "reference": [quantile(arms[False], q) for q in qs],
                "n_current": len(arms[True]), "n_reference": len(arms[False])}
    if feature in DRIFT_CATEGORICAL:
        sql = DRIFT_SAMPLE.format(expression=DRIFT_CATEGORICAL[feature], counted=", count() AS n",
                                  grouped="GROUP BY current, value")
        rows = read(sql, params)
        totals = {arm: sum(r["n"] for r in rows if bool(r["current"]) == arm) for arm in (True, False)}
        categories = sorted({r["value"] for r in rows})
        share = {(bool(r["current"]), r["value"]): r["n"] / totals[bool(r["current"])] for r in rows}
        return {"kind": "categorical", "categories": [
            {"category": c, "current": share.get((True, c), 0.0), "reference": share.get((False, c), 0.0)} for c in categories],
            "n_current": totals[True], "n_reference": totals[False]}
    return None


FAILURE_MODES = """
WITH (SELECT max(ended_at) FROM runs FINAL) AS newest
SELECT c.cluster_id AS cluster_id, c.kind AS kind, c.label AS label, r.n AS runs, c.size AS size,
       toUnixTimestamp64Milli(c.first_seen) AS first_seen, toUnixTimestamp64Milli(c.last_seen) AS last_seen,
       c.example_run_ids AS example_run_ids, r.recent AS recent_run_ids
FROM
(
    SELECT failure_cluster_id, count() AS n,
           arrayMap(x -> x.2, arraySlice(arrayReverseSort(groupArray((ended_at, run_id))), 1, 3)) AS recent
    FROM runs FINAL
    WHERE failure_cluster_id != '' AND ended_at > newest - toIntervalHour({hours:UInt32})
      AND ({agent_id:String} = '' OR agent_id = {agent_id:String})
    GROUP BY failure_cluster_id
) AS r
INNER JOIN failure_clusters AS c FINAL ON c.cluster_id = r.failure_cluster_id
ORDER BY runs DESC, cluster_id
LIMIT {limit:UInt32}
"""
FAILURE_MODE_AGENTS = """
SELECT cluster_id, agent_id, agent_version, runs
FROM failure_cluster_agents FINAL
WHERE cluster_id IN {ids:Array(String)}
ORDER BY cluster_id, runs DESC, agent_id, agent_version
"""
# The buckets are counted back from the newest run's, so every mode's trend shares one time axis.
FAILURE_MODE_SERIES = """
WITH (SELECT max(ended_at) FROM runs FINAL) AS newest
SELECT failure_cluster_id AS cluster_id,
       toUnixTimestamp(toStartOfInterval(ended_at, toIntervalSecond({bucket:UInt32}))) * 1000 AS bucket,
       count() AS runs
FROM runs FINAL
WHERE failure_cluster_id IN {ids:Array(String)} AND ended_at > newest - toIntervalHour({hours:UInt32})
  AND ({agent_id:String} = '' OR agent_id = {agent_id:String})
GROUP BY cluster_id, bucket
ORDER BY bucket
"""
NEWEST_BUCKET = """
SELECT toUnixTimestamp(toStartOfInterval(max(ended_at), toIntervalSecond({bucket:UInt32}))) * 1000 AS bucket
FROM runs FINAL
"""


def failure_modes(read: Read, hours: int, agent_id: str = "", limit: int = 100) -> list[dict]:
    """The failure modes of the runs that ended in the `hours` that end with the newest run (of one
    agent's runs, with `agent_id`), most runs first: each mode's masked label and kind, its runs in
    the range and its lifetime size, first and last seen, the agents and versions it has failed
    (lifetime runs each, `failure_cluster_agents`), example runs (the newest in the range, then the
    first it saw), and its trend: runs per bucket over the range, POINTS buckets ending with the
    newest run's, 0 where none failed so."""
    rows = read(FAILURE_MODES, {"hours": hours, "agent_id": agent_id, "limit": limit})
    if not rows:
        return []
    ids = [row["cluster_id"] for row in rows]
    agents: dict[str, dict[str, dict]] = {}
    for part in read(FAILURE_MODE_AGENTS, {"ids": ids}):
        agent = agents.setdefault(part["cluster_id"], {}).setdefault(
            part["agent_id"], {"agent_id": part["agent_id"], "runs": 0, "versions": []})
        agent["runs"] += int(part["runs"])
        agent["versions"].append({"agent_version": part["agent_version"], "runs": int(part["runs"])})
    bucket_s = max(hours * 3600 // POINTS, 300)
    (newest,) = read(NEWEST_BUCKET, {"bucket": bucket_s})
    first = int(newest["bucket"]) - (POINTS - 1) * bucket_s * 1000
    trends = {cid: [0] * POINTS for cid in ids}
    for point in read(FAILURE_MODE_SERIES, {"ids": ids, "hours": hours, "bucket": bucket_s, "agent_id": agent_id}):
        index = (int(point["bucket"]) - first) // (bucket_s * 1000)
        if 0 <= index < POINTS:
            trends[point["cluster_id"]][index] += int(point["runs"])
    out = []
    for row in rows:
        cid = row["cluster_id"]
        examples = list(dict.fromkeys(list(row.pop("recent_run_ids")) + list(row.pop("example_run_ids"))))[:5]
        out.append({**row, "runs": int(row["runs"]), "size": int(row["size"]), "example_run_ids": examples,
                    "agents": sorted(agents.get(cid, {}).values(), key=lambda a: (-a["runs"], a["agent_id"])),
                    "trend": {"bucket_ms": [first + i * bucket_s * 1000 for i in range(POINTS)], "runs": trends[cid]}})
    return out
