-- Shadow versions (SPEC §5, issue 17): a shadow's runs are analysed against the stable version
-- like a canary's, in `canaries`, but nothing acts on its verdict (no rollback, no pause). The
-- role says which an analysis is; the rows before this migration are all canaries.
ALTER TABLE {database}.canaries {on_cluster}
    ADD COLUMN IF NOT EXISTS role LowCardinality(String) DEFAULT 'canary'
    COMMENT 'canary | shadow: a shadow''s rollback verdict is recorded, never acted on';
