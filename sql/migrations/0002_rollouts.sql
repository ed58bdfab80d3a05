-- Rollout state and canary decisions (issue 4).

-- Every deployment event received on agent.deployments (SPEC §5), as sent.
CREATE TABLE IF NOT EXISTS {database}.deployments {on_cluster}
(
    agent_id LowCardinality(String),
    version LowCardinality(String),
    role LowCardinality(String),
    traffic_pct Float64,
    ts DateTime64(3, 'UTC'),
    source String COMMENT 'topic:partition:offset'
)
ENGINE = ReplacingMergeTree
ORDER BY (agent_id, ts, version, role);

-- One row per canary analysis (agent, canary version, stable version it is compared with):
-- the latest verdict, pending, rollback or promote, with its evidence. A canary as good as
-- stable is promoted here; it is never rolled back.
CREATE TABLE IF NOT EXISTS {database}.canaries {on_cluster}
(
    agent_id LowCardinality(String),
    version LowCardinality(String),
    stable_version LowCardinality(String),
    since DateTime64(3, 'UTC') COMMENT 'event time the canary started (deployment or first run)',
    inferred Bool COMMENT 'roles inferred from traffic, no deployment events',
    decision LowCardinality(String) COMMENT 'pending | rollback | promote',
    decided_at Nullable(DateTime64(3, 'UTC')) COMMENT 'event time of the verdict',
    canary_runs UInt64,
    stable_runs UInt64,
    reason String,
    evidence String COMMENT 'JSON: every metric, both arms, sample sizes, statistic, always-valid p-value',
    updated_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (agent_id, version, stable_version);
