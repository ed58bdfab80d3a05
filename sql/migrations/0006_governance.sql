-- Governance signals (issue 14, SPEC §4): the fields of `approval`, `policy_hit` and `feedback`
-- events as columns of `events` (they were kept in `attributes` before), each run's sums in
-- `runs`, and each window's in `agent_metrics`. Policy hits are counted by "policy:decision"
-- (the decision is one of four words, so the key splits at its last ':').
ALTER TABLE {database}.events {on_cluster}
    ADD COLUMN IF NOT EXISTS action String COMMENT 'approval: what needed approval' AFTER attributes,
    ADD COLUMN IF NOT EXISTS approver String COMMENT 'approval' AFTER action,
    ADD COLUMN IF NOT EXISTS wait_ms Nullable(Float64) COMMENT 'approval: request to decision' AFTER approver,
    ADD COLUMN IF NOT EXISTS policy LowCardinality(String) COMMENT 'policy_hit: the guardrail' AFTER wait_ms,
    ADD COLUMN IF NOT EXISTS decision LowCardinality(String) COMMENT 'policy_hit: blocked | warned | redacted | allowed' AFTER policy,
    ADD COLUMN IF NOT EXISTS label String COMMENT 'feedback' AFTER decision,
    ADD COLUMN IF NOT EXISTS feedback_source LowCardinality(String) COMMENT 'feedback: its `source` field (user, eval, ...)' AFTER label;

ALTER TABLE {database}.runs {on_cluster}
    ADD COLUMN IF NOT EXISTS policy_hits Map(String, UInt32) COMMENT 'guardrail hits by "policy:decision"',
    ADD COLUMN IF NOT EXISTS approvals_requested UInt32,
    ADD COLUMN IF NOT EXISTS approvals_granted UInt32,
    ADD COLUMN IF NOT EXISTS approvals_denied UInt32,
    ADD COLUMN IF NOT EXISTS approvals_expired UInt32,
    ADD COLUMN IF NOT EXISTS approval_waits_ms Array(Float64) COMMENT 'wait_ms of each decided approval',
    ADD COLUMN IF NOT EXISTS feedback_count UInt32,
    ADD COLUMN IF NOT EXISTS feedback_score Nullable(Float64) COMMENT 'mean score of its feedback events';

ALTER TABLE {database}.agent_metrics {on_cluster}
    ADD COLUMN IF NOT EXISTS policy_hits UInt32 COMMENT 'guardrail hits of the runs of the window',
    ADD COLUMN IF NOT EXISTS policy_hits_by Map(String, UInt32) COMMENT 'the same by "policy:decision"',
    ADD COLUMN IF NOT EXISTS guardrail_runs UInt32 COMMENT 'runs where a guardrail acted: a hit warned, redacted or blocked',
    ADD COLUMN IF NOT EXISTS guardrail_rate Float64 COMMENT 'guardrail_runs / runs',
    ADD COLUMN IF NOT EXISTS approvals_requested UInt32,
    ADD COLUMN IF NOT EXISTS approvals_granted UInt32,
    ADD COLUMN IF NOT EXISTS approvals_denied UInt32,
    ADD COLUMN IF NOT EXISTS approvals_expired UInt32,
    ADD COLUMN IF NOT EXISTS approval_wait_p50_ms Nullable(Float64),
    ADD COLUMN IF NOT EXISTS approval_wait_p95_ms Nullable(Float64),
    ADD COLUMN IF NOT EXISTS escalations UInt32 COMMENT 'runs that ended escalated',
    ADD COLUMN IF NOT EXISTS escalation_rate Float64,
    ADD COLUMN IF NOT EXISTS escalation_steps_p50 Nullable(Float64) COMMENT 'steps an escalated run took before it',
    ADD COLUMN IF NOT EXISTS escalation_seconds_p50 Nullable(Float64) COMMENT 'seconds from its start to it',
    ADD COLUMN IF NOT EXISTS feedback_count UInt32,
    ADD COLUMN IF NOT EXISTS feedback_score Nullable(Float64) COMMENT 'mean live evaluation score';
