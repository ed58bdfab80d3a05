"""Arrow schemas of the rows Trackside lands in ClickHouse, and the one way to build them.
Columns as in sql/migrations; money rounded to Decimal(18, 9) here (streams/contracts/README.md)."""

from __future__ import annotations

from operator import itemgetter

import pyarrow as pa
import pyarrow.compute as pc

_TS = pa.timestamp("ms", tz="UTC")
_TEXT = pa.string()
_MONEY = pa.decimal128(18, 9)
_COUNTS_BY = pa.map_(pa.string(), pa.uint32())  # e.g. guardrail hits by "policy:decision"

EVENTS = pa.schema(
    [
        ("event_id", _TEXT), ("ts", _TS), ("type", _TEXT), ("run_id", _TEXT),
        ("agent_id", _TEXT), ("agent_version", _TEXT), ("task_id", _TEXT), ("session_id", _TEXT),
        ("tenant", _TEXT), ("environment", _TEXT), ("model", _TEXT), ("provider", _TEXT),
        ("input_tokens", pa.uint64()), ("output_tokens", pa.uint64()), ("cache_read_input_tokens", pa.uint64()),
        ("latency_ms", pa.float64()), ("status", _TEXT), ("error_type", _TEXT), ("error_message", _TEXT),
        ("tool", _TEXT), ("args_hash", _TEXT), ("args", _TEXT), ("outcome", _TEXT), ("score", pa.float64()),
        ("cost_usd", _MONEY), ("cost_source", _TEXT), ("attributes", _TEXT),
        ("action", _TEXT), ("approver", _TEXT), ("wait_ms", pa.float64()), ("policy", _TEXT), ("decision", _TEXT),
        ("label", _TEXT), ("feedback_source", _TEXT),
        ("source", _TEXT), ("ingested_at", _TS),
    ]
)

RUNS = pa.schema(
    [
        ("run_id", _TEXT), ("agent_id", _TEXT), ("agent_version", _TEXT), ("task_id", _TEXT),
        ("session_id", _TEXT), ("tenant", _TEXT), ("environment", _TEXT),
        ("started_at", _TS), ("ended_at", _TS), ("outcome", _TEXT), ("score", pa.float64()),
        ("error_type", _TEXT), ("error_message", _TEXT),
        ("steps", pa.uint32()), ("llm_calls", pa.uint32()), ("tool_calls", pa.uint32()),
        ("tool_errors", pa.uint32()), ("llm_errors", pa.uint32()),
        ("input_tokens", pa.uint64()), ("output_tokens", pa.uint64()), ("cache_read_input_tokens", pa.uint64()),
        ("cost_usd", _MONEY), ("cost_source", _TEXT), ("unpriced_calls", pa.uint32()),
        ("duration_ms", pa.uint64()), ("tool_path", pa.list_(_TEXT)), ("tool_retries", pa.list_(_TEXT)),
        ("loop_detected", pa.bool_()),
        ("failure_cluster_id", _TEXT), ("event_count", pa.uint32()), ("closed_by", _TEXT),
        ("version", pa.uint64()), ("updated_at", _TS),
        ("policy_hits", _COUNTS_BY), ("approvals_requested", pa.uint32()), ("approvals_granted", pa.uint32()),
        ("approvals_denied", pa.uint32()), ("approvals_expired", pa.uint32()),
        ("approval_waits_ms", pa.list_(pa.float64())), ("feedback_count", pa.uint32()),
        ("feedback_score", pa.float64()),
    ]
)

AGENT_METRICS = pa.schema(
    [
        ("agent_id", _TEXT), ("agent_version", _TEXT), ("window_start", _TS), ("window_end", _TS),
        ("runs", pa.uint32()), ("successes", pa.uint32()), ("failures", pa.uint32()), ("timeouts", pa.uint32()),
        ("cost_usd", _MONEY), ("cost_per_success", _MONEY), ("success_rate", pa.float64()),
        ("p50_duration_ms", pa.float64()), ("p95_duration_ms", pa.float64()), ("loop_rate", pa.float64()),
        ("tool_calls", pa.uint32()), ("tool_errors", pa.uint32()), ("tool_error_rate", pa.float64()),
        ("input_tokens", pa.uint64()), ("output_tokens", pa.uint64()),
        ("is_final", pa.bool_()), ("version", pa.uint64()), ("updated_at", _TS),
        ("policy_hits", pa.uint32()), ("policy_hits_by", _COUNTS_BY), ("guardrail_runs", pa.uint32()),
        ("guardrail_rate", pa.float64()), ("approvals_requested", pa.uint32()), ("approvals_granted", pa.uint32()),
        ("approvals_denied", pa.uint32()), ("approvals_expired", pa.uint32()),
        ("approval_wait_p50_ms", pa.float64()), ("approval_wait_p95_ms", pa.float64()),
        ("escalations", pa.uint32()), ("escalation_rate", pa.float64()), ("escalation_steps_p50", pa.float64()),
        ("escalation_seconds_p50", pa.float64()), ("feedback_count", pa.uint32()), ("feedback_score", pa.float64()),
    ]
)

DEAD_LETTERS = pa.schema(
    [
        ("received_at", _TS), ("source", _TEXT), ("topic", _TEXT), ("partition", pa.uint32()),
        ("offset", pa.uint64()), ("key", pa.binary()), ("error", _TEXT), ("payload", pa.binary()),
        ("payload_bytes", pa.uint64()),
    ]
)

