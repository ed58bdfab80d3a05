"""The ingest and store sink stage: confluent-kafka in bulk, so faust sees batches, not events.
What it reads, lands, hands over and commits, and its error policy: streams/ingest/README.md, "The sink"."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Iterator, Protocol

import orjson
import pyarrow as pa
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from streams.contracts import tables, topics
from streams import telemetry
from streams.ingest.decode import INGESTED_AT, SOURCE, decode_events, event_row
from streams.ingest.pricing import PriceTable, price_rows
from streams.contracts.events import InvalidEvent
from streams.contracts.alerts import FIRING
from streams.contracts.controls import (MAX_REASON_CHARS, PAUSE_VERSION, RESUME_VERSION, STOP_RUN, TRACKSIDE, make_control,
                                        parse_control, subject_of)
from streams.detect.recent import RunMemory
from streams.ingest.otlp import GivenUp, InvalidOtlp, TraceMemory, otlp_to_events
from streams.contracts.deployments import parse_deployment
from streams.contracts.messages import (
    ClosedRuns, Deployments, EventBatch, InvalidMessage, MetricResults, decode_run_result, pack_row, received_dead_letter,
)
from streams.contracts.topics import agent_partition, run_partition
from streams.ingest.poison import UnfitRows, land
from streams.ops.broker import resident_bytes
from streams.ops.frontdoor import STACK_CLIENT_ID
from streams.ops.watch import STAGES, PipelineWatch
from streams.settings import Settings
from streams.store.clickhouse import Store

log = logging.getLogger(__name__)

GROUP = "trackside-store"
# How long the sink remembers an automatic control it sent, so that what asked for it, delivered
# again (after the processors were killed, say), does not send it twice.
ISSUED_KEPT_MS = 24 * 3_600_000
# The automatic controls of the last ISSUED_KEPT_MS, read back at start (`_recall_issued`): at
# most one a loop or run-budget alert and one a rollback of that day.
_ISSUED_SQL = ("SELECT control_id, toUnixTimestamp64Milli(ts) AS ts FROM controls "
               "WHERE issued_by = {issued_by:String} AND ts >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')")
# The newest version control of each agent version that has one: a pause still in force is sent
# again after the embedded broker forgot its topics (`_restore_pauses`).
_VERSION_STATES_SQL = (
    "SELECT control_id, toUnixTimestamp64Milli(ts) AS ts, action, agent_id, agent_version, run_id, reason, "
    "issued_by, alert_id, evidence FROM controls FINAL WHERE action IN {actions:Array(String)} "
    "ORDER BY ts DESC, control_id LIMIT 1 BY agent_id, agent_version")
# How often the pipeline watch looks at the stages' lag.
WATCH_EVERY_S = 0.5
DLQ_PAYLOAD_LIMIT = 1 << 20
# ClickHouse error codes that say the rows are wrong, not the store (errorCodeToName(code)).
DATA_ERROR_CODES = frozenset({
    6, 26, 27, 38, 41, 53, 69, 70, 72,  # CANNOT_PARSE_*, TYPE_MISMATCH, ARGUMENT_OUT_OF_BOUND, CANNOT_CONVERT_TYPE
    117, 131, 190, 321, 349,  # INCORRECT_DATA, TOO_LARGE_STRING_SIZE, SIZES_OF_ARRAYS_DONT_MATCH,
    # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE, CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
    407, 469, 691,  # DECIMAL_OVERFLOW, VIOLATED_CONSTRAINT, UNKNOWN_ELEMENT_OF_ENUM
})
_ERROR_CODE = re.compile(r"\bCode: (\d+)\.")


# A drain at shutdown ends once the broker has handed over nothing for this long (the sink
# polls every 50 ms; the workers have stopped and the agents are shut out by then).
DRAIN_QUIET_S = 0.5


@dataclass
class Drain:
    """What the sink landed after the processors stopped, before the embedded broker stops."""

    began: float
    deadline: float
    landed: int = 0  # messages
    emptied: bool = False  # nothing came for DRAIN_QUIET_S; else the deadline ended it, or:
    stuck: str = ""  # why nothing could land (the drain ended at once)
    seconds: float = 0.0


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
    return {"linger.ms": 5, "message.max.bytes": 16 << 20, "compression.type": settings.internal_compression,
            **settings.kafka_config}


def is_data_error(error: Exception) -> bool:
    """Whether the store refused rows for their data (so retrying them cannot help)."""
    if isinstance(error, UnfitRows):
        return True
    code = _ERROR_CODE.search(str(error))
    return code is not None and int(code.group(1)) in DATA_ERROR_CODES


class Handovers:
    """The messages the sink produces, each acknowledged by the broker before offsets move.

    Every message has a delivery callback. `settle` waits for them; a message the broker
    refused, or the producer itself (MSG_SIZE_TOO_LARGE), is counted, logged and produced
    again with backoff, without end while it is refused, until `stop` is set.
    """

    def __init__(self, producer: Producer, retry_max_seconds: float) -> None:
        self.producer = producer
        self.retry_max_seconds = retry_max_seconds
        self._refused: list[tuple[tuple, KafkaError]] = []
        self.retrying = False  # refused messages are being produced again

    def produce(self, topic: str, value: bytes, **options) -> None:  # noqa: ANN003 (Producer.produce's options)
        message = (topic, value, options)
        while True:
            try:
                self.producer.produce(topic, value=value, on_delivery=partial(self._delivered, message), **options)
                return
            except BufferError:
                self.producer.poll(0.1)
            except KafkaException as error:
                self._refused.append((message, error.args[0]))
                return

    def _delivered(self, message: tuple, error: KafkaError | None, _report: Message) -> None:
        if error is not None:
            self._refused.append((message, error))

    def settle(self, stop: threading.Event) -> bool:
        """Return True once every message produced so far is acknowledged; False if `stop` came first."""
        delay = 0.1
        while True:
            while self.producer.flush(1.0) and not stop.is_set():
                pass  # still queued: delivered or refused by `message.timeout.ms` at the latest
            refused, self._refused = self._refused, []
            if stop.is_set() and (refused or len(self.producer)):
                return False
            if not refused:
                if self.retrying:
                    log.warning("the broker takes the sink's messages again")
                    self.retrying = False
                    telemetry.HANDOVER_RETRYING.set(0)
                return True
            for topic, count in Counter(topic for (topic, _, _), _ in refused).items():
                telemetry.HANDOVER_FAILURES.labels(topic).inc(count)
            if not self.retrying:
                (topic, value, _), error = refused[0]
                log.warning("the broker refused %d message(s) of the sink (first: %d bytes to %s: %s); "
                            "producing them again with backoff, offsets not committed",
                            len(refused), len(value), topic, error)
                self.retrying = True
                telemetry.HANDOVER_RETRYING.set(1)
            if stop.wait(delay):
                return False
            delay = min(delay * 2, self.retry_max_seconds)
            for (topic, value, options), _ in refused:
                self.produce(topic, value, **options)


class SinkObserver(Protocol):
    """Told by the sink, in its thread, what it hands over and lands (the console's live view in
    `trackside up`: it follows the pipeline without reading the topics again)."""

    def events(self, packed: list) -> None: ...  # events handed to the assemblers (EventBatch rows)

    def runs_closed(self, run_ids: list[str]) -> None: ...  # closed runs landed

    def alerted(self, alerts: list[dict]) -> None: ...  # alerts landed


class StoreSink:
    """Runs the ingest and sink loop until `stop` is set; see streams/ingest/README.md.

    Rows remember the message they came from. A batch the store refuses is bisected
    (streams/ingest/poison.py): rows refused for their data, or refused while the rest of
    their batch lands, are poison, and their message goes to the dead letters with the
    reason; when every part of the batch is refused alike (a detached table, a server that
    is down) the store refuses everything, and the rest is retried with backoff, never skipped.
    """

    def __init__(self, settings: Settings, store: Store, *, broker_pid: int | None = None,
                 observers: list[SinkObserver] | None = None) -> None:
        self.settings = settings
        self.store = store
        # may be added to while running (the console starts after the pipeline); see `_tell`
        self.observers: list[SinkObserver] = observers if observers is not None else []
        self.broker_pid = broker_pid  # the embedded broker's, whose memory the pipeline watch reports
        self.prices = PriceTable()
        self.stats: Counter[str] = Counter()
        self.stop = threading.Event()
        self.assigned = threading.Event()
        self._retrying = False
        # named as the stack's own clients: the front door lets them in while it shuts agents out
        self._consumer = Consumer({**consumer_config(settings, GROUP), "client.id": f"{STACK_CLIENT_ID}-sink"})
        self._producer = Producer({**producer_config(settings), "client.id": f"{STACK_CLIENT_ID}-sink"})
        self._handovers = Handovers(self._producer, settings.handover_retry_max_seconds)
        self._policy = settings.policy()
        self._issued: RunMemory[bool] = RunMemory(slack=60_000)  # control ids sent, for ISSUED_KEPT_MS
        # OTLP spans held for their run, and what traces said before
        self._traces = TraceMemory(held_spans=settings.otlp_hold_spans, hold_ms=settings.otlp_hold_seconds * 1000)
        self.watch = PipelineWatch(settings.pipeline_lag_alert_seconds)
        self._watched = 0.0
        self._drain: Drain | None = None
        self._wake = threading.Event()
        self._handlers: dict[str, Callable[[list[Message]], None]] = {
            topics.AGENT_EVENTS.name: self._ingest_events,
            topics.AGENT_DEPLOYMENTS.name: self._ingest_deployments,
            topics.OTLP_SPANS.name: self._ingest_otlp,
            topics.ROLLBACKS.name: self._land_rollbacks,
            topics.RUN_RESULTS.name: self._land_runs,
            topics.METRIC_RESULTS.name: self._land_metrics,
            topics.ALERTS.name: self._land_alerts,
            topics.CONTROLS.name: self._land_controls,
            topics.GATES.name: self._land_gates,
        }

    def run(self) -> None:
        self._recall_issued()  # before anything that asks for a control is read
        if self.settings.embedded:
            self._restore_pauses()
        self._consumer.subscribe(list(self._handlers), on_assign=lambda *_: self.assigned.set())
        try:
            self._consume()
        finally:
            given_up = self._traces.expire(now_ms(), everything=True)
            if given_up:  # the embedded broker forgets them when it stops: the dead letters keep them
                self._reject(self._given_up(given_up, now_ms()))
            self._producer.flush(10)
            self._consumer.close()

    def _consume(self) -> None:
        quiet_since = time.monotonic()
        while not self.stop.is_set():
            if self._wake.is_set():
                self._wake.clear()
                self._wake_assemblers()
            messages = self._consumer.consume(self.settings.ingest_batch_max, self.settings.ingest_poll_seconds)
            if messages:
                self.process(messages)
                quiet_since = time.monotonic()
                if self._drain is not None:
                    self._drain.landed += len(messages)
            elif self._drain is not None and time.monotonic() - max(quiet_since, self._drain.began) >= DRAIN_QUIET_S:
                self._drain.emptied = True
                break
            if self._drain is not None and time.monotonic() >= self._drain.deadline:
                break
            if len(self._traces):  # held OTLP spans whose run did not come in time, without new spans
                given_up = self._traces.expire(now_ms())
                if given_up:
                    self._reject(self._given_up(given_up, now_ms()))
                    if self._handovers.settle(self.stop):
                        self._commit()  # past their messages, now in the dead letters
            self._watch_pipeline()

    def wake_assemblers(self) -> None:
        """Have every assembler partition rebuild its state from the store now (see `run`)."""
        self._wake.set()

    def _wake_assemblers(self) -> None:
        # An assembler partition rebuilds its runs from the store when it first sees a batch.
        # After the embedded broker started afresh, no batch may come for a long time, and the
        # runs whose events were all landed before the stop would wait for new traffic: an empty
        # batch to each partition rebuilds them now, and the runs that had ended are sent on.
        for partition in range(self.settings.partitions):
            self._hand_over(partition, EventBatch(partition, []).encode())

    def _hand_over(self, partition: int, batch: bytes) -> None:
        """One event batch to an assembler partition, which the pipeline watch then waits on."""
        handed = now_ms()
        self._handovers.produce(topics.EVENT_BATCHES.name, batch, partition=partition, timestamp=handed)
        self.watch.handed("assemble_runs", partition, handed)

    def drain(self, thread: threading.Thread, seconds: float) -> Drain:
        """Keep landing what the broker holds until nothing came for DRAIN_QUIET_S, or for at
        most `seconds`, then stop: the embedded broker forgets what it holds when it stops.
        `thread` runs `run`; returns what the drain did once it has ended."""
        began = time.monotonic()
        self._drain = Drain(began=began, deadline=began + seconds)
        while thread.is_alive() and time.monotonic() < self._drain.deadline:
            if self._handovers.retrying or self._retrying:  # nothing lands while the broker or store refuses
                self._drain.stuck = "the broker refuses the sink's messages" if self._handovers.retrying \
                    else "the store refuses writes"
                break
            thread.join(0.1)
        self.stop.set()
        self._drain.seconds = time.monotonic() - began
        return self._drain

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
        if not self._handovers.settle(self.stop):
            log.warning("stopped with messages of the sink not acknowledged; their offsets are not committed")
            return
        try:
            self._commit()
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

    def _commit(self) -> None:
        """Commit what was consumed, but not past a message whose OTLP spans are still held
        (TraceMemory): a restart reads it again rather than losing them."""
        held = self._traces.oldest_held()
        if not held:
            self._consumer.commit(asynchronous=False)
            return
        positions = self._consumer.position(self._consumer.assignment())
        offsets = [TopicPartition(tp.topic, tp.partition, min(tp.offset, held.get((tp.topic, tp.partition), tp.offset)))
                   for tp in positions if tp.offset >= 0]
        if offsets:
            self._consumer.commit(offsets=offsets, asynchronous=False)

    def _watch_pipeline(self) -> None:
        """Twice a second: each processor stage's lag in /metrics, and a `pipeline` alert when
        one stops or falls behind (streams/ops/watch.py)."""
        if time.monotonic() - self._watched < WATCH_EVERY_S:
            return
        self._watched = time.monotonic()
        now = now_ms()
        for stage in STAGES:
            telemetry.STAGE_LAG_SECONDS.labels(stage).set(self.watch.lag_ms(stage, now) / 1000)
            age = self.watch.last_message_age_ms(stage, now)
            if age is not None:
                telemetry.STAGE_LAST_MESSAGE_AGE_SECONDS.labels(stage).set(age / 1000)
        alerts = self.watch.check(now)
        broker = resident_bytes(self.broker_pid) if self.broker_pid is not None else None
        if broker is not None:
            telemetry.BROKER_RESIDENT_BYTES.set(broker)
            alerts += self.watch.check_broker(broker, self.settings.broker_memory_alert_bytes, now)
        for alert in alerts:
            log.warning("%s: %s", alert["status"], alert["summary"])
            self._handovers.produce(topics.ALERTS.name, orjson.dumps(alert), key=alert["fingerprint"].encode())
            telemetry.ALERTS.labels(alert["kind"], alert["status"]).inc()
        if alerts:
            self._handovers.settle(self.stop)

    def _insert(self, table: str, rows: list[dict], origins: list[Message] | None = None) -> set[str]:
        """Insert rows, retrying with backoff while the store refuses; gives up only on stop.

        `origins[i]` is the message row i came from; a row the table will never take sends
        that message to the dead letters (without origins, e.g. dead letters themselves, it
        is logged). Returns the sources (topic:partition:offset) of those messages.
        """
        if not rows:
            return set()
        schema = tables.BY_TABLE[table]

        def insert(indices: list[int]) -> None:
            try:
                data = tables.to_arrow([rows[i] for i in indices], schema)
            except (pa.ArrowException, KeyError, TypeError, ValueError, OverflowError) as error:
                raise UnfitRows(f"the {table} columns cannot hold these rows: {error!r}") from None
            started = time.monotonic()
            self.store.insert_arrow(table, data)
            telemetry.STORE_INSERT_SECONDS.labels(table).observe(time.monotonic() - started)
            telemetry.STORE_ROWS.labels(table).inc(len(indices))
            self.stats[f"rows_{table}"] += len(indices)

        rejected: set[str] = set()
        pending = list(range(len(rows)))
        delay = 0.1
        while True:
            landing = land(pending, insert, is_data_error)
            if landing.refusal is not None and len(landing.unlanded) < len(pending):
                log.warning("the store refused %d %s rows as one insert (%s); bisected: %d poison, %d landed, %d to retry",
                            len(pending), table, landing.refusal, len(landing.poison),
                            len(pending) - len(landing.poison) - len(landing.unlanded), len(landing.unlanded))
            rejected |= self._reject_poison(table, landing.poison, rows, origins)
            if not landing.unlanded:
                if self._retrying:
                    log.warning("store accepts writes again; %d %s rows landed", len(pending), table)
                    self._retrying = False
                    telemetry.STORE_RETRYING.set(0)
                return rejected
            self.stats["store_retries"] += 1
            telemetry.STORE_RETRIES.labels(table).inc()
            telemetry.STORE_RETRYING.set(1)
            if not self._retrying:
                log.warning("store refused %d %s rows (%s); retrying with backoff",
                            len(landing.unlanded), table, landing.error)
            self._retrying = True
            if self.stop.wait(delay):
                raise landing.error
            delay = min(delay * 2, self.settings.store_retry_max_seconds)
            pending = landing.unlanded

    def _reject_poison(
        self, table: str, poison: list[tuple[int, Exception]], rows: list[dict], origins: list[Message] | None
    ) -> set[str]:
        """The messages of rows the table will never take, to the dead letters; returns their sources."""
        dead: dict[str, dict] = {}
        received_at = now_ms()
        for index, error in poison:
            if origins is None:
                log.error("the %s table refuses a row for good (%s); it is not stored: %r", table, error, rows[index])
                continue
            message = origins[index]
            source = f"{message.topic()}:{message.partition()}:{message.offset()}"
            if source not in dead:
                reason = f"the {table} table refuses a row of this message: {error}"
                dead[source] = self._dead_letter(message, source, reason, received_at)
        self._reject(list(dead.values()))
        return set(dead)

    # agent.events

    def _ingest_events(self, messages: list[Message]) -> None:
        ingested_at = now_ms()
        decoded = decode_events([message.value() for message in messages], max_bytes=self.settings.max_event_bytes,
                                keep_raw_args=self.settings.store_raw_tool_args)
        rows: list[list] = []
        origins: list[Message] = []
        dead: list[dict] = []
        for message, row in zip(messages, decoded):
            source = f"{message.topic()}:{message.partition()}:{message.offset()}"
            if isinstance(row, InvalidEvent):
                dead.append(self._dead_letter(message, source, str(row), ingested_at))
                continue
            row[SOURCE] = source
            row[INGESTED_AT] = ingested_at
            rows.append(row)
            origins.append(message)
        price_rows(self.prices, rows)
        self._land_events(rows, origins, [message.partition() for message in origins], dead)

    def _land_events(self, rows: list[list], origins: list[Message], assemblers: list[int], dead: list[dict]) -> None:
        """Land the `events` rows (streams.ingest.decode) and the dead letters, then hand the
        events that landed to the run assemblers (`assemblers[i]`: the partition of row i's),
        in batches of at most `handover_max_bytes`, each in the partition of its assembler."""
        rejected = self._insert("events", rows, origins)
        self._reject(dead)
        by_partition: dict[int, list[tuple]] = defaultdict(list)
        for row, partition in zip(rows, assemblers):
            if row[SOURCE] not in rejected:
                by_partition[partition].append(pack_row(row))
        for partition, packed in by_partition.items():
            for value in EventBatch(partition, packed).encode_split(self.settings.handover_max_bytes):
                self._hand_over(partition, value)
            self._tell("events", packed)
        landed = sum(map(len, by_partition.values()))
        self.stats["events"] += landed
        telemetry.EVENTS_INGESTED.inc(landed)

    # otlp_spans

    def _ingest_otlp(self, messages: list[Message]) -> None:
        """OpenTelemetry spans (streams/ingest/otlp.py) become agent events and take the same path.

        A message is not keyed by run, so its events go to the assembler of `run_partition`
        of their run (the trace). An unreadable message, or one with spans that cannot be
        mapped, is a dead letter (whole, with each span's reason); its good spans still count.
        """
        ingested_at = now_ms()
        keep_raw_args = self.settings.store_raw_tool_args
        rows: list[list] = []
        assemblers: list[int] = []
        origins: list[Message] = []
        dead: list[dict] = []
        for message in messages:
            source = f"{message.topic()}:{message.partition()}:{message.offset()}"
            try:
                mapped = otlp_to_events(message.value() or b"", normalise=True, keep_raw_args=keep_raw_args,
                                        memory=self._traces, source=source, now_ms=ingested_at)
            except InvalidOtlp as error:
                dead.append(self._dead_letter(message, source, str(error), ingested_at))
                continue
            if mapped.rejected:
                shown = "; ".join(f"span {r.where}: {r.reason}" for r in mapped.rejected[:20])
                more = f"; and {len(mapped.rejected) - 20} more" if len(mapped.rejected) > 20 else ""
                dead.append(self._dead_letter(
                    message, source, f"{len(mapped.rejected)} span(s) cannot be mapped: {shown}{more}", ingested_at))
            self.stats["otlp_spans_skipped"] += mapped.skipped_total
            self.stats["otlp_spans_held"] += mapped.held
            dead += self._given_up(mapped.given_up, ingested_at)
            for event in mapped.events:
                row = event_row(event)
                row[SOURCE] = source
                row[INGESTED_AT] = ingested_at
                rows.append(row)
                origins.append(message)
                assemblers.append(run_partition(event["run_id"], self.settings.partitions))
        price_rows(self.prices, rows)
        self._land_events(rows, origins, assemblers, dead)

    def _given_up(self, spans: list[GivenUp], received_at: int) -> list[dict]:
        """Dead letters of held spans given up: one per message they came in, with its source."""
        letters = []
        for span in spans:
            topic, partition, offset = span.source.rsplit(":", 2)
            letters.append(self._dead_letter_row(topic, int(partition), int(offset), None, span.payload,
                                                 span.reason, received_at))
        return letters

    # agent.deployments

    def _ingest_deployments(self, messages: list[Message]) -> None:
        """Land deployment events and hand them to the metrics stage, in the partition of
        their agent (where its runs meet), whatever partition deploy tooling wrote them to."""
        received_at = now_ms()
        deployments, rows, origins, dead = [], [], [], []
        for message in messages:
            source = f"{message.topic()}:{message.partition()}:{message.offset()}"
            try:
                event = parse_deployment(message.value())
            except InvalidEvent as error:
                dead.append(self._dead_letter(message, source, str(error), received_at))
                continue
            deployments.append(event)
            rows.append({"config": "", **event, "source": source})
            origins.append(message)
        rejected = self._insert("deployments", rows, origins)
        self._reject(dead)
        by_target: dict[int, list[dict]] = defaultdict(list)
        for event, row in zip(deployments, rows):
            if row["source"] not in rejected:
                # the rollout needs no config (the versions table has it, from `deployments`)
                handed = {name: value for name, value in event.items() if name != "config"}
                by_target[agent_partition(event["agent_id"], self.settings.partitions)].append(handed)
        for target, events in by_target.items():
            for value in Deployments(events).encode_split(self.settings.handover_max_bytes):
                self._handovers.produce(topics.RUN_RESULTS.name, value, partition=target)

    def _reject(self, dead: list[dict]) -> None:
        """The one error policy: a message that cannot be processed goes to the dead-letter
        table and topic, with why and where from, and the stream goes on."""
        self._insert("dead_letters", dead)
        for row in dead:
            self._handovers.produce(
                topics.DEAD_LETTERS.name, row["payload_full"], key=row["key"] or None,
                headers=[("trackside.error", row["error"].encode()), ("trackside.source", row["source"].encode())],
            )
        self.stats["dead_letters"] += len(dead)
        for topic, count in Counter(row["topic"] for row in dead).items():
            telemetry.DEAD_LETTERS.labels(topic).inc(count)

    def _dead_letter(self, message: Message, source: str, error: str, received_at: int) -> dict:
        return self._dead_letter_row(message.topic(), message.partition(), message.offset(), message.key(),
                                     message.value() or b"", error, received_at)

    @staticmethod
    def _dead_letter_row(topic: str, partition: int, offset: int, key: bytes | None, payload: bytes, error: str,
                         received_at: int) -> dict:
        source = f"{topic}:{partition}:{offset}"
        log.info("dead letter %s: %s", source, error)
        return {
            "received_at": received_at,
            "source": source,
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "key": key or b"",
            "error": error,
            "payload": payload[:DLQ_PAYLOAD_LIMIT],
            "payload_bytes": len(payload),
            "payload_full": payload,
        }

    # Result topics of the processors.

    def _land(self, messages: list[Message], decode: Callable[[bytes], dict[str, list[dict]]]) -> None:
        """Land the rows each message holds, by table; a message that cannot be read is a dead letter."""
        rows: dict[str, list[dict]] = defaultdict(list)
        origins: dict[str, list[Message]] = defaultdict(list)
        dead = []
        received_at = now_ms()
        for message in messages:
            try:
                for table, table_rows in decode(message.value()).items():
                    rows[table] += table_rows
                    origins[table] += [message] * len(table_rows)
            except (orjson.JSONDecodeError, InvalidMessage, KeyError, TypeError, AttributeError, pa.ArrowException) as error:
                source = f"{message.topic()}:{message.partition()}:{message.offset()}"
                dead.append(self._dead_letter(message, source, f"unreadable {message.topic()} message: {error!r}", received_at))
        for table, table_rows in rows.items():
            self._insert(table, table_rows, origins[table])
        self._reject(dead)

    def _tell(self, what: str, items: list) -> None:
        """Tell the observers; one that fails is logged, and the sink goes on."""
        for observer in self.observers:
            try:
                getattr(observer, what)(items)
            except Exception:  # noqa: BLE001 (a view of the pipeline must not stop it)
                log.exception("the sink's observer %r failed on %s", observer, what)

    def _land_runs(self, messages: list[Message]) -> None:
        # The assembler's closed runs, with its progress; the topic also carries deployments
        # and tenant costs to the metrics stage, which hold no rows.
        progress: dict[int, dict] = {}
        closed: list[str] = []
        for message in messages:
            self.watch.handed("compute_metrics", message.partition(), message.timestamp()[1])

        def decode(value: bytes) -> dict[str, list[dict]]:
            result = decode_run_result(value)
            if not isinstance(result, ClosedRuns):
                return {}
            self.watch.processed("assemble_runs", result.partition, result.processed_ts)
            if result.watermark > progress.get(result.partition, {}).get("watermark", -1):
                progress[result.partition] = {"stage": "assemble_runs", "partition": result.partition,
                                              "watermark": result.watermark, "updated_at": now_ms()}
            closed.extend(row["run_id"] for row in result.runs)
            return {"runs": result.runs}

        self._land(messages, decode)
        self._insert("stage_progress", list(progress.values()))
        self._tell("runs_closed", closed)

    def _land_metrics(self, messages: list[Message]) -> None:
        # One message of the metrics stage carries rows for several tables, and the
        # processors' dead letters, which take the one error policy like the sink's own.
        dead: list[dict] = []

        def decode(value: bytes) -> dict[str, list[dict]]:
            result = MetricResults.decode(value)
            self.watch.processed(result.stage, result.partition, result.processed_ts)
            for row in result.dead_letters:
                topic, partition, offset, key, payload, error, received_at = received_dead_letter(row)
                dead.append(self._dead_letter_row(topic, partition, offset, key, payload, error, received_at))
            return result.rows_by_table()

        self._land(messages, decode)
        self._reject(dead)

    def _land_alerts(self, messages: list[Message]) -> None:
        # The table mirrors the topic: every alert as sent, evidence as JSON text. A firing alert
        # that asks to stop its run (a loop, a run over its budget) is also a stop_run control.
        seen: list[dict] = []

        def decode(value: bytes) -> dict[str, list[dict]]:
            alert = orjson.loads(value)
            row = {**alert, "evidence": orjson.dumps(alert["evidence"]).decode(), "action": alert.get("action", "")}
            tables.to_arrow([row], tables.ALERTS)  # others may write this topic: check each one
            if alert["status"] == FIRING and alert.get("action") == STOP_RUN and alert.get("run_id"):
                self._issue(make_control(
                    action=STOP_RUN, run_id=alert["run_id"], agent_id=alert["agent_id"],
                    agent_version=alert.get("agent_version", ""), reason=alert["summary"][:MAX_REASON_CHARS],
                    issued_by=TRACKSIDE, ts=now_ms(), alert_id=alert["alert_id"],
                    evidence={"alert_kind": alert["kind"], "alert_ts": alert["ts"]}, episode=alert["alert_id"]))
            seen.append(alert)
            return {"alerts": [row]}

        self._land(messages, decode)
        self._tell("alerted", seen)

    def _issue(self, control: dict) -> None:
        """An automatic control to `trackside.controls` (acknowledged before the offsets of what
        asked for it move), once: the same control_id again (an alert or a rollback delivered
        twice, e.g. after the processors were killed) is not sent again."""
        if control["control_id"] in self._issued:
            return
        self._issued.put(control["control_id"], now_ms() + ISSUED_KEPT_MS)
        self._issued.expire(now_ms())
        self._handovers.produce(topics.CONTROLS.name, orjson.dumps(control), key=subject_of(control).encode())

    def _recall_issued(self) -> None:
        """Remember the automatic controls sent in the last ISSUED_KEPT_MS, from `controls`: a
        restart of `up` (or a recycle of its broker) starts a new sink, and what asked for them
        may come again (a real Kafka redelivers what was not committed).

        Covered: every control that reached the table, the sink's own mirror of the topic. Not
        covered: one produced but not landed yet when `up` died. It lands when the sink reads
        it back from `trackside.controls`, a poll after it sent it; the offsets of what asked
        for it are committed right after the broker acknowledged it. A death between that
        acknowledgement and that commit (milliseconds) gets the asking message delivered again,
        and the control is sent a second time: same control_id, so still one row in `controls`,
        but two messages on the topic. A second stop_run is harmless to an agent; a second
        pause_version undoes a resume only if a person resumed the version in between. With the
        embedded broker the topics die with `up`, so nothing is redelivered from them; what the
        processors send again is what the store did not hold (streams/processors/recovery.py),
        and its control may then go out again too. Closing this would need the controls topic
        read up to its end before the alerts are: not done."""
        since = now_ms() - ISSUED_KEPT_MS
        rows = self.store.query_json(_ISSUED_SQL, {"issued_by": TRACKSIDE, "since": since}, person=False)
        for row in rows:
            self._issued.put(row["control_id"], int(row["ts"]) + ISSUED_KEPT_MS)
        self._issued.expire(now_ms())
        if rows:
            log.info("the sink remembers %d automatic controls sent since %s", len(rows),
                     time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since / 1000)))

    def _restore_pauses(self) -> None:
        """Send again, as they were, the pauses still in force: the embedded broker keeps topics in
        memory only, so after a restart of `up` or a recycle of the broker `trackside.controls` is
        empty, and an agent client, which learns the pauses in force from the topic, would let a
        paused version run. Same control_id: still one row in `controls`. A real Kafka keeps
        the topic (compacted by agent_id/agent_version), so this is for the embedded one only."""
        rows = self.store.query_json(_VERSION_STATES_SQL, {"actions": [PAUSE_VERSION, RESUME_VERSION]}, person=False)
        paused = [{**row, "ts": int(row["ts"]), "evidence": orjson.loads(row["evidence"] or "{}")}
                  for row in rows if row["action"] == PAUSE_VERSION]
        for control in paused:
            self._handovers.produce(topics.CONTROLS.name, orjson.dumps(control), key=subject_of(control).encode())
        if paused and not self._handovers.settle(self.stop):
            return
        if paused:
            log.info("the sink sent again %d pause(s) still in force: %s", len(paused),
                     ", ".join(subject_of(control) for control in paused))

    def _land_controls(self, messages: list[Message]) -> None:
        # The table mirrors the topic (the audit trail); anything else on it is a dead letter.
        def decode(value: bytes) -> dict[str, list[dict]]:
            control = parse_control(value)
            return {"controls": [{**control, "evidence": orjson.dumps(control.get("evidence", {})).decode()}]}

        self._land(messages, decode)

    def _land_gates(self, messages: list[Message]) -> None:
        # The verdicts of `trackside gate` (streams/ops/gates.py), one `gates` row each; the
        # command waits until its row is here. Anything else on the topic is a dead letter.
        def decode(value: bytes) -> dict[str, list[dict]]:
            row = orjson.loads(value)
            row = {**row, "evidence": orjson.dumps(row["evidence"]).decode()}
            tables.to_arrow([row], tables.GATES)
            return {"gates": [row]}

        self._land(messages, decode)

    def _land_rollbacks(self, messages: list[Message]) -> None:
        # The table mirrors the topic, like alerts. A rolled-back version is paused (a
        # pause_version control), unless its agent's policy says otherwise.
        def decode(value: bytes) -> dict[str, list[dict]]:
            decision = orjson.loads(value)
            row = {**decision, "evidence": orjson.dumps(decision["evidence"]).decode()}
            tables.to_arrow([row], tables.ROLLBACKS)
            if self._policy.pause_on_rollback(decision["agent_id"]):
                self._issue(make_control(
                    action=PAUSE_VERSION, agent_id=decision["agent_id"], agent_version=decision["from_version"],
                    reason=f"rolled back to {decision['to_version']}: {decision['reason']}"[:MAX_REASON_CHARS],
                    issued_by=TRACKSIDE, ts=now_ms(), alert_id=(decision.get("alert_ids") or [""])[0],
                    evidence={"rollback_id": decision["rollback_id"]}, episode=decision["rollback_id"]))
            return {"rollbacks": [row]}

        self._land(messages, decode)
