-- Canary against stable: each canary's verdict, metric by metric, with the evidence behind it.
--
-- Answers: for every canary (a new version taking part of an agent's traffic), how does it
-- compare with its stable version on success rate, cost per successful task, loop rate, tool
-- error rate, p95 duration, the shares of runs where a guardrail acted or an approval was denied,
-- and how many steps escalated runs took; which metric is worse beyond its margin; what did
-- Trackside decide (pending, rollback, promote), when, after how many runs, and was the rollback
-- sent?
--
-- Source: canaries (the latest verdict of each canary analysis; its evidence JSON holds, per
-- metric, both arms' values, sample sizes, the margin, the sequential test's statistic and
-- always-valid p-value and the alpha it is held to), rollbacks (the decision sent on
-- trackside.rollbacks), and runs, from which both arms' metrics are recomputed over the same
-- span (since the canary started, until the verdict if there is one) as an independent check.
--
-- Parameters:
-- @param agent_id String ''     one agent, or '' for every agent with a canary
--
-- Reading the result: one row per (canary, metric). test_stable/test_canary are the values the
-- sequential test saw (n_stable/n_canary runs); observed_* the same metric recomputed here from
-- `runs` (they agree up to runs that landed after the test ran and the quantile estimators;
-- guardrail_rate counts runs with a hit that warned, redacted or blocked, from runs.policy_hits).
-- worse = the canary is shown worse than stable by more than margin (absolute for rates, relative
-- for cost, p95 and escalation steps): p_value < alpha, where p_value is always valid (checking
-- after every run does not inflate false rollbacks). A 'rollback' decision names the worse
-- metrics in reason; rolled_back_to/rolled_back_at come from the rollback actually sent (NULL if
-- none). A 'pending' canary has not shown either way yet; 'promote' = shown within every margin,
-- or reached max_runs without a rollback. inferred = roles guessed from traffic (no deployment
-- events for that agent).
--
-- Deduplication: explicit FINAL on canaries, runs and rollbacks.
WITH
    c AS
    (
        SELECT agent_id, version, stable_version, since, decided_at, decision, inferred,
               canary_runs, stable_runs, reason, evidence
        FROM canaries FINAL
        WHERE {agent_id:String} = '' OR agent_id = {agent_id:String}
    ),
    arms AS
    (
        SELECT
            c.agent_id AS agent_id,
            c.version AS canary_version,
            r.agent_version = c.version AS is_canary,
            count() AS n,
            countIf(r.outcome = 'success') / count() AS success_rate,
            toFloat64(sum(r.cost_usd)) / nullIf(countIf(r.outcome = 'success'), 0) AS cost_per_success,
            countIf(r.loop_detected) / count() AS loop_rate,
            sum(r.tool_errors) / nullIf(sum(r.tool_calls), 0) AS tool_error_rate,
            quantile(0.95)(r.duration_ms) AS p95_duration,
            quantileIf(0.5)(r.steps, r.outcome = 'escalated') AS escalation_steps,
            countIf(arrayExists((k, v) -> v > 0 AND match(k, ':(warned|redacted|blocked)$'),
                                mapKeys(r.policy_hits), mapValues(r.policy_hits))) / count() AS guardrail_rate,
            countIf(r.approvals_denied > 0) / count() AS denial_rate
        FROM runs AS r FINAL
        INNER JOIN c ON r.agent_id = c.agent_id
        WHERE r.agent_version IN (c.version, c.stable_version)
          AND r.ended_at >= c.since
          AND (c.decided_at IS NULL OR r.ended_at <= c.decided_at)
        GROUP BY agent_id, canary_version, is_canary
    ),
    metrics AS
    (
        SELECT agent_id, version, arrayJoin(JSONExtractArrayRaw(evidence, 'metrics')) AS m
        FROM c
    )
SELECT
    c.agent_id AS agent_id,
    c.version AS canary_version,
    c.stable_version AS stable_version,
    c.decision AS decision,
    c.inferred AS inferred,
    c.since AS since,
    c.decided_at AS decided_at,
    JSONExtractString(x.m, 'metric') AS metric,
    JSONExtract(x.m, 'stable', 'Nullable(Float64)') AS test_stable,
    JSONExtract(x.m, 'canary', 'Nullable(Float64)') AS test_canary,
    JSONExtract(x.m, 'n_stable', 'UInt64') AS n_stable,
    JSONExtract(x.m, 'n_canary', 'UInt64') AS n_canary,
    JSONExtract(x.m, 'margin', 'Nullable(Float64)') AS margin,
    JSONExtract(x.m, 'statistic', 'Nullable(Float64)') AS statistic,
    JSONExtract(x.m, 'p_value', 'Nullable(Float64)') AS p_value,
    JSONExtract(x.m, 'threshold', 'Nullable(Float64)') AS alpha,
    toBool(JSONExtractBool(x.m, 'worse')) AS worse,
    multiIf(metric = 'success_rate', s.success_rate, metric = 'cost_per_success', s.cost_per_success,
            metric = 'loop_rate', s.loop_rate, metric = 'tool_error_rate', s.tool_error_rate,
            metric = 'p95_duration', s.p95_duration, metric = 'escalation_steps', s.escalation_steps,
            metric = 'guardrail_rate', s.guardrail_rate, metric = 'denial_rate', s.denial_rate,
            NULL) AS observed_stable,
    multiIf(metric = 'success_rate', k.success_rate, metric = 'cost_per_success', k.cost_per_success,
            metric = 'loop_rate', k.loop_rate, metric = 'tool_error_rate', k.tool_error_rate,
            metric = 'p95_duration', k.p95_duration, metric = 'escalation_steps', k.escalation_steps,
            metric = 'guardrail_rate', k.guardrail_rate, metric = 'denial_rate', k.denial_rate,
            NULL) AS observed_canary,
    s.n AS observed_n_stable,
    k.n AS observed_n_canary,
    c.canary_runs AS canary_runs,
    c.stable_runs AS stable_runs,
    if(rb.rollback_id = '', NULL, rb.to_version) AS rolled_back_to,
    if(rb.rollback_id = '', NULL, rb.ts) AS rolled_back_at,
    c.reason AS reason
FROM metrics AS x
INNER JOIN c ON c.agent_id = x.agent_id AND c.version = x.version
LEFT JOIN arms AS s ON s.agent_id = c.agent_id AND s.canary_version = c.version AND s.is_canary = 0
LEFT JOIN arms AS k ON k.agent_id = c.agent_id AND k.canary_version = c.version AND k.is_canary = 1
LEFT JOIN rollbacks AS rb FINAL ON rb.agent_id = c.agent_id AND rb.from_version = c.version
ORDER BY agent_id, canary_version, metric