ALERTS = pa.schema(
    [
        ("alert_id", _TEXT), ("ts", _TS), ("kind", _TEXT), ("severity", _TEXT), ("status", _TEXT),
        ("fingerprint", _TEXT), ("agent_id", _TEXT), ("agent_version", _TEXT), ("run_id", _TEXT),
        ("summary", _TEXT), ("evidence", _TEXT), ("action", _TEXT),
    ]
)

DRIFT = pa.schema(
    [
        ("agent_id", _TEXT), ("agent_version", _TEXT), ("window", _TS), ("feature", _TEXT), ("statistic", _TEXT),
        ("value", pa.float64()), ("p_value", pa.float64()), ("threshold", pa.float64()), ("baseline", _TEXT),
        ("significant", pa.bool_()), ("updated_at", _TS),
    ]
)

FAILURE_CLUSTERS = pa.schema(
    [
        ("cluster_id", _TEXT), ("agent_id", _TEXT), ("label", _TEXT), ("size", pa.uint64()), ("first_seen", _TS),
        ("last_seen", _TS), ("example_run_ids", pa.list_(_TEXT)), ("updated_at", _TS), ("kind", _TEXT),
        ("seed_signature", _TEXT), ("agents", pa.list_(_TEXT)),
    ]
)

# A failure mode's breakdown: its runs per agent version (0007_failure_modes.sql).
FAILURE_CLUSTER_AGENTS = pa.schema(
    [
        ("cluster_id", _TEXT), ("agent_id", _TEXT), ("agent_version", _TEXT), ("runs", pa.uint64()),
        ("first_seen", _TS), ("last_seen", _TS), ("updated_at", _TS),
    ]
)

ROLLBACKS = pa.schema(
    [
        ("rollback_id", _TEXT), ("ts", _TS), ("agent_id", _TEXT), ("from_version", _TEXT), ("to_version", _TEXT),
        ("reason", _TEXT), ("alert_ids", pa.list_(_TEXT)), ("evidence", _TEXT),
    ]
)

CONTROLS = pa.schema(
    [
        ("control_id", _TEXT), ("ts", _TS), ("action", _TEXT), ("agent_id", _TEXT), ("agent_version", _TEXT),
        ("run_id", _TEXT), ("reason", _TEXT), ("issued_by", _TEXT), ("alert_id", _TEXT), ("evidence", _TEXT),
    ]
)

DEPLOYMENTS = pa.schema(
    [
        ("agent_id", _TEXT), ("version", _TEXT), ("role", _TEXT), ("traffic_pct", pa.float64()), ("ts", _TS),
        ("source", _TEXT), ("config", _TEXT),
    ]
)

# One row per run of `trackside gate` (SPEC §11); `versions` has no schema here: only its
# materialized views write it (sql/migrations/0008_versions_gates.sql).
GATES = pa.schema(
    [
        ("gate_id", _TEXT), ("ts", _TS), ("agent_id", _TEXT), ("candidate", _TEXT), ("baseline", _TEXT),
        ("environment", _TEXT), ("tasks", pa.uint32()), ("verdict", _TEXT), ("exit_code", pa.uint8()),
        ("reason", _TEXT), ("evidence", _TEXT),
    ]
)

CANARIES = pa.schema(
    [
        ("agent_id", _TEXT), ("version", _TEXT), ("stable_version", _TEXT), ("since", _TS), ("inferred", pa.bool_()),
        ("decision", _TEXT), ("decided_at", _TS), ("canary_runs", pa.uint64()), ("stable_runs", pa.uint64()),
        ("reason", _TEXT), ("evidence", _TEXT), ("updated_at", _TS), ("role", _TEXT),
    ]
)

# How far each assembler partition had come (its watermark): where recovery starts reading.
STAGE_PROGRESS = pa.schema([("stage", _TEXT), ("partition", pa.uint16()), ("watermark", _TS), ("updated_at", _TS)])

BY_TABLE = {
    "events": EVENTS, "runs": RUNS, "agent_metrics": AGENT_METRICS, "dead_letters": DEAD_LETTERS, "alerts": ALERTS,
    "drift": DRIFT, "failure_clusters": FAILURE_CLUSTERS, "failure_cluster_agents": FAILURE_CLUSTER_AGENTS,
    "rollbacks": ROLLBACKS, "deployments": DEPLOYMENTS,
    "canaries": CANARIES, "stage_progress": STAGE_PROGRESS, "controls": CONTROLS, "gates": GATES,
}


def to_arrow(rows: list[dict] | list[list], schema: pa.Schema) -> pa.Table:
    """Rows as an Arrow table, column by column: dicts with at least the schema's names, or
    sequences holding the schema's columns in its order (the ingest stage's `events` rows).

    Column-wise construction is ~10x faster than `pa.Table.from_pylist` here.
    """
    if rows and not isinstance(rows[0], dict):
        values_of = zip(*rows)
    else:
        values_of = (list(map(itemgetter(name), rows)) for name in schema.names)
    columns = []
    for field, values in zip(schema, values_of):
        if pa.types.is_decimal(field.type):
            floats = pa.array(values, pa.float64())
            # safe=False rounds to the scale, and would also wrap a value too large for the
            # precision into garbage (0 for 1e10): refuse those, so the row is a dead letter.
            largest = pc.max(pc.abs(floats)).as_py()
            if largest is not None and largest >= 10 ** (field.type.precision - field.type.scale):
                raise pa.ArrowInvalid(f"{field.name}: {largest} does not fit {field.type}")
            columns.append(floats.cast(field.type, safe=False))
        else:
            columns.append(pa.array(values, field.type))
    if len(columns) != len(schema):
        raise ValueError(f"rows of {len(columns)} columns for a table of {len(schema)}")
    return pa.Table.from_arrays(columns, schema=schema)
