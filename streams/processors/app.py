"""The faust app: the topics and two thin agents over per-partition state machines.
The agents, their guard and their restarts: streams/processors/README.md."""

from __future__ import annotations

import asyncio
import gc
import logging
import ssl
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Awaitable, Callable

import faust
import orjson

from streams import telemetry
from streams.contracts import topics
from streams.contracts.messages import EventBatch, MetricResults, dead_letter, decode_run_result
from streams.errors import StoreError
from streams.ops.frontdoor import STACK_CLIENT_ID
from streams.runtime import memory_report, release_memory
from streams.settings import Settings

if TYPE_CHECKING:
    from streams.processors.assembler import AssemblerPartition
    from streams.processors.metrics import MetricsPartition

log = logging.getLogger(__name__)

APP_ID = "trackside-processors"
# Event time of runs the drift tests and failure clusters relearn when a worker takes a
# partition: the drift reference's longest age.
DETECTION_HISTORY_MS = 3 * 3_600_000
# Messages an agent's stream buffers before faust stops fetching its partitions. A message is a
# batch of up to `handover_max_bytes` (500 KB), so faust's default of 4,096 could hold up to
# 2 GB a stream after a restart with a backlog; 16 hold at most 8 MB and 16,000 events or
# more, half a second of work at the fastest, many fetches of 50 ms. With 64, a worker
# catching up after a rebuild held ~25-60 MB more of them than one keeping up.
STREAM_BUFFER_MESSAGES = 16
# How often a worker gives the C heap's free pages back (`release_memory`, as `up` does): in
# a 10-minute soak with a restart halfway, the worker's peak after the restart was 707 MB with
# it and 752 MB without (one run each, jobs/README.md).
RELEASE_MEMORY_EVERY_S = 10.0
# A dead letter of a processor carries at most this much of the message (the whole message
# stays on its topic, at the dead letter's source).
DEAD_LETTER_PAYLOAD_BYTES = 256 << 10


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def kafka_ms(event) -> int:  # noqa: ANN001 (a faust EventT)
    """The Kafka timestamp of the event's message, in ms (faust gives seconds as a float)."""
    return round((event.message.timestamp or time.time()) * 1000)


