-- Guardrail hits: which policies fire on which agent versions, how they decide, and whether it is
-- more than usual (what a `policy` alert asks an on-call engineer to look at).
--
-- Answers: per agent version, policy and decision over the look-back: the hits, the runs that had
-- one, their share of the version's runs, and the same share over the days before (the version's
-- own baseline) with the lift between them; whether a `policy` alert is firing for the version.
-- A guardrail that blocks on a new version far more often than on the old one, or than the same
-- version did last week, is a prompt or tool change that tripped it.
--
-- Source: runs.policy_hits, each run's guardrail hits as a map "policy:decision" -> hits, from the
-- `policy_hit` events of the run (SPEC §4); the decision (blocked, warned, redacted, allowed, or
-- '' when the event gave none) is the part after the last ':'. Version runs are every run of the
-- version in the period, with or without a hit. The alert state is the newest `policy` alert of
-- the version's fingerprint.
--
-- Parameters:
-- @param days UInt32 1             look-back, in days of event time, ending at the newest run in the store
-- @param baseline_days UInt32 7    the period before it that is the baseline
-- @param agent_id String ''        one agent, or '' for every agent
--
-- Reading the result: one row per (agent_id, agent_version, policy, decision), blocked first,
-- then most runs hit. share = runs_hit / version_runs: 0.04 is one run in 25. baseline_share is
-- NULL when the version had no runs before the look-back (a new version: compare its stable
-- version's row instead); lift = share / baseline_share, NULL when either is missing or the
-- baseline had no such hit. The `policy` alert tests each 5-minute window against the version's
-- recent windows (streams/detect/governance.py); this query looks at whole days.
--
-- Deduplication: explicit FINAL on runs and alerts.
WITH
    (SELECT max(ended_at) FROM runs FINAL) AS newest,
    newest - toIntervalDay({days:UInt32}) AS since,
    since - toIntervalDay({baseline_days:UInt32}) AS baseline_since
SELECT
    h.agent_id AS agent_id,
    h.agent_version AS agent_version,
    h.policy AS policy,
    h.decision AS decision,
    h.hits AS hits,
    h.runs_hit AS runs_hit,
    v.runs AS version_runs,
    round(h.runs_hit / v.runs, 4) AS share,
    if(v.baseline_runs = 0, NULL, round(h.baseline_runs_hit / v.baseline_runs, 4)) AS baseline_share,
    if(h.baseline_runs_hit = 0 OR v.baseline_runs = 0, NULL,
       round((h.runs_hit / v.runs) / (h.baseline_runs_hit / v.baseline_runs), 2)) AS lift,
    (h.agent_id, h.agent_version) IN (
        SELECT agent_id, agent_version FROM alerts FINAL
        WHERE kind = 'policy'
        GROUP BY fingerprint, agent_id, agent_version
        HAVING argMax(status, ts) = 'firing'
    ) AS alert_firing
FROM
(
    SELECT
        agent_id,
        agent_version,
        extract(key, '^(.*):[a-z]*$') AS policy,
        extract(key, ':([a-z]*)$') AS decision,
        sumIf(count, ended_at > since) AS hits,
        countIf(ended_at > since) AS runs_hit,
        countIf(ended_at <= since) AS baseline_runs_hit
    FROM runs FINAL
    ARRAY JOIN mapKeys(policy_hits) AS key, mapValues(policy_hits) AS count
    WHERE ended_at > baseline_since
      AND ({agent_id:String} = '' OR agent_id = {agent_id:String})
    GROUP BY agent_id, agent_version, policy, decision
) AS h
INNER JOIN
(
    SELECT agent_id, agent_version, countIf(ended_at > since) AS runs, countIf(ended_at <= since) AS baseline_runs
    FROM runs FINAL
    WHERE ended_at > baseline_since
    GROUP BY agent_id, agent_version
) AS v ON v.agent_id = h.agent_id AND v.agent_version = h.agent_version
WHERE h.runs_hit > 0
ORDER BY decision != 'blocked', runs_hit DESC, agent_id, agent_version, policy
