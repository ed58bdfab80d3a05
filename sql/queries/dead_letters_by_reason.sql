-- Dead letters by reason: what producers send that Trackside cannot take, and who sends it.
--
-- Answers: which kinds of rejected messages arrived lately, on which topic, how many, since when,
-- from which agent (when the payload is JSON enough to say), with an example to hand to the team
-- that produces them. Nothing received is dropped silently: a message is processed or here (and
-- on agent.events.dlq, with the whole payload).
--
-- Source: dead_letters (one row per rejected message: source topic:partition:offset, the error
-- and the payload, cut at 1 MiB). Errors name the field and the bad value; the reason column
-- masks the bad value ("got ...") and numbers, so that one mistake made a thousand times is one
-- row.
--
-- Parameters:
-- @param days UInt32 7          look-back in days of received_at, ending at the newest dead letter
--
-- received_at is wall-clock time (when Trackside read the message), unlike the event time of the
-- other queries; the period ends at the newest dead letter, not now().
--
-- Reading the result: one row per (topic, reason, agent_id, agent_version), most messages first.
-- agent_id/agent_version are read from the payload ('' when it is not a JSON object or lacks
-- them: a producer bug upstream of any agent). example_source is the topic:partition:offset of
-- the newest such message (replay it from agent.events.dlq), example_payload its first 300 bytes
-- and example_error the unmasked error. A reason that keeps growing after a deploy points at
-- that deploy's producer.
--
-- Deduplication: explicit FINAL (a message read twice after a restart is one row).
WITH (SELECT max(received_at) FROM dead_letters FINAL) AS newest
SELECT
    topic,
    replaceRegexpAll(replaceRegexpAll(error, 'got (\'[^\']*\'|"[^"]*"|[^ ,;)]+)', 'got <value>'),
                     '-?\\b\\d+(\\.\\d+)?\\b', '<n>') AS reason,
    JSONExtractString(payload, 'agent_id') AS agent_id,
    JSONExtractString(payload, 'agent_version') AS agent_version,
    count() AS messages,
    sum(payload_bytes) AS bytes,
    min(received_at) AS first_received,
    max(received_at) AS last_received,
    argMax(source, received_at) AS example_source,
    argMax(error, received_at) AS example_error,
    substring(argMax(payload, received_at), 1, 300) AS example_payload
FROM dead_letters FINAL
WHERE received_at > newest - toIntervalDay({days:UInt32})
GROUP BY topic, reason, agent_id, agent_version
ORDER BY messages DESC, topic, reason
