-- Cost per successful task and success rate, per agent version, over time.
--
-- Answers: what does one successful task cost on each version of each agent, bucket by bucket
-- (hourly by default), and how often do its runs succeed? Cost per successful task = cost of
-- ALL runs in the bucket (failed ones too) / runs that succeeded in it (README, Semantics), so a
-- version that fails more costs more per success even at the same price per run.
--
-- Source: agent_metrics, the 5-minute event-time windows of the stream processors. Windows are
-- re-aggregated by adding up their sums (cost, runs, successes, tool calls), never by averaging
-- their ratios, so a bucket's numbers are exactly those of its runs.
--
-- Parameters ({name:Type}; clickhouse-client --param_name=value; notebooks and tests fill in
-- the defaults below):
-- @param agent_id String ''           one agent, or '' for every agent
-- @param bucket_seconds UInt32 3600   bucket width in seconds (3600 = hourly, 900 = 15 minutes)
--
-- Reading the result: one row per (agent_id, agent_version, bucket_start), in time order.
-- cost_per_success is NULL when no run of the bucket succeeded (an infinite cost, not zero).
-- Compare versions of one agent bucket by bucket: a canary that costs more per success than
-- its stable version in the same buckets is worse whatever the traffic did. final_windows <
-- windows: the newest windows may still change (a window becomes final once every upstream
-- partition's watermark passed its end plus the idle timeout); a run arriving after that is
-- late and in `runs` only. Buckets are event time (UTC), not wall-clock time.
--
-- Deduplication: explicit FINAL (the same result from a plain clickhouse-client; Trackside's
-- query paths also set final=1, which changes nothing here).
SELECT
    agent_id,
    agent_version,
    bucket_start,
    n_runs AS runs,
    n_successes AS successes,
    n_runs - n_successes AS failures,
    cost AS cost_usd,
    cost / nullIf(n_successes, 0) AS cost_per_success,
    n_successes / n_runs AS success_rate,
    loops / n_runs AS loop_rate,
    n_tool_errors / nullIf(n_tool_calls, 0) AS tool_error_rate,
    tokens / n_runs AS tokens_per_run,
    max_p95 AS max_window_p95_duration_ms,
    n_windows AS windows,
    n_final AS final_windows
FROM
(
    SELECT
        agent_id,
        agent_version,
        toStartOfInterval(window_start, toIntervalSecond({bucket_seconds:UInt32})) AS bucket_start,
        sum(runs) AS n_runs,
        sum(successes) AS n_successes,
        toFloat64(sum(cost_usd)) AS cost,
        sum(loop_rate * runs) AS loops,
        sum(tool_calls) AS n_tool_calls,
        sum(tool_errors) AS n_tool_errors,
        sum(input_tokens + output_tokens) AS tokens,
        max(p95_duration_ms) AS max_p95,
        count() AS n_windows,
        countIf(is_final) AS n_final
    FROM agent_metrics FINAL
    WHERE ({agent_id:String} = '' OR agent_id = {agent_id:String}) AND runs > 0
    GROUP BY agent_id, agent_version, bucket_start
)
ORDER BY agent_id, agent_version, bucket_start
