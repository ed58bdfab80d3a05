-- Every version of every agent that ended a run: when it was first seen and last seen (event
-- time). Inferred rollout roles need a version's first run, whatever the age (a canary is a
-- version first seen after the stable one), and a restart reads it here instead of the whole of
-- `runs`. A run's row landing again (more events, a failure cluster) changes neither bound.
CREATE TABLE IF NOT EXISTS {database}.agent_versions {on_cluster}
(
    agent_id LowCardinality(String),
    agent_version LowCardinality(String),
    first_started_at SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    last_ended_at SimpleAggregateFunction(max, DateTime64(3, 'UTC'))
)
ENGINE = AggregatingMergeTree
ORDER BY (agent_id, agent_version);

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.agent_versions_mv {on_cluster} TO {database}.agent_versions
AS SELECT agent_id, agent_version, min(started_at) AS first_started_at, max(ended_at) AS last_ended_at
FROM {database}.runs
GROUP BY agent_id, agent_version;

-- the runs landed before this migration (one landing beside it is counted twice: min and max do not mind)
INSERT INTO {database}.agent_versions
SELECT agent_id, agent_version, min(started_at), max(ended_at) FROM {database}.runs GROUP BY agent_id, agent_version;
