-- Top failure modes of the last days, with the agents and versions they hit, and example runs.
--
-- Answers: which ways of failing cost us the most runs this week, across the fleet; which agents
-- and versions does each hit, and which runs should I open to see one? A failure mode (a row of
-- failure_clusters) groups the failed runs of one root cause whichever agent, version or last tool:
-- its mode key (kind: loop, timeout, or outcome|error class) and its masked error template (ids,
-- numbers and paths replaced); its id is stable, so the same mode keeps its cluster_id across days
-- and restarts.
--
-- Source: runs (each failed run carries its failure_cluster_id) counted over the period, joined
-- with failure_clusters (label, lifetime size, first/last seen, first example runs) and its
-- breakdown failure_cluster_agents (lifetime runs per agent version).
--
-- Parameters:
-- @param days UInt32 7          look-back, in days of event time, ending at the newest run in the store
-- @param agent_id String ''     only the runs of one agent, or '' for every agent
-- @param limit UInt32 20        modes returned
--
-- "This week" ends at the newest run's ended_at, not at now(): live the two coincide, and a
-- replayed or paused store still answers about its own last week.
--
-- Reading the result: one row per mode, most runs in the period first. runs_in_period /
-- runs_total tells a new or growing mode (close to 1) from an old steady one; share_of_failures
-- is its part of the clustered failures in the period (of that agent's, with agent_id); agents
-- and versions list whom it hit in the period (one version only: suspect that version; several
-- agents at once: suspect a shared dependency); by_agent_version is the lifetime breakdown,
-- "agent/version: runs". example_run_ids are the first runs the mode saw (stored with it),
-- recent_run_ids the newest in the period, latest_error the raw (unmasked) message of the newest
-- one; open a run with `SELECT * FROM runs FINAL WHERE run_id = '...'` or its events in `events`.
--
-- Deduplication: explicit FINAL on every table.
WITH (SELECT max(ended_at) FROM runs FINAL) AS newest
SELECT
    c.cluster_id AS cluster_id,
    c.kind AS kind,
    c.label AS label,
    r.n AS runs_in_period,
    c.size AS runs_total,
    round(r.n / sum(r.n) OVER (), 4) AS share_of_failures,
    r.agents AS agents,
    r.versions AS versions,
    b.by_agent_version AS by_agent_version,
    r.outcomes AS outcomes,
    r.cost AS cost_usd_in_period,
    c.first_seen AS first_seen,
    c.last_seen AS last_seen,
    c.example_run_ids AS example_run_ids,
    r.recent AS recent_run_ids,
    r.latest_error AS latest_error
FROM
(
    SELECT
        failure_cluster_id,
        count() AS n,
        arraySort(groupUniqArray(toString(agent_id))) AS agents,
        arraySort(groupUniqArray(concat(toString(agent_id), '/', toString(agent_version)))) AS versions,
        arraySort(groupUniqArray(toString(outcome))) AS outcomes,
        toFloat64(sum(cost_usd)) AS cost,
        arrayMap(x -> x.2, arraySlice(arrayReverseSort(groupArray((ended_at, run_id))), 1, 3)) AS recent,
        argMax(error_message, ended_at) AS latest_error
    FROM runs FINAL
    WHERE failure_cluster_id != ''
      AND ended_at > newest - toIntervalDay({days:UInt32})
      AND ({agent_id:String} = '' OR agent_id = {agent_id:String})
    GROUP BY failure_cluster_id
) AS r
INNER JOIN failure_clusters AS c FINAL ON c.cluster_id = r.failure_cluster_id
LEFT JOIN
(
    SELECT cluster_id,
           arraySort(groupArray(concat(toString(agent_id), '/', toString(agent_version), ': ', toString(runs)))) AS by_agent_version
    FROM failure_cluster_agents FINAL
    GROUP BY cluster_id
) AS b ON b.cluster_id = r.failure_cluster_id
ORDER BY runs_in_period DESC, cluster_id
LIMIT {limit:UInt32}
