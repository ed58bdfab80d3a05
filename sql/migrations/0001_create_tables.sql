-- The tables of SPEC §8. Every table that can receive a row twice (at-least-once delivery)
-- is a ReplacingMergeTree keyed by its natural id; readers use FINAL (trackside sql does).
-- {database} and {on_cluster} are filled in by the migration runner.

CREATE TABLE IF NOT EXISTS {database}.events {on_cluster}
(
    event_id String,
    ts DateTime64(3, 'UTC'),
    type LowCardinality(String),
    run_id String,
    agent_id LowCardinality(String),
    agent_version LowCardinality(String),
    task_id String,
    session_id String,
    tenant LowCardinality(String),
    environment LowCardinality(String),
    model LowCardinality(String),
    provider LowCardinality(String),
    input_tokens UInt64,
    output_tokens UInt64,
    cache_read_input_tokens UInt64,
    latency_ms Nullable(Float64),
    status LowCardinality(String),
    error_type LowCardinality(String),
    error_message String,
    tool LowCardinality(String),
    args_hash String,
    args String COMMENT 'raw tool arguments, only when TRACKSIDE_STORE_RAW_TOOL_ARGS is set',
    outcome LowCardinality(String),
    score Nullable(Float64),
    cost_usd Nullable(Decimal(18, 9)),
    cost_source LowCardinality(String) COMMENT 'reported | price_table | unknown, empty when the event has no cost',
    attributes String COMMENT 'JSON',
    source String COMMENT 'topic:partition:offset it was read from',
    ingested_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(ts)
ORDER BY (agent_id, toDate(ts), event_id);

CREATE TABLE IF NOT EXISTS {database}.runs {on_cluster}
(
    run_id String,
    agent_id LowCardinality(String),
    agent_version LowCardinality(String),
    task_id String,
    session_id String,
    tenant LowCardinality(String),
    environment LowCardinality(String),
    started_at DateTime64(3, 'UTC'),
    ended_at DateTime64(3, 'UTC'),
    outcome LowCardinality(String) COMMENT 'success | failure | escalated | aborted | timeout',
    score Nullable(Float64),
    error_type LowCardinality(String),
    error_message String,
    steps UInt32 COMMENT 'llm_calls + tool_calls',
    llm_calls UInt32,
    tool_calls UInt32,
    tool_errors UInt32 COMMENT 'tool calls with status error or timeout',
    llm_errors UInt32,
    input_tokens UInt64,
    output_tokens UInt64,
    cache_read_input_tokens UInt64,
    cost_usd Decimal(18, 9),
    cost_source LowCardinality(String) COMMENT 'reported | price_table | mixed | unknown | none',
    unpriced_calls UInt32 COMMENT 'llm calls with no reported cost and a model not in the price table',
    duration_ms UInt64,
    tool_path Array(String),
    loop_detected Bool,
    failure_cluster_id String,
    event_count UInt32 COMMENT 'distinct events assembled into this row',
    closed_by LowCardinality(String) COMMENT 'run_end | idle_timeout',
    version UInt64 COMMENT 'a row with more events replaces one with fewer',
    updated_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (agent_id, run_id);

CREATE TABLE IF NOT EXISTS {database}.agent_metrics {on_cluster}
(
    agent_id LowCardinality(String),
    agent_version LowCardinality(String),
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    runs UInt32 COMMENT 'runs that ended in the window',
    successes UInt32,
    failures UInt32 COMMENT 'every outcome but success',
    timeouts UInt32,
    cost_usd Decimal(18, 9) COMMENT 'cost of all runs of the window, failed ones too',
    cost_per_success Nullable(Decimal(18, 9)) COMMENT 'cost_usd / successes; NULL when nothing succeeded',
    success_rate Float64,
    p50_duration_ms Float64,
    p95_duration_ms Float64,
    loop_rate Float64,
    tool_calls UInt32,
    tool_errors UInt32,
    tool_error_rate Float64,
    input_tokens UInt64,
    output_tokens UInt64,
    is_final Bool COMMENT 'the watermark has passed window_end + allowed lateness',
    version UInt64,
    updated_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (agent_id, agent_version, window_start);

CREATE TABLE IF NOT EXISTS {database}.dead_letters {on_cluster}
(
    received_at DateTime64(3, 'UTC'),
    source String COMMENT 'topic:partition:offset',
    topic LowCardinality(String),
    partition UInt32,
    offset UInt64,
    key String,
    error String,
    payload String COMMENT 'the rejected bytes, cut at 1 MiB (the DLQ topic has them whole)',
    payload_bytes UInt64
)
ENGINE = ReplacingMergeTree(received_at)
ORDER BY (topic, partition, offset);

CREATE TABLE IF NOT EXISTS {database}.alerts {on_cluster}
(
    alert_id String,
    ts DateTime64(3, 'UTC'),
    kind LowCardinality(String),
    severity LowCardinality(String),
    status LowCardinality(String),
    fingerprint String,
    agent_id LowCardinality(String),
    agent_version LowCardinality(String),
    run_id String,
    summary String,
    evidence String COMMENT 'JSON',
    action LowCardinality(String)
)
ENGINE = ReplacingMergeTree
ORDER BY (agent_id, alert_id);

CREATE TABLE IF NOT EXISTS {database}.rollbacks {on_cluster}
(
    rollback_id String,
    ts DateTime64(3, 'UTC'),
    agent_id LowCardinality(String),
    from_version LowCardinality(String),
    to_version LowCardinality(String),
    reason String,
    alert_ids Array(String),
    evidence String COMMENT 'JSON'
)
ENGINE = ReplacingMergeTree
ORDER BY (agent_id, rollback_id);

CREATE TABLE IF NOT EXISTS {database}.drift {on_cluster}
(
    agent_id LowCardinality(String),
    agent_version LowCardinality(String),
    window DateTime64(3, 'UTC') COMMENT 'start of the window tested',
    feature LowCardinality(String),
    statistic LowCardinality(String) COMMENT 'the test: ks, wasserstein, psi, chi2, js',
    value Float64,
    p_value Nullable(Float64),
    threshold Float64,
    baseline String COMMENT 'what the window was compared with',
    significant Bool,
    updated_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (agent_id, agent_version, window, feature, statistic);

CREATE TABLE IF NOT EXISTS {database}.failure_clusters {on_cluster}
(
    cluster_id String,
    agent_id LowCardinality(String),
    label String,
    size UInt64,
    first_seen DateTime64(3, 'UTC'),
    last_seen DateTime64(3, 'UTC'),
    example_run_ids Array(String),
    updated_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY cluster_id;
