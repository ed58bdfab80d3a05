"""The ingest and store sink stage: confluent-kafka in bulk, so faust sees batches, not events.

One consumer (group `trackside-store`) reads `agent.events` and the processors' result
topics. Per poll it validates the events, lands them and the dead letters in ClickHouse
with `insert_arrow`, produces the rejected messages to the DLQ topic and the valid ones,
as one batch message per source partition, to `trackside.event-batches` (same partition
number, so a run's events meet in one assembler), lands the result rows, and only then
commits the offsets. A store that refuses writes is retried with backoff, never skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict
from typing import Callable, Iterable, Iterator

import orjson
import pyarrow as pa
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, KafkaException, Message, Producer

from streams.contracts import tables, topics
from streams import telemetry
from streams.ingest.pricing import PriceTable, price_event
from streams.errors import BrokerError
from streams.contracts.events import InvalidEvent, parse
from streams.ingest.otlp import InvalidOtlp, otlp_to_events
from streams.detect.rollout import parse_deployment
from streams.detect.runs import agent_partition, pack, run_partition
from streams.settings import Settings
from streams.store.clickhouse import Store

log = logging.getLogger(__name__)

GROUP = "trackside-store"
# Events per batch message to the processors: ~400 KB, well under any broker's message limit.
EVENTS_PER_BATCH_MESSAGE = 1000
DLQ_PAYLOAD_LIMIT = 1 << 20


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def consumer_config(settings: Settings, group: str) -> dict:
    return {
        **settings.kafka_config,
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": settings.session_timeout_ms,
        "heartbeat.interval.ms": max(500, settings.session_timeout_ms // 6),
        "fetch.wait.max.ms": 50,
        "enable.partition.eof": False,
    }


def without_errors(messages: Iterable[Message]) -> Iterator[Message]:
    """The messages of a `consume()` that carry data; the consumer errors among them are
    logged (end-of-partition events are not errors) and left out."""
    for message in messages:
        error = message.error()
        if error is None:
            yield message
        elif error.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer error: %s", error)


def producer_config(settings: Settings) -> dict:
    # Defaults first: a TRACKSIDE_KAFKA_* variable (e.g. ..._MESSAGE_MAX_BYTES) wins.
    return {"linger.ms": 5, "message.max.bytes": 16 << 20, **settings.kafka_config}


class StoreSink:
    """Runs the ingest and sink loop until `stop` is set; see the module docstring."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.prices = PriceTable()
        self.stats: Counter[str] = Counter()
        self.stop = threading.Event()
        self.assigned = threading.Event()
        self._retrying = False
        self._consumer = Consumer(consumer_config(settings, GROUP))
        self._producer = Producer(producer_config(settings))
        self._handlers: dict[str, Callable[[list[Message]], None]] = {
            topics.AGENT_EVENTS.name: self._ingest_events,
            topics.AGENT_DEPLOYMENTS.name: self._ingest_deployments,
            topics.OTLP_SPANS.name: self._ingest_otlp,
            topics.ROLLBACKS.name: self._land_rollbacks,
            topics.RUN_RESULTS.name: self._land_runs,
            topics.METRIC_RESULTS.name: self._land_metrics,
            topics.ALERTS.name: self._land_alerts,
        }

    def run(self) -> None:
        self._consumer.subscribe(list(self._handlers), on_assign=lambda *_: self.assigned.set())
        try:
            while not self.stop.is_set():
                messages = self._consumer.consume(self.settings.ingest_batch_max, self.settings.ingest_poll_seconds)
                if messages:
                    self.process(messages)
        finally:
            self._producer.flush(10)
            self._consumer.close()

    def process(self, messages: list[Message]) -> None:
        """Handle one poll's messages and commit their offsets once everything is landed."""
        started = time.monotonic()
        telemetry.SINK_BATCH_MESSAGES.observe(len(messages))
        telemetry.SINK_INFLIGHT_MESSAGES.set(len(messages))
        by_topic: dict[str, list[Message]] = defaultdict(list)
        oldest: dict[str, int] = {}  # Kafka timestamp (ms) of each topic's oldest message
        for message in without_errors(messages):
            by_topic[message.topic()].append(message)
            kind, stamp = message.timestamp()
            if kind != TIMESTAMP_NOT_AVAILABLE and 0 < stamp < oldest.get(message.topic(), 1 << 62):
                oldest[message.topic()] = stamp
        for topic, batch in by_topic.items():
            self._handlers[topic](batch)
        self._producer.flush(30)
        try:
            self._consumer.commit(asynchronous=False)
            telemetry.SINK_LAST_COMMIT.set(time.time())
        except KafkaException as error:
            # Offsets not committed means redelivery, which the idempotent store absorbs.
            telemetry.SINK_COMMIT_FAILURES.inc()
            log.warning("offset commit failed, the batch will be redelivered: %s", error)
        telemetry.SINK_INFLIGHT_MESSAGES.set(0)
        telemetry.SINK_BATCH_SECONDS.observe(time.monotonic() - started)
        landed = now_ms()
        for topic, stamp in oldest.items():
            telemetry.INGEST_DELAY_SECONDS.labels(topic).observe(max(0, landed - stamp) / 1000)

    def _insert(self, table: str, rows: list[dict]) -> None:
        """Insert rows, retrying with backoff while the store refuses; gives up only on stop."""
        if not rows:
            return
        data = tables.to_arrow(rows, tables.BY_TABLE[table])
        delay = 0.1
        while True:
            try:
                started = time.monotonic()
                self.store.insert_arrow(table, data)
                telemetry.STORE_INSERT_SECONDS.labels(table).observe(time.monotonic() - started)
                telemetry.STORE_ROWS.labels(table).inc(len(rows))
                self.stats[f"rows_{table}"] += len(rows)
                if self._retrying:
                    log.warning("store accepts writes again; %d %s rows landed", len(rows), table)
                    self._retrying = False
                    telemetry.STORE_RETRYING.set(0)
                return
            except Exception as error:  # any failure of the store: retry, never skip
                self.stats["store_retries"] += 1
                telemetry.STORE_RETRIES.labels(table).inc()
                telemetry.STORE_RETRYING.set(1)
                if not self._retrying:
                    log.warning("store refused %d %s rows (%s); retrying with backoff", len(rows), table, error)
                self._retrying = True
                if self.stop.wait(delay):
                    raise
                delay = min(delay * 2, self.settings.store_retry_max_seconds)

    # agent.events

    def _ingest_events(self, messages: list[Message]) -> None:
        ingested_at = now_ms()
        keep_raw_args = self.settings.store_raw_tool_args
        max_bytes = self.settings.max_event_bytes
        events: list[dict] = []
        dead: list[dict] = []
        by_partition: dict[int, list[dict]] = defaultdict(list)
        for message in messages:
            partition, offset = message.partition(), message.offset()
            source = f"{message.topic()}:{partition}:{offset}"
            try:
                event = parse(message.value(), max_bytes=max_bytes, keep_raw_args=keep_raw_args)
            except InvalidEvent as error:
                dead.append(self._dead_letter(message, source, str(error), ingested_at))
                continue
            price_event(self.prices, event)
            event["source"] = source
            event["ingested_at"] = ingested_at
            events.append(event)
            by_partition[partition].append(pack(event))
        self._insert("events", events)
        self._reject(dead)
        self._hand_over(by_partition)
        self.stats["events"] += len(events)
        telemetry.EVENTS_INGESTED.inc(len(events))

    def _hand_over(self, by_partition: dict[int, list]) -> None:
        """The packed events to the run assemblers, one message per partition and chunk."""
        for partition, batch in by_partition.items():
            for start in range(0, len(batch), EVENTS_PER_BATCH_MESSAGE):
                chunk = batch[start:start + EVENTS_PER_BATCH_MESSAGE]
                self._produce(
                    topics.EVENT_BATCHES.name, orjson.dumps({"partition": partition, "events": chunk}), partition=partition
                )

    # otlp_spans

    def _ingest_otlp(self, messages: list[Message]) -> None:
        """OpenTelemetry spans (streams/otlp.py) become agent events and take the same path.

        A message is not keyed by run, so its events go to the assembler of `run_partition`
        of their run (the trace). An unreadable message, or one with spans that cannot be
        mapped, is a dead letter (whole, with each span's reason); its good spans still count.
        """
        ingested_at = now_ms()
        keep_raw_args = self.settings.store_raw_tool_args
        events: list[dict] = []
        dead: list[dict] = []
        by_partition: dict[int, list[dict]] = defaultdict(list)
        for message in messages:
            source = f"{message.topic()}:{message.partition()}:{message.offset()}"
            try:
                mapped = otlp_to_events(message.value() or b"", normalise=True, keep_raw_args=keep_raw_args)
            except InvalidOtlp as error:
                dead.append(self._dead_letter(message, source, str(error), ingested_at))
                continue
            if mapped.rejected:
                shown = "; ".join(f"span {r.where}: {r.reason}" for r in mapped.rejected[:20])
                more = f"; and {len(mapped.rejected) - 20} more" if len(mapped.rejected) > 20 else ""
                dead.append(self._dead_letter(
                    message, source, f"{len(mapped.rejected)} span(s) cannot be mapped: {shown}{more}", ingested_at))
            self.stats["otlp_spans_skipped"] += mapped.skipped_total
            for event in mapped.events:
                price_event(self.prices, event)
                event["source"] = source
                event["ingested_at"] = ingested_at
                events.append(event)
                by_partition[run_partition(event["run_id"], self.settings.partitions)].append(pack(event))
        self._insert("events", events)
        self._reject(dead)
        self._hand_over(by_partition)
        self.stats["events"] += len(events)
        telemetry.EVENTS_INGESTED.inc(len(events))

    # agent.deployments

    def _ingest_deployments(self, messages: list[Message]) -> None:
        """Land deployment events and hand them to the metrics stage, in the partition of
        their agent (where its runs meet), whatever partition deploy tooling wrote them to."""
        received_at = now_ms()
        rows, dead = [], []
        by_target: dict[int, list[dict]] = defaultdict(list)
        for message in messages:
            source = f"{message.topic()}:{message.partition()}:{message.offset()}"
            try:
                event = parse_deployment(message.value())
            except InvalidEvent as error:
                dead.append(self._dead_letter(message, source, str(error), received_at))
                continue
            rows.append({**event, "source": source})
            by_target[agent_partition(event["agent_id"], self.settings.partitions)].append(event)
        self._insert("deployments", rows)
        self._reject(dead)
        for target, events in by_target.items():
            self._produce(topics.RUN_RESULTS.name, orjson.dumps({"deployments": events}), partition=target)

    def _reject(self, dead: list[dict]) -> None:
        """The one error policy: a message that cannot be processed goes to the dead-letter
        table and topic, with why and where from, and the stream goes on."""
        self._insert("dead_letters", dead)
        for row in dead:
            self._produce(
                topics.DEAD_LETTERS.name, row["payload_full"], key=row["key"] or None,
                headers=[("trackside.error", row["error"].encode()), ("trackside.source", row["source"].encode())],
            )
        self.stats["dead_letters"] += len(dead)
        for topic, count in Counter(row["topic"] for row in dead).items():
            telemetry.DEAD_LETTERS.labels(topic).inc(count)

    def _dead_letter(self, message: Message, source: str, error: str, received_at: int) -> dict:
        payload = message.value() or b""
        log.info("dead letter %s: %s", source, error)
        return {
            "received_at": received_at,
            "source": source,
            "topic": message.topic(),
            "partition": message.partition(),
            "offset": message.offset(),
            "key": message.key() or b"",
            "error": error,
            "payload": payload[:DLQ_PAYLOAD_LIMIT],
            "payload_bytes": len(payload),
            "payload_full": payload,
        }

    def _produce(self, topic: str, value: bytes, **options) -> None:  # noqa: ANN003 (Producer.produce's options)
        while True:
            try:
                self._producer.produce(topic, value=value, **options)
                return
            except BufferError:
                self._producer.poll(0.1)
            except KafkaException as error:
                raise BrokerError(f"cannot produce to {topic}: {error}") from None

    # Result topics of the processors.

    def _land(self, messages: list[Message], decode: Callable[[bytes], dict[str, list[dict]]]) -> None:
        """Land the rows each message holds, by table; a message that cannot be read is a dead letter."""
        rows: dict[str, list[dict]] = defaultdict(list)
        dead = []
        received_at = now_ms()
        for message in messages:
            try:
                for table, table_rows in decode(message.value()).items():
                    rows[table] += table_rows
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, pa.ArrowException) as error:
                source = f"{message.topic()}:{message.partition()}:{message.offset()}"
                dead.append(self._dead_letter(message, source, f"unreadable {message.topic()} message: {error!r}", received_at))
        for table, table_rows in rows.items():
            self._insert(table, table_rows)
        self._reject(dead)

    def _land_runs(self, messages: list[Message]) -> None:
        # the topic also carries deployments and tenant costs to the metrics stage: no rows
        self._land(messages, lambda value: {"runs": orjson.loads(value).get("runs") or []})

    def _land_metrics(self, messages: list[Message]) -> None:
        # One message of the metrics stage carries rows for several tables.
        tables_by_key = {"metrics": "agent_metrics", "drift": "drift", "failure_clusters": "failure_clusters",
                         "runs": "runs", "canaries": "canaries"}

        def decode(value: bytes) -> dict[str, list[dict]]:
            result = orjson.loads(value)
            return {table: result[key] for key, table in tables_by_key.items() if result.get(key)}

        self._land(messages, decode)

    def _land_alerts(self, messages: list[Message]) -> None:
        # The table mirrors the topic: every alert as sent, evidence as JSON text.
        def decode(value: bytes) -> dict[str, list[dict]]:
            alert = orjson.loads(value)
            row = {**alert, "evidence": orjson.dumps(alert["evidence"]).decode(), "action": alert.get("action", "")}
            tables.to_arrow([row], tables.ALERTS)  # others may write this topic: check each one
            return {"alerts": [row]}

        self._land(messages, decode)

    def _land_rollbacks(self, messages: list[Message]) -> None:
        # The table mirrors the topic, like alerts.
        def decode(value: bytes) -> dict[str, list[dict]]:
            decision = orjson.loads(value)
            row = {**decision, "evidence": orjson.dumps(decision["evidence"]).decode()}
            tables.to_arrow([row], tables.ROLLBACKS)
            return {"rollbacks": [row]}

        self._land(messages, decode)
