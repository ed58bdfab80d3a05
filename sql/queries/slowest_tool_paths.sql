-- Slowest tool paths: which sequences of tool calls make runs slow.
--
-- Answers: per agent, which paths through the tools (the order in which a run called them) take
-- longest end to end, how often they are taken, and whether the slow ones succeed. Helps decide
-- which tool to make faster or which detour to prompt away.
--
-- Source: runs (tool_path, duration_ms, outcome, steps, cost_usd). A path is the run's tool_path
-- with immediate repeats collapsed (search > read > read > edit becomes search > read > edit),
-- so retries and pagination do not split one path into many; `calls` counts them anyway.
--
-- Parameters:
-- @param days UInt32 7          look-back, in days of event time, ending at the newest run in the store
-- @param agent_id String ''     one agent, or '' for every agent
-- @param min_runs UInt32 5      paths taken by fewer runs are left out (their percentiles are noise)
-- @param limit UInt32 20        paths returned
--
-- Reading the result: one row per (agent_id, path), slowest p95 first. p50/p95_duration_ms are
-- over the path's runs; vs_agent_p50 = the path's p50 / the agent's p50 over all its runs (2.0 =
-- twice as slow as the agent's typical run). share_of_runs is how much of the agent's traffic
-- takes the path: a slow path that is rare matters less than a moderately slow common one.
-- Runs without any tool call have the path '(no tools)'. Timed-out runs are in (their duration
-- ends at their last event), see outcomes.
--
-- Deduplication: explicit FINAL.
WITH
    (SELECT max(ended_at) FROM runs FINAL) AS newest,
    period AS
    (
        SELECT
            agent_id,
            duration_ms,
            outcome,
            steps,
            cost_usd,
            length(tool_path) AS n_calls,
            arrayFilter((t, i) -> i = 1 OR t != tool_path[i - 1], tool_path, arrayEnumerate(tool_path)) AS collapsed
        FROM runs FINAL
        WHERE ended_at > newest - toIntervalDay({days:UInt32})
          AND ({agent_id:String} = '' OR agent_id = {agent_id:String})
    )
SELECT
    p.agent_id AS agent_id,
    if(empty(p.collapsed), '(no tools)', arrayStringConcat(p.collapsed, ' > ')) AS path,
    count() AS runs,
    round(count() / any(a.agent_runs), 4) AS share_of_runs,
    quantile(0.5)(p.duration_ms) AS p50_duration_ms,
    quantile(0.95)(p.duration_ms) AS p95_duration_ms,
    round(quantile(0.5)(p.duration_ms) / any(a.agent_p50), 3) AS vs_agent_p50,
    avg(p.n_calls) AS avg_tool_calls,
    avg(p.steps) AS avg_steps,
    countIf(p.outcome = 'success') / count() AS success_rate,
    toFloat64(sum(p.cost_usd)) / count() AS cost_per_run,
    arraySort(groupUniqArray(toString(p.outcome))) AS outcomes
FROM period AS p
INNER JOIN
(
    SELECT agent_id, count() AS agent_runs, quantile(0.5)(duration_ms) AS agent_p50
    FROM period
    GROUP BY agent_id
) AS a ON a.agent_id = p.agent_id
GROUP BY agent_id, path
HAVING runs >= {min_runs:UInt32}
ORDER BY p95_duration_ms DESC, agent_id, path
LIMIT {limit:UInt32}
