-- Recovery reads a bounded event-time range (streams/processors/recovery.py): a worker that
-- takes a partition reads the events and runs of the last hours, not the whole history.
-- Skip indexes serve those reads; MATERIALIZE builds them for rows landed before.

-- How far each assembler partition had come in event time (its watermark, from the closed-runs
-- messages it sends): a worker taking the partition reads the events of runs open since then.
CREATE TABLE IF NOT EXISTS {database}.stage_progress {on_cluster}
(
    stage LowCardinality(String),
    partition UInt16,
    watermark DateTime64(3, 'UTC'),
    updated_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(watermark)
ORDER BY (stage, partition);

ALTER TABLE {database}.events {on_cluster} ADD INDEX IF NOT EXISTS ts_range ts TYPE minmax GRANULARITY 1;
ALTER TABLE {database}.events {on_cluster} ADD INDEX IF NOT EXISTS run_ids run_id TYPE bloom_filter(0.01) GRANULARITY 1;
ALTER TABLE {database}.events {on_cluster} MATERIALIZE INDEX ts_range;
ALTER TABLE {database}.events {on_cluster} MATERIALIZE INDEX run_ids;
ALTER TABLE {database}.runs {on_cluster} ADD INDEX IF NOT EXISTS ended_range ended_at TYPE minmax GRANULARITY 1;
ALTER TABLE {database}.runs {on_cluster} MATERIALIZE INDEX ended_range;
ALTER TABLE {database}.alerts {on_cluster} ADD INDEX IF NOT EXISTS ts_range ts TYPE minmax GRANULARITY 1;
ALTER TABLE {database}.alerts {on_cluster} MATERIALIZE INDEX ts_range;
