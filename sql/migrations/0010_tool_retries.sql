-- Retries per run (issue 16, the console's Tools page): the tool of each call that came right
-- after a failed call (error or timeout) of the same tool in the run, in event-time order, as the
-- assembler saw the run's calls when it closed it. Counting them from `events` ordered each run's
-- calls in a window function: ~230 ms of a week's Tools page on 10 million events. Runs before
-- this migration have none.
ALTER TABLE {database}.runs {on_cluster}
    ADD COLUMN IF NOT EXISTS tool_retries Array(LowCardinality(String))
    COMMENT 'the tool of each call right after a failed call of the same tool, in event-time order' AFTER tool_path;
