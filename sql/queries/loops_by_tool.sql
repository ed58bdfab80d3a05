-- Loops by tool: which tools do agents get stuck on, how often, and what it costs.
--
-- Answers: for each agent and tool, how many runs looped on it (the same call with the same
-- arguments again and again, a cycle of calls, or a step budget overrun), what share of the
-- runs that used that tool looped, and how much those runs spent. Points at the tool whose
-- results the agent cannot use (an error it retries blindly, an answer it does not parse).
--
-- Source: runs with loop_detected, each joined with its `loop` alert (kind = 'loop', status
-- 'firing'), whose evidence names the rule and the calls that made the loop. A looping run
-- without an alert (not expected; kept so nothing is hidden) is attributed to the last tool of
-- its tool_path with rule 'unknown'. The denominator, runs_with_tool, counts the agent's runs
-- whose tool_path contains the tool.
--
-- Parameters:
-- @param days UInt32 7          look-back, in days of event time, ending at the newest run in the store
-- @param agent_id String ''     one agent, or '' for every agent
--
-- Reading the result: one row per (agent_id, tool, rule), most loops first. tool is the looping
-- call; a cycle (rule 'cycle') shows its tools joined by ' > '. loop_rate = loops /
-- runs_with_tool: 0.05 means one run in twenty that called the tool got stuck on it. avg_steps
-- is the steps the looping runs took before they ended (the `loop` alert asks the agent runtime
-- to stop the run: a high number means nobody stopped it). cost_usd is what the looping runs
-- cost in all; outcomes are how they ended; example_run_ids are the newest ones.
--
-- Deduplication: explicit FINAL on runs and alerts.
WITH (SELECT max(ended_at) FROM runs FINAL) AS newest
SELECT
    l.agent_id AS agent_id,
    l.tool AS tool,
    l.rule AS rule,
    count() AS loops,
    any(t.runs_with_tool) AS runs_with_tool,
    round(count() / any(t.runs_with_tool), 4) AS loop_rate,
    arraySort(groupUniqArray(l.agent_version)) AS versions,
    avg(l.steps) AS avg_steps,
    toFloat64(sum(l.cost_usd)) AS cost_usd,
    arraySort(groupUniqArray(toString(l.outcome))) AS outcomes,
    arrayMap(x -> x.2, arraySlice(arrayReverseSort(groupArray((l.ended_at, l.run_id))), 1, 3)) AS example_run_ids
FROM
(
    SELECT
        r.run_id AS run_id,
        r.agent_id AS agent_id,
        r.agent_version AS agent_version,
        r.ended_at AS ended_at,
        r.steps AS steps,
        r.cost_usd AS cost_usd,
        r.outcome AS outcome,
        if(a.run_id = '', r.tool_path[-1], a.tool) AS tool,
        if(a.run_id = '', 'unknown', a.rule) AS rule
    FROM runs AS r FINAL
    LEFT JOIN
    (
        SELECT
            run_id,
            argMin(JSONExtractString(evidence, 'rule'), ts) AS rule,
            argMin(arrayStringConcat(arrayDistinct(arrayMap(c -> JSONExtractString(c, 'tool'),
                JSONExtractArrayRaw(evidence, 'calls'))), ' > '), ts) AS tool
        FROM alerts FINAL
        WHERE kind = 'loop' AND status = 'firing'
        GROUP BY run_id
    ) AS a ON a.run_id = r.run_id
    WHERE r.loop_detected
      AND r.ended_at > newest - toIntervalDay({days:UInt32})
      AND ({agent_id:String} = '' OR r.agent_id = {agent_id:String})
) AS l
LEFT JOIN
(
    SELECT agent_id, tool, count() AS runs_with_tool
    FROM runs FINAL
    ARRAY JOIN arrayDistinct(tool_path) AS tool
    WHERE ended_at > newest - toIntervalDay({days:UInt32})
    GROUP BY agent_id, tool
) AS t ON t.agent_id = l.agent_id AND t.tool = splitByString(' > ', l.tool)[1]
GROUP BY agent_id, tool, rule
ORDER BY loops DESC, agent_id, tool
