-- Versions and evaluation gates (issue 17, SPEC §5 `config`, §8 `versions` and `gates`, §11).

-- A deployment event's `config` (SPEC §5): the version's configuration as deploy tooling knows
-- it, as canonical JSON (keys sorted); '' when the event had none.
ALTER TABLE {database}.deployments {on_cluster}
    ADD COLUMN IF NOT EXISTS config String DEFAULT '' COMMENT 'JSON, keys sorted; empty: none sent';

-- One row per gate run of `trackside gate` (SPEC §11), exit 2 included, with its evidence.
CREATE TABLE IF NOT EXISTS {database}.gates {on_cluster}
(
    gate_id String,
    ts DateTime64(3, 'UTC') COMMENT 'when the gate ran (wall clock)',
    agent_id LowCardinality(String),
    candidate LowCardinality(String),
    baseline LowCardinality(String),
    environment LowCardinality(String),
    tasks UInt32 COMMENT 'paired tasks: run by both versions in the environment',
    verdict LowCardinality(String) COMMENT 'pass | fail | insufficient',
    exit_code UInt8 COMMENT '0 pass, 1 fail, 2 fewer paired tasks than the minimum',
    reason String,
    evidence String COMMENT 'JSON: every metric of both versions, test, p-value, bound, margin, alpha, tasks'
)
ENGINE = ReplacingMergeTree
ORDER BY (agent_id, gate_id);

-- Every version of every agent (SPEC §8): fed live by materialized views from the runs, the
-- deployment events (roles, config), the canary analyses and the gates, each inserting a partial
-- row that the engine folds into one per (agent_id, version). Every column is an idempotent
-- aggregate (min, max, any, distinct union), so a row landing twice changes nothing; read with
-- FINAL. A view that fails makes the insert into its source fail (the sink then sends that message
-- to the dead letters), so each casts defensively: the sink's Arrow blocks may type columns Nullable.
-- `config` is the first config received; a version is meant to be immutable, so more than
-- one distinct config in `configs` (`config_changed`) means it changed under the same name.
CREATE TABLE IF NOT EXISTS {database}.versions {on_cluster}
(
    agent_id LowCardinality(String),
    version LowCardinality(String),
    first_seen SimpleAggregateFunction(min, Nullable(DateTime64(3, 'UTC'))) COMMENT 'first run start or deployment (event time)',
    last_seen SimpleAggregateFunction(max, Nullable(DateTime64(3, 'UTC'))) COMMENT 'last run end or deployment (event time)',
    config SimpleAggregateFunction(any, Nullable(String)) COMMENT 'JSON: the first config received; NULL: none',
    configs SimpleAggregateFunction(groupUniqArrayArray, Array(String)) COMMENT 'every distinct config received',
    roles SimpleAggregateFunction(groupUniqArrayArray, Array(String)) COMMENT 'roles of its deployment events',
    canary SimpleAggregateFunction(max, Tuple(DateTime64(3, 'UTC'), String)) COMMENT '(updated_at, decision) of its latest canary analysis',
    gate SimpleAggregateFunction(max, Tuple(DateTime64(3, 'UTC'), String)) COMMENT '(ts, verdict) of its latest gate as candidate',
    canary_verdict String ALIAS tupleElement(canary, 2) COMMENT 'pending | promote | rollback; empty: never a canary',
    gate_verdict String ALIAS tupleElement(gate, 2) COMMENT 'pass | fail | insufficient; empty: never gated',
    config_changed Bool ALIAS length(configs) > 1
)
ENGINE = AggregatingMergeTree
ORDER BY (agent_id, version);

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.versions_runs_mv {on_cluster} TO {database}.versions
AS SELECT agent_id, agent_version AS version,
    CAST(min(started_at) AS Nullable(DateTime64(3, 'UTC'))) AS first_seen,
    CAST(max(ended_at) AS Nullable(DateTime64(3, 'UTC'))) AS last_seen,
    CAST(NULL AS Nullable(String)) AS config, CAST([] AS Array(String)) AS configs, CAST([] AS Array(String)) AS roles,
    (toDateTime64(0, 3, 'UTC'), '') AS canary, (toDateTime64(0, 3, 'UTC'), '') AS gate
FROM {database}.runs
GROUP BY agent_id, agent_version;

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.versions_deployments_mv {on_cluster} TO {database}.versions
AS SELECT agent_id, version,
    CAST(ts AS Nullable(DateTime64(3, 'UTC'))) AS first_seen, CAST(ts AS Nullable(DateTime64(3, 'UTC'))) AS last_seen,
    -- an inserted block may type `config` Nullable: every use goes through ifNull
    CAST(nullIf(ifNull(config, ''), '') AS Nullable(String)) AS config,
    CAST(arrayFilter(c -> c != '', [ifNull(config, '')]) AS Array(String)) AS configs,
    [toString(role)] AS roles,
    (toDateTime64(0, 3, 'UTC'), '') AS canary, (toDateTime64(0, 3, 'UTC'), '') AS gate
FROM {database}.deployments;

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.versions_canaries_mv {on_cluster} TO {database}.versions
AS SELECT agent_id, version,
    CAST(NULL AS Nullable(DateTime64(3, 'UTC'))) AS first_seen, CAST(NULL AS Nullable(DateTime64(3, 'UTC'))) AS last_seen,
    CAST(NULL AS Nullable(String)) AS config, CAST([] AS Array(String)) AS configs, CAST([] AS Array(String)) AS roles,
    (assumeNotNull(updated_at), toString(assumeNotNull(decision))) AS canary, (toDateTime64(0, 3, 'UTC'), '') AS gate
FROM {database}.canaries;

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.versions_gates_mv {on_cluster} TO {database}.versions
AS SELECT agent_id, candidate AS version,
    CAST(NULL AS Nullable(DateTime64(3, 'UTC'))) AS first_seen, CAST(NULL AS Nullable(DateTime64(3, 'UTC'))) AS last_seen,
    CAST(NULL AS Nullable(String)) AS config, CAST([] AS Array(String)) AS configs, CAST([] AS Array(String)) AS roles,
    (toDateTime64(0, 3, 'UTC'), '') AS canary, (assumeNotNull(ts), toString(assumeNotNull(verdict))) AS gate
FROM {database}.gates;

-- what landed before this migration (a row landing beside it is folded in twice: the aggregates do not mind)
INSERT INTO {database}.versions (agent_id, version, first_seen, last_seen, config, configs, roles, canary, gate)
SELECT agent_id, agent_version, min(started_at), max(ended_at), NULL, [], [], (toDateTime64(0, 3, 'UTC'), ''),
    (toDateTime64(0, 3, 'UTC'), '')
FROM {database}.runs GROUP BY agent_id, agent_version;

INSERT INTO {database}.versions (agent_id, version, first_seen, last_seen, config, configs, roles, canary, gate)
SELECT agent_id, version, ts, ts, NULL, [], [toString(role)], (toDateTime64(0, 3, 'UTC'), ''), (toDateTime64(0, 3, 'UTC'), '')
FROM {database}.deployments;

INSERT INTO {database}.versions (agent_id, version, first_seen, last_seen, config, configs, roles, canary, gate)
SELECT agent_id, version, NULL, NULL, NULL, [], [], (updated_at, toString(decision)), (toDateTime64(0, 3, 'UTC'), '')
FROM {database}.canaries;
