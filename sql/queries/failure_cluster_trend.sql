-- Failure mode trend: runs per failure mode, agent and time bucket, for the largest modes.
--
-- Answers: is this failure mode new, growing, steady or gone? Did it start with a deploy (look at
-- versions) or at one moment for every version (a dependency)? Did it spread from one agent to
-- others (a row per agent it hit)? The companion of top_failure_clusters.sql, over time.
--
-- Source: runs (failure_cluster_id, ended_at), labels from failure_clusters; the `top` largest
-- modes of the period, by runs in it (of every agent, or of `agent_id`).
--
-- Parameters:
-- @param days UInt32 7             look-back, in days of event time, ending at the newest run in the store
-- @param bucket_seconds UInt32 3600  bucket width in seconds (900 = 15 minutes)
-- @param top UInt32 8              clusters shown (largest in the period)
-- @param agent_id String ''        one agent, or '' for every agent
--
-- Reading the result: one row per (mode, agent, bucket) that had at least one such failed run, in
-- time order; a bucket without a row had none. runs_of_agent is every run of that agent that
-- ended in the bucket, so share = failures of this mode / all runs of the agent: a rising share
-- is a real increase, a rising count with a flat share is only more traffic. versions are the
-- agent's versions hit in the bucket.
--
-- Deduplication: explicit FINAL on runs and failure_clusters.
WITH
    (SELECT max(ended_at) FROM runs FINAL) AS newest,
    period AS
    (
        SELECT agent_id, agent_version, failure_cluster_id,
               toStartOfInterval(ended_at, toIntervalSecond({bucket_seconds:UInt32})) AS bucket_start
        FROM runs FINAL
        WHERE ended_at > newest - toIntervalDay({days:UInt32})
          AND ({agent_id:String} = '' OR agent_id = {agent_id:String})
    ),
    top_clusters AS
    (
        SELECT failure_cluster_id
        FROM period
        WHERE failure_cluster_id != ''
        GROUP BY failure_cluster_id
        ORDER BY count() DESC, failure_cluster_id
        LIMIT {top:UInt32}
    ),
    traffic AS
    (
        SELECT agent_id, bucket_start, count() AS runs_of_agent
        FROM period
        GROUP BY agent_id, bucket_start
    )
SELECT
    f.failure_cluster_id AS cluster_id,
    f.agent_id AS agent_id,
    c.label AS label,
    f.bucket_start AS bucket_start,
    count() AS runs,
    any(t.runs_of_agent) AS runs_of_agent,
    round(count() / any(t.runs_of_agent), 4) AS share,
    arraySort(groupUniqArray(f.agent_version)) AS versions
FROM period AS f
INNER JOIN failure_clusters AS c FINAL ON c.cluster_id = f.failure_cluster_id
INNER JOIN traffic AS t ON t.agent_id = f.agent_id AND t.bucket_start = f.bucket_start
WHERE f.failure_cluster_id IN (SELECT failure_cluster_id FROM top_clusters)
GROUP BY cluster_id, agent_id, label, bucket_start
ORDER BY bucket_start, runs DESC, cluster_id