async def _from_store(query, *args):  # noqa: ANN001, ANN202
    """Run a blocking store query off the event loop; retry while the store is unavailable."""
    delay = 0.5
    while True:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, query, *args)
        except StoreError as error:
            log.warning("%s failed (%s); retrying in %.1f s", query.__name__, error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


@contextmanager
def _rebuilding(stage: str, partition: int) -> Iterator[None]:
    """Around the rebuild of a stage's partition from the store: logged when it starts and ends
    (a stage that never starts one is told from a slow one), timed, and the memory it freed given
    back."""
    started = time.monotonic()
    log.info("%s partition %d: rebuilding its state from the store", stage, partition)
    yield
    release_memory()
    took = time.monotonic() - started
    log.info("%s partition %d: rebuilt in %.1f s", stage, partition, took)
    telemetry.STATE_REBUILD_SECONDS.labels(stage).observe(took)


def import_processors() -> threading.Thread:
    """Import the per-partition state machines (numpy, scipy and scikit-learn: ~1.8 s) in a
    thread, while faust starts and joins its group (seconds of waiting), instead of before;
    join the thread before the first use."""

    def load() -> None:
        import streams.processors.assembler  # noqa: F401
        import streams.processors.metrics  # noqa: F401
        import streams.processors.recovery  # noqa: F401

        gc.freeze()  # as `tune_gc` does for what was imported before: out of the collector's way

    thread = threading.Thread(target=load, name="import-processors", daemon=True)
    thread.start()
    return thread


def broker_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """TRACKSIDE_KAFKA_* security settings in faust's terms (faust does not read librdkafka's)."""
    protocol = settings.kafka_security_protocol.upper()
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=settings.kafka_ssl_ca_location or None)
        if settings.kafka_ssl_certificate_location:
            context.load_cert_chain(
                settings.kafka_ssl_certificate_location,
                settings.kafka_ssl_key_location or None,
                settings.kafka_ssl_key_password.get_secret_value() or None,
            )
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value(),
            mechanism=settings.kafka_sasl_mechanism or "PLAIN",
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def create_app(settings: Settings) -> faust.App:
    """A fresh faust app with its agents; nothing is shared between two apps."""
    app = faust.App(
        APP_ID,
        # trackside:// is faust's aiokafka transport with a short fetch wait (streams/processors/transport.py).
        broker=[f"trackside://{server}" for server in settings.bootstrap_servers.split(",")],
        broker_credentials=broker_credentials(settings),
        broker_client_id=f"{STACK_CLIENT_ID}-worker",  # the front door lets the stack's clients in
        store="memory://",
        datadir=str(settings.data_dir / "faust"),
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=1,
        topic_partitions=settings.partitions,
        # Topics are created with fixed partitions by `trackside up` before any client connects.
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        stream_buffer_maxsize=STREAM_BUFFER_MESSAGES,
        web_enabled=False,
        TableManager="streams.processors.transport:TableManager",
        Worker="streams.processors.transport:Worker",
        producer_acks=-1,
        producer_compression_type=None if settings.internal_compression == "none" else settings.internal_compression,
    )
    event_batches = app.topic(topics.EVENT_BATCHES.name, key_serializer="raw", value_serializer="raw")
    run_results = app.topic(topics.RUN_RESULTS.name, key_serializer="raw", value_serializer="raw")
    metric_results = app.topic(topics.METRIC_RESULTS.name, key_serializer="raw", value_serializer="raw")
    alerts_out = app.topic(topics.ALERTS.name, key_serializer="raw", value_serializer="raw")
    rollbacks_out = app.topic(topics.ROLLBACKS.name, key_serializer="raw", value_serializer="raw")
    policy = settings.policy()
    imported = import_processors()
    assemblers: dict[int, AssemblerPartition] = {}
    analysts: dict[int, MetricsPartition] = {}

    @app.on_partitions_revoked.connect
    async def forget_revoked(app, revoked, **kwargs) -> None:  # noqa: ANN001 (faust's signal signature)
        # Another worker takes these partitions over; it rebuilds their state.
        for tp in revoked:
            {topics.EVENT_BATCHES.name: assemblers, topics.RUN_RESULTS.name: analysts}.get(tp.topic, {}).pop(
                tp.partition, None)

    async def send_alerts(alerts: list[dict]) -> None:
        for alert in alerts:
            await alerts_out.send(key=alert["fingerprint"].encode(), value=orjson.dumps(alert))
            telemetry.ALERTS.labels(alert["kind"], alert["status"]).inc()

    async def send_split(topic, message, partition: int) -> None:  # noqa: ANN001 (a faust topic, a message)
        # within the hand-over bound, like the sink's: a restart's first batch may close thousands of runs
        for value in message.encode_split(settings.handover_max_bytes):
            await topic.send(value=value, partition=partition)

    async def guarded(stage: str, event, handle: Callable[[], Awaitable[None]]) -> None:  # noqa: ANN001
        """The one guard of a stage: a message whose handling raises is a dead letter (table and
        DLQ topic, through the sink), and the stage goes on with the next one."""
        started = time.monotonic()
        try:
            await handle()
        except Exception as error:  # anything: an agent that raises is dead for good
            message = event.message
            source = f"{message.topic}:{message.partition}:{message.offset}"
            log.exception("%s: message %s raised; it goes to the dead letters", stage, source)
            telemetry.STAGE_FAILURES.labels(stage).inc()
            reason = f"{stage} raised {type(error).__name__}: {error}"[:2000]
            where = "".join(traceback.format_exception(error)[-3:])[-2000:]
            letter = dead_letter(message.topic, message.partition, message.offset, message.key,
                                 (message.value or b"")[:DEAD_LETTER_PAYLOAD_BYTES], f"{reason}\n{where}", now_ms())
            # also tells the pipeline watch that the stage is past this message
            done = MetricResults(dead_letters=[letter], stage=stage, partition=message.partition,
                                 processed_ts=kafka_ms(event))
            await metric_results.send(value=done.encode(), partition=message.partition)
        telemetry.PROCESSOR_MESSAGE_SECONDS.labels(stage).observe(time.monotonic() - started)

    @app.timer(interval=RELEASE_MEMORY_EVERY_S)
    async def give_back_memory() -> None:
        # what a rebuild and the catch-up after it left free in the C heap, back to the kernel
        await asyncio.get_running_loop().run_in_executor(None, release_memory)

    if settings.memory_report_seconds:
        @app.timer(interval=settings.memory_report_seconds)
        async def report_memory() -> None:
            log.info("memory: %s", memory_report())

    @app.agent(event_batches, name="assemble_runs")
    async def assemble_runs(stream) -> None:  # noqa: ANN001
        async for event in stream.events():
            await guarded("assemble_runs", event, lambda: assemble(event))

    async def assemble(event) -> None:  # noqa: ANN001
        partition = event.message.partition
        if partition not in assemblers:
            with _rebuilding("assemble_runs", partition):
                await asyncio.get_running_loop().run_in_executor(None, imported.join)
                from streams.processors.recovery import rebuild_assembler

                assemblers[partition] = await _from_store(
                    rebuild_assembler, settings, policy, partition, 2 * settings.run_idle_timeout_seconds * 1000,
                    now_ms())
        out = assemblers[partition].handle(EventBatch.decode(event.value), kafka_ms(event), now_ms(), time.monotonic())
        for outcome, count in Counter(row["outcome"] for row in out.closed).items():
            telemetry.RUNS_CLOSED.labels(outcome).inc(count)
        await send_alerts(out.alerts)
        for target, result in out.results.items():
            await send_split(run_results, result, target)

    @app.agent(run_results, name="compute_metrics")
    async def compute_metrics(stream) -> None:  # noqa: ANN001
        async for event in stream.events():
            await guarded("compute_metrics", event, lambda: analyse(event))

    async def analyse(event) -> None:  # noqa: ANN001
        partition = event.message.partition
        if partition not in analysts:
            with _rebuilding("compute_metrics", partition):
                await asyncio.get_running_loop().run_in_executor(None, imported.join)
                from streams.processors.recovery import rebuild_metrics

                analysts[partition] = await _from_store(
                    rebuild_metrics, settings, policy, partition, DETECTION_HISTORY_MS, now_ms())
        message = decode_run_result(event.value)
        # Off the event loop (the drift tests take milliseconds); awaited, so one at a time,
        # while the loop flushes what was sent and keeps the consumer's heartbeats going.
        out = await asyncio.get_running_loop().run_in_executor(
            None, analysts[partition].handle, message, kafka_ms(event), now_ms())
        await send_split(metric_results, out.results, partition)
        for target, costs in out.tenant_costs.items():
            await send_split(run_results, costs, target)
        for target, failed in out.failed_runs.items():  # to the partition of their failure mode key
            await send_split(run_results, failed, target)
        await send_alerts(out.alerts)
        for decision in out.rollbacks:
            await rollbacks_out.send(key=decision["agent_id"].encode(), value=orjson.dumps(decision))
            telemetry.ROLLBACKS.inc()

    return app
