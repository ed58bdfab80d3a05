-- Escalations and approvals: how often runs hand over to a human, how late they do it, and how
-- the human gates on the way decide (what an `escalation` alert asks an on-call engineer to look at).
--
-- Answers: per agent version and bucket (hourly by default): runs, escalations (runs ending
-- `escalated`) and their rate; how late they come: the steps and the seconds an escalated run
-- took before it (median and p95); approvals requested, granted, denied and expired, the share of
-- decisions that were denials and the wait for a decision (median and p95); the mean live
-- evaluation score from `feedback` events; and whether an `escalation` alert is firing.
-- An escalation that comes after 20 steps instead of 5 spent 15 steps of tokens on a task the
-- agent could not do; a version that escalates later is worse even at the same rate.
--
-- Source: runs (outcome, steps, duration_ms, and the sums of the run's `approval` and `feedback`
-- events, SPEC §4). Steps are model and tool calls; seconds run from the run's first event to its
-- end. approval_waits_ms holds each decided approval's `wait_ms`.
--
-- Parameters:
-- @param days UInt32 7                look-back, in days of event time, ending at the newest run in the store
-- @param bucket_seconds UInt32 3600   bucket width in seconds
-- @param agent_id String ''           one agent, or '' for every agent
--
-- Reading the result: one row per (agent_id, agent_version, bucket_start), in time order.
-- Quantiles interpolate between order statistics (numpy's default, as everywhere in Trackside).
-- escalation_rate = escalations / runs; the step and second columns are NULL in a bucket with no
-- escalation, the wait columns with no decided approval, feedback_score with no scored feedback.
-- denial_rate = denied / (granted + denied + expired). Buckets are event time (UTC).
--
-- Deduplication: explicit FINAL on runs and alerts.
WITH (SELECT max(ended_at) FROM runs FINAL) AS newest
SELECT
    agent_id,
    agent_version,
    toStartOfInterval(ended_at, toIntervalSecond({bucket_seconds:UInt32})) AS bucket_start,
    count() AS runs,
    countIf(outcome = 'escalated') AS escalations,
    round(escalations / runs, 4) AS escalation_rate,
    if(escalations = 0, NULL, quantileExactInclusiveIf(0.5)(steps, outcome = 'escalated')) AS escalation_steps_p50,
    if(escalations = 0, NULL, quantileExactInclusiveIf(0.95)(steps, outcome = 'escalated')) AS escalation_steps_p95,
    if(escalations = 0, NULL, round(quantileExactInclusiveIf(0.5)(duration_ms, outcome = 'escalated') / 1000, 1)) AS escalation_seconds_p50,
    if(escalations = 0, NULL, round(quantileExactInclusiveIf(0.95)(duration_ms, outcome = 'escalated') / 1000, 1)) AS escalation_seconds_p95,
    sum(approvals_requested) AS approvals_requested,
    sum(approvals_granted) AS approvals_granted,
    sum(approvals_denied) AS approvals_denied,
    sum(approvals_expired) AS approvals_expired,
    round(approvals_denied / nullIf(approvals_granted + approvals_denied + approvals_expired, 0), 4) AS denial_rate,
    sum(length(approval_waits_ms)) AS approvals_decided,
    if(approvals_decided = 0, NULL, quantileExactInclusiveArray(0.5)(approval_waits_ms)) AS approval_wait_p50_ms,
    if(approvals_decided = 0, NULL, quantileExactInclusiveArray(0.95)(approval_waits_ms)) AS approval_wait_p95_ms,
    round(sum(feedback_score * feedback_count) / nullIf(sum(feedback_count), 0), 4) AS feedback_score,
    (agent_id, agent_version) IN (
        SELECT agent_id, agent_version FROM alerts FINAL
        WHERE kind = 'escalation'
        GROUP BY fingerprint, agent_id, agent_version
        HAVING argMax(status, ts) = 'firing'
    ) AS alert_firing
FROM runs FINAL
WHERE ended_at > newest - toIntervalDay({days:UInt32})
  AND ({agent_id:String} = '' OR agent_id = {agent_id:String})
GROUP BY agent_id, agent_version, bucket_start
ORDER BY agent_id, agent_version, bucket_start
