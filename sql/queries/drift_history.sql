-- Drift history of an agent: every drift test, window by window, feature by feature.
--
-- Answers: has this agent's behaviour moved away from its reference, when, in which features
-- (cost, tokens, steps, duration, tool error rate, tool mix, outcome, error type, success), by
-- how much, and how sure is the test? The stream processors compare each 5-minute window, pooled
-- with the windows just before it at three scales, with the version's own trailing reference,
-- or, for a canary, with its stable version's runs of the same time; p-values go through
-- Benjamini-Hochberg across the window's features and scales; a feature has drifted when its
-- test is rejected AND its effect size reaches a floor.
--
-- Source: drift, which holds one row per (window, feature, statistic): the test (ks for numeric
-- features, chi2 for categorical ones, with a p-value and the BH threshold of the window) and
-- its effect sizes (wasserstein and psi, or js; p_value NULL, threshold = the effect's floor).
-- This query puts a test and its effect sizes on one row.
--
-- Parameters:
-- @param agent_id String ''        one agent, or '' for every agent
-- @param agent_version String ''   one version, or '' for every version of the agent(s)
-- @param feature String ''         one feature (e.g. cost_usd, success, tool_mix), or '' for all
--
-- Reading the result: one row per (agent_id, agent_version, window, feature, scale), in time
-- order. scale 'short' is the last two windows, 'mid' the last four, 'long' the windows back
-- until 30 runs (stored as feature@short, feature@mid, feature). p_value below bh_threshold =
-- the test is rejected; effect_ratio = Wasserstein (numeric) or Jensen-Shannon (categorical) /
-- its floor (>= 1: big enough to matter; >= 4 makes a drift alert critical); psi is shown but,
-- biased upwards at small samples, not used for severity. wasserstein/psi are NULL for
-- categorical features, js for numeric ones. drifted = rejected and an effect at or above its
-- floor. baseline says what the window was compared with ("<version> trailing|stable N windows,
-- n=<runs>", "rebaselined" when the old reference aged out). When a pool of two or more windows
-- drifted, its two halves (earlier and later windows) are tested for that feature alone,
-- one-sided, at the threshold shown: scales like 'mid.early' and 'mid.late'; a `drift` alert
-- fires when both halves drifted too, i.e. the shift held over consecutive windows (see
-- alerts_firing.sql). Windows are tested only once enough runs exist on both sides:
-- low-traffic versions have gaps, and nothing is tested before the reference holds 100 runs.
--
-- Deduplication: explicit FINAL.
SELECT
    agent_id,
    agent_version,
    window,
    feature_name AS feature,
    scale,
    test,
    test_statistic,
    test_p AS p_value,
    bh_threshold,
    wasserstein,
    psi,
    js,
    effect_ratio,
    drifted,
    compared_with AS baseline
FROM
(
    SELECT
        agent_id,
        agent_version,
        window,
        splitByChar('@', feature)[1] AS feature_name,
        if(position(feature, '@') > 0, splitByChar('@', feature)[2], 'long') AS scale,
        anyIf(statistic, p_value IS NOT NULL) AS test,
        anyIf(value, p_value IS NOT NULL) AS test_statistic,
        anyIf(p_value, p_value IS NOT NULL) AS test_p,
        anyIf(threshold, p_value IS NOT NULL) AS bh_threshold,
        anyIf(toNullable(value), statistic = 'wasserstein') AS wasserstein,
        anyIf(toNullable(value), statistic = 'psi') AS psi,
        anyIf(toNullable(value), statistic = 'js') AS js,
        maxIf(value / threshold, statistic IN ('wasserstein', 'js') AND threshold > 0) AS effect_ratio,
        max(significant) AS drifted,
        any(baseline) AS compared_with
    FROM drift FINAL
    WHERE ({agent_id:String} = '' OR agent_id = {agent_id:String})
      AND ({agent_version:String} = '' OR agent_version = {agent_version:String})
      AND ({feature:String} = '' OR splitByChar('@', feature)[1] = {feature:String})
    GROUP BY agent_id, agent_version, window, feature
)
ORDER BY agent_id, agent_version, window, feature, scale
