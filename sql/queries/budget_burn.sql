-- Budget burn: spend per agent-hour and per tenant-day, against the budget, with a projection.
--
-- Answers: who is spending how much, per agent per hour and per tenant per UTC day, how close
-- is that to the budget, and at the current pace where will the open period end? The same
-- periods Trackside's budget alerts use: a run counts in the period of the event time it ended,
-- once (by run_id), with its whole cost.
--
-- Source: runs (cost_usd, ended_at, agent_id, tenant), and the `budget` alerts, whose evidence
-- carries the limit (limit_usd) and the spend when the alert fired. The budget policy itself
-- (TRACKSIDE_POLICY_FILE) is not in the store: pass the limits you want to read against, or
-- leave them 0 to see a limit only where a budget alert fired (and so carried it).
--
-- Parameters:
-- @param days UInt32 2                 look-back, in days of event time, ending at the newest run
-- @param agent_hour_usd Float64 0      budget per agent per hour (0 = the one in budget alerts, if any)
-- @param tenant_day_usd Float64 0      budget per tenant per day (0 = the one in budget alerts, if any)
--
-- Reading the result: one row per (scope, subject, period_start), highest burn first, then
-- most spent. scope 'agent_hour' (subject = agent_id) or 'tenant_day' (subject = tenant; runs
-- without a tenant are left out). burn = spent_usd / limit_usd (1.0 = the whole budget; NULL
-- without a known limit). elapsed_fraction is how much of the period the data covers (up to
-- the newest run); projected_usd = spent_usd / elapsed_fraction, the period's spend at the
-- current pace (equal to spent_usd for a period that is over). alerted_at/alert_status: the
-- budget alert of that period, if one fired (status 'resolved' once the period is over).
-- Per-run budgets (run_usd) alert while the run goes, with action stop_run: see alerts_firing.
--
-- Deduplication: explicit FINAL on runs and alerts.
WITH
    (SELECT max(ended_at) FROM runs FINAL) AS newest,
    spend AS
    (
        SELECT
            'agent_hour' AS scope,
            agent_id AS subject,
            toDateTime(toStartOfHour(ended_at), 'UTC') AS period_start,
            3600 AS period_seconds,
            count() AS runs,
            toFloat64(sum(cost_usd)) AS spent_usd
        FROM runs FINAL
        WHERE ended_at > newest - toIntervalDay({days:UInt32})
        GROUP BY subject, period_start
        UNION ALL
        SELECT
            'tenant_day' AS scope,
            tenant AS subject,
            toDateTime(toStartOfDay(ended_at), 'UTC') AS period_start,
            86400 AS period_seconds,
            count() AS runs,
            toFloat64(sum(cost_usd)) AS spent_usd
        FROM runs FINAL
        WHERE ended_at > newest - toIntervalDay({days:UInt32}) AND tenant != ''
        GROUP BY subject, period_start
    ),
    budget_alerts AS
    (
        SELECT
            JSONExtractString(evidence, 'scope') AS scope,
            JSONExtractString(evidence, 'subject') AS subject,
            toDateTime(intDiv(JSONExtractInt(evidence, 'period_start'), 1000), 'UTC') AS period_start,
            max(JSONExtractFloat(evidence, 'limit_usd')) AS alert_limit_usd,
            minIf(ts, status = 'firing') AS alerted_at,
            argMax(status, (ts, status = 'resolved')) AS alert_status
        FROM alerts FINAL
        WHERE kind = 'budget' AND JSONExtractString(evidence, 'scope') IN ('agent_hour', 'tenant_day')
        GROUP BY scope, subject, period_start
    )
SELECT
    s.scope AS scope,
    s.subject AS subject,
    s.period_start AS period_start,
    s.runs AS runs,
    s.spent_usd AS spent_usd,
    multiIf(s.scope = 'agent_hour' AND {agent_hour_usd:Float64} > 0, {agent_hour_usd:Float64},
            s.scope = 'tenant_day' AND {tenant_day_usd:Float64} > 0, {tenant_day_usd:Float64},
            b.alert_limit_usd > 0, b.alert_limit_usd, NULL) AS limit_usd,
    round(s.spent_usd / limit_usd, 4) AS burn,
    round(least(greatest(dateDiff('millisecond', s.period_start, newest) / 1000 / s.period_seconds, 0.0001), 1), 4)
        AS elapsed_fraction,
    s.spent_usd / elapsed_fraction AS projected_usd,
    if(b.alert_status = '', NULL, b.alerted_at) AS alerted_at,
    if(b.alert_status = '', NULL, b.alert_status) AS alert_status
FROM spend AS s
LEFT JOIN budget_alerts AS b ON b.scope = s.scope AND b.subject = s.subject AND b.period_start = s.period_start
ORDER BY burn DESC NULLS LAST, spent_usd DESC, scope, subject, period_start
