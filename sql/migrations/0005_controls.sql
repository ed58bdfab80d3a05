-- Controls (SPEC §9): the audit trail of `trackside.controls`, one row per control as it was
-- sent (a control sent again with the same id, e.g. after a restart, is one row).
CREATE TABLE IF NOT EXISTS {database}.controls {on_cluster}
(
    control_id String,
    ts DateTime64(3, 'UTC'),
    action LowCardinality(String),
    agent_id LowCardinality(String),
    agent_version LowCardinality(String),
    run_id String,
    reason String,
    issued_by String,
    alert_id String,
    evidence String COMMENT 'JSON'
)
ENGINE = ReplacingMergeTree
ORDER BY control_id;
