"""The faust app: thin agents that read batches, call the plain modules, and emit batches.

`assemble_runs` folds the ingest stage's event batches into runs (`streams.detect.runs`) and sends
closed runs, grouped by the partition of their agent, to `trackside.run-results`;
`compute_metrics` folds those into event-time windows (`streams.detect.metrics`), drift tests
(`streams.detect.drift`) and failure clusters (`streams.detect.failures`), and sends the changed rows to
`trackside.metric-results` and the alerts to `trackside.alerts`. The store sink lands both. A partition's
state is rebuilt from the store the first time a worker sees it (`streams.processors.recovery`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter, defaultdict

import faust
import orjson

from streams import telemetry
from streams.contracts import topics
from streams.detect.drift import DriftDetector
from streams.detect.failures import FailureClusterer
from streams.detect.metrics import MetricWindows
from streams.errors import StoreError
from streams.processors.recovery import open_run_events, open_windows, recent_runs, rollout_state
from streams.detect.rollout import RolloutController
from streams.contracts.topics import tenant_partition_key
from streams.detect.runs import RunAssembler, row_version
from streams.contracts.topics import agent_partition
from streams.contracts.messages import unpack
from streams.settings import Settings

log = logging.getLogger(__name__)

APP_ID = "trackside-processors"
# A partition whose watermark moved tells the metric partitions without runs at most this often.
WATERMARK_EVERY_S = 1.0
# Event time of runs the drift tests and failure clusters relearn when a worker takes a
# partition: the drift reference's longest age.
DETECTION_HISTORY_MS = 3 * 3_600_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _from_store(query, *args):  # noqa: ANN001, ANN202
    """Run a blocking store query off the event loop; retry while the store is unavailable.

    An exception must not escape an agent: faust would restart it past the current message.
    """
    delay = 0.5
    while True:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, query, *args)
        except StoreError as error:
            log.warning("%s failed (%s); retrying in %.1f s", query.__name__, error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


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
        # trackside:// is faust's aiokafka transport with a short fetch wait (streams/transport.py).
        broker=[f"trackside://{server}" for server in settings.bootstrap_servers.split(",")],
        broker_credentials=broker_credentials(settings),
        store="memory://",
        datadir=str(settings.data_dir / "faust"),
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=1,
        topic_partitions=settings.partitions,
        # Topics are created with fixed partitions by `trackside up` before any client connects.
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        producer_acks=-1,
    )
    event_batches = app.topic(topics.EVENT_BATCHES.name, key_serializer="raw", value_serializer="raw")
    run_results = app.topic(topics.RUN_RESULTS.name, key_serializer="raw", value_serializer="raw")
    metric_results = app.topic(topics.METRIC_RESULTS.name, key_serializer="raw", value_serializer="raw")
    alerts_out = app.topic(topics.ALERTS.name, key_serializer="raw", value_serializer="raw")
    rollbacks_out = app.topic(topics.ROLLBACKS.name, key_serializer="raw", value_serializer="raw")
    loop_policy = settings.loop_policy()
    policy = settings.policy()

    idle_timeout_ms = settings.run_idle_timeout_seconds * 1000
    window_ms = settings.window_seconds * 1000
    lateness_ms = settings.allowed_lateness_seconds * 1000
    assemblers: dict[int, RunAssembler] = {}
    windows: dict[int, MetricWindows] = {}
    detectors: dict[int, DriftDetector] = {}
    clusterers: dict[int, FailureClusterer] = {}
    controllers: dict[int, RolloutController] = {}
    told: dict[tuple[int, int], float] = {}  # (from partition, to partition) -> wall time of last watermark
    # Alert ids sent before this worker took the partition: redelivered events raise them again.
    sent: dict[int, set[str]] = {}
    sent_detections: dict[int, set[str]] = {}

    @app.on_partitions_revoked.connect
    async def forget_revoked(app, revoked, **kwargs) -> None:  # noqa: ANN001 (faust's signal signature)
        # Another worker takes these partitions over; it rebuilds their state.
        for tp in revoked:
            if tp.topic == topics.EVENT_BATCHES.name:
                assemblers.pop(tp.partition, None)
                sent.pop(tp.partition, None)
            elif tp.topic == topics.RUN_RESULTS.name:
                for state in (windows, detectors, clusterers, controllers, sent_detections):
                    state.pop(tp.partition, None)

    async def send_alerts(alerts) -> None:  # noqa: ANN001
        for alert in alerts:
            await alerts_out.send(key=alert["fingerprint"].encode(), value=orjson.dumps(alert))
            telemetry.ALERTS.labels(alert["kind"], alert["status"]).inc()

    @app.agent(event_batches, name="assemble_runs")
    async def assemble_runs(stream) -> None:  # noqa: ANN001
        async for message in stream.events():
            started = time.monotonic()
            batch = orjson.loads(message.value)
            partition = message.message.partition
            assembler = assemblers.get(partition)
            closed = []
            if assembler is None:
                assembler = assemblers[partition] = RunAssembler(
                    idle_timeout_ms, lateness_ms, loop_policy, lambda agent: policy.budget(agent, "run_usd"))
                stored, sent[partition] = await _from_store(open_run_events, settings, partition, 2 * idle_timeout_ms)
                telemetry.STATE_REBUILD_SECONDS.labels("assemble_runs").observe(time.monotonic() - started)
                closed = assembler.apply(stored, now_ms())
            closed += assembler.apply(unpack(batch["events"]), now_ms())
            for outcome, count in Counter(row["outcome"] for row in closed).items():
                telemetry.RUNS_CLOSED.labels(outcome).inc(count)
            await send_alerts(alert for alert in assembler.take_alerts() if alert["alert_id"] not in sent[partition])
            by_target: dict[int, list[dict]] = defaultdict(list)
            for row in closed:
                by_target[agent_partition(row["agent_id"], settings.partitions)].append(row)
            wall = time.monotonic()
            for target in range(settings.partitions):
                rows = by_target.get(target)
                if not rows and wall - told.get((partition, target), 0.0) < WATERMARK_EVERY_S:
                    continue
                told[(partition, target)] = wall
                value = {"partition": partition, "watermark": assembler.watermark, "runs": rows or []}
                await run_results.send(value=orjson.dumps(value), partition=target)
            telemetry.PROCESSOR_MESSAGE_SECONDS.labels("assemble_runs").observe(time.monotonic() - started)

    async def take_partition(partition: int) -> list[dict]:
        """A metrics partition's state the first time this worker sees it, rebuilt from the
        store; returns the recent runs the detectors learn again. Their rows are sent again
        (they replace themselves); their alerts and rollbacks only if they never went out."""
        state = windows[partition] = MetricWindows(window_ms, idle_timeout_ms, settings.partitions)
        stored, final_before = await _from_store(open_windows, settings, partition)
        state.restore(stored, final_before)
        history, sent_detections[partition] = await _from_store(recent_runs, settings, partition, DETECTION_HISTORY_MS)
        deployments, tenant_runs, sent_rollouts = await _from_store(
            rollout_state, settings, partition, policy.tenant_budgets)
        controller = controllers[partition] = RolloutController(
            policy, window_ms, sent_detections[partition] | sent_rollouts)
        controller.deploy(deployments)
        controller.spend_tenants(tenant_runs)
        sent_detections[partition] |= sent_rollouts
        detectors[partition] = DriftDetector(window_ms=window_ms, lateness_ms=lateness_ms,
                                             baseline_version=controller.rollouts.canary_baseline)
        clusterers[partition] = FailureClusterer(window_ms=window_ms)
        return history

    async def send_tenant_costs(partition: int, runs: list[dict]) -> list[dict]:
        """Each run's cost to the partition of its tenant, whose budget sums every agent's runs."""
        by_target: dict[int, list[dict]] = defaultdict(list)
        for row in runs:
            if row.get("tenant"):
                by_target[agent_partition(tenant_partition_key(row["tenant"]), settings.partitions)].append(
                    {key: row[key] for key in ("run_id", "agent_id", "tenant", "ended_at", "cost_usd")})
        alerts = []
        for target, items in by_target.items():
            if target == partition:
                alerts += controllers[partition].spend_tenants(items)
            else:
                await run_results.send(value=orjson.dumps({"tenant_runs": items}), partition=target)
        return alerts

    @app.agent(run_results, name="compute_metrics")
    async def compute_metrics(stream) -> None:  # noqa: ANN001
        async for message in stream.events():
            started = time.monotonic()
            result = orjson.loads(message.value)
            partition = message.message.partition
            history = []
            if partition not in windows:
                history = await take_partition(partition)
                telemetry.STATE_REBUILD_SECONDS.labels("compute_metrics").observe(time.monotonic() - started)
            controller = controllers[partition]
            alerts: list[dict] = []
            if "deployments" in result:  # from the store sink: deploy tooling's rollout changes
                alerts += controller.deploy(result["deployments"])
            if "tenant_runs" in result:  # from another metrics partition
                alerts += controller.spend_tenants(result["tenant_runs"])
            now = now_ms()
            out: dict[str, list] = {}
            if "watermark" in result:  # from the run assembler
                out["metrics"] = windows[partition].apply(result["runs"], result["partition"], result["watermark"], now)
            runs = history + result.get("runs", [])  # a run in both counts once
            rollbacks: list[dict] = []
            if runs or "watermark" in result:
                # A window is tested once every upstream partition has passed it, so none of
                # its runs is late here; a message with no runs may be what moves that on. The
                # tests run off the event loop (this agent awaits them, so one at a time), which
                # meanwhile flushes what was sent and keeps the consumer's heartbeats going.
                drift_rows, drift_alerts = await asyncio.get_running_loop().run_in_executor(
                    None, detectors[partition].update, runs, windows[partition].slowest_watermark(now) or -(2 ** 62))
                out["drift"] = [{**row, "updated_at": now} for row in drift_rows]
                alerts += drift_alerts
            if runs:
                out["failure_clusters"], cluster_alerts, assigned = clusterers[partition].update(runs, now)
                # The run's row again, with its failure cluster: it replaces the plain one.
                out["runs"] = [
                    {**row, "failure_cluster_id": assigned[row["run_id"]],
                     "version": row_version(row["event_count"], True)}
                    for row in runs if assigned.get(row["run_id"])
                ]
                rollbacks, rollout_alerts, canaries = controller.update(runs)
                out["canaries"] = [{**row, "updated_at": now} for row in canaries]
                alerts += cluster_alerts + rollout_alerts
                if policy.tenant_budgets:
                    alerts += await send_tenant_costs(partition, runs)
            if any(out.values()):
                await metric_results.send(value=orjson.dumps(out), partition=partition)
            await send_alerts(alert for alert in alerts if alert["alert_id"] not in sent_detections[partition])
            for decision in rollbacks:
                await rollbacks_out.send(key=decision["agent_id"].encode(), value=orjson.dumps(decision))
                telemetry.ROLLBACKS.inc()
            telemetry.PROCESSOR_MESSAGE_SECONDS.labels("compute_metrics").observe(time.monotonic() - started)

    return app
