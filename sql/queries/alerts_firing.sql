-- Alerts firing now: every condition whose latest alert is `firing`, with no `resolved` after it.
--
-- Answers: what is wrong right now, worst first: looping runs not yet ended, drifting versions,
-- canaries shown worse than stable, spiking failure clusters, budgets over their limit.
--
-- Source: alerts (the mirror of trackside.alerts). An alert's fingerprint is stable per
-- condition and subject (a loop on one run, drift of one agent version, a cluster's spike, a
-- budget period...): `firing` is sent once, then `resolved` once when it clears, possibly
-- again in a later episode. The latest alert per fingerprint tells its state; on a tie in ts
-- the resolved one wins.
--
-- Parameters:
-- @param include_notices UInt8 0   1 = also list one-shot notices (failure_cluster with condition
--                                  "new"), which are never resolved and would otherwise stay
--                                  "firing" forever
-- @param kind String ''            one kind (loop, drift, cost, success_rate, error_rate,
--                                  loop_rate, latency, guardrail, denial, escalation,
--                                  failure_cluster, budget, pipeline), or '' for all
--
-- Reading the result: one row per firing condition, critical first, then newest. fired_at is
-- the event time of the firing alert (the episode's start); age_minutes is measured to the
-- newest alert in the store (live: about now). action tells what was asked of the agent
-- runtime or deploy tooling ('stop_run', 'rollback'). A canary's rollback alerts stay firing
-- until deploy tooling withdraws the canary (traffic 0 or a new stable): a rollback alert
-- firing for long means the rollback did not happen. evidence is the JSON of numbers behind it.
--
-- Deduplication: explicit FINAL (the alert id derives from fingerprint, status and episode, so a
-- re-sent alert is one row).
WITH
    (SELECT max(ts) FROM alerts FINAL) AS newest,
    latest AS
    (
        SELECT
            fingerprint,
            argMax(status, (ts, status = 'resolved')) AS state,
            argMax(alert_id, (ts, status = 'resolved')) AS last_alert_id
        FROM alerts FINAL
        GROUP BY fingerprint
    )
SELECT
    a.kind AS kind,
    a.severity AS severity,
    a.agent_id AS agent_id,
    a.agent_version AS agent_version,
    a.run_id AS run_id,
    a.summary AS summary,
    a.ts AS fired_at,
    round(dateDiff('second', a.ts, newest) / 60, 1) AS age_minutes,
    a.action AS action,
    a.fingerprint AS fingerprint,
    a.alert_id AS alert_id,
    a.evidence AS evidence
FROM alerts AS a FINAL
INNER JOIN latest AS l ON l.last_alert_id = a.alert_id
WHERE l.state = 'firing'
  AND ({include_notices:UInt8} = 1
       OR NOT (a.kind = 'failure_cluster' AND JSONExtractString(a.evidence, 'condition') = 'new'))
  AND ({kind:String} = '' OR a.kind = {kind:String})
ORDER BY indexOf(['critical', 'warning', 'info'], a.severity), fired_at DESC, alert_id
