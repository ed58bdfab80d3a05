-- Failure modes across the fleet (issue 15): a row of `failure_clusters` is one failure mode of
-- every agent (one root cause), no longer a cluster of one agent; `agent_id` is the agent that
-- failed first in it. Its mode key (`kind`: loop, timeout, or "outcome|error class") and the
-- template of its first run (`seed_signature`) are what its id is made of, and what a restart
-- puts back; `agents` lists every agent it has failed. The breakdown per agent and version is
-- `failure_cluster_agents`.
ALTER TABLE {database}.failure_clusters {on_cluster}
    ADD COLUMN IF NOT EXISTS kind String COMMENT 'mode key: loop | timeout | outcome|error class',
    ADD COLUMN IF NOT EXISTS seed_signature String COMMENT 'masked template of its first run',
    ADD COLUMN IF NOT EXISTS agents Array(String) COMMENT 'every agent it has failed';

CREATE TABLE IF NOT EXISTS {database}.failure_cluster_agents {on_cluster}
(
    cluster_id String,
    agent_id LowCardinality(String),
    agent_version LowCardinality(String),
    runs UInt64 COMMENT 'failed runs of this agent version in the mode, over its lifetime',
    first_seen DateTime64(3, 'UTC'),
    last_seen DateTime64(3, 'UTC'),
    updated_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (cluster_id, agent_id, agent_version);
