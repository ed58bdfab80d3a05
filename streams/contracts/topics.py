"""Every Kafka topic Trackside touches, named once, with who writes and who reads it, and its key.
All get `settings.partitions` partitions (streams/contracts/README.md, "Topics")."""

from __future__ import annotations

import zlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    name: str
    # Internal topics carry Trackside's own batches between its stages; nobody outside reads them.
    internal: bool
    about: str
    # Who produces to the topic and who consumes it (consumer groups of Trackside in brackets).
    writers: tuple[str, ...] = ()
    readers: tuple[str, ...] = ()
    # The message key, or how the partition is chosen when there is none.
    key: str = ""


AGENT_EVENTS = Topic(
    "agent.events", False, "agent events (SPEC §4)",
    writers=("agents", "trackside publish / import / demo"),
    readers=("the sink (trackside-store): validate, price, land, hand over",),
    key="run_id")
AGENT_DEPLOYMENTS = Topic(
    "agent.deployments", False, "rollout changes (SPEC §5)",
    writers=("deploy tooling", "trackside publish --deployments / demo"),
    readers=("the sink (trackside-store): lands them and hands them to the metrics stage over trackside.run-results",),
    key="agent_id")
OTLP_SPANS = Topic(
    "otlp_spans", False, "OTLP TracesData batches",
    writers=("the OpenTelemetry Collector's kafka exporter",),
    readers=("the sink (trackside-store), through streams/ingest/otlp.py",),
    key="as the exporter writes it; the sink routes each event by its run (run_partition)")
DEAD_LETTERS = Topic(
    "agent.events.dlq", False, "rejected messages with trackside.error/source headers",
    writers=("the sink: its own dead letters, poison rows, and the processors' (from trackside.metric-results)",),
    readers=("people and replay tools",),
    key="the rejected message's own key")
ALERTS = Topic(
    "trackside.alerts", False, "alerts (SPEC §6)",
    writers=("assemble_runs (loop, run budget)", "trackside gate (a failed gate)",
             "compute_metrics (drift, failure clusters, canary metrics, agent-hour and tenant-day budgets)",
             "the sink (pipeline alerts of the pipeline watch)"),
    readers=("the sink (trackside-store): the alerts table",
             "the forwarders (trackside-forwarder-alertmanager, trackside-forwarder-webhook)",
             "alerting systems"),
    key="fingerprint")
ROLLBACKS = Topic(
    "trackside.rollbacks", False, "rollback decisions (SPEC §7)",
    writers=("compute_metrics (the rollout controller)",),
    readers=("deploy tooling", "the sink (trackside-store): the rollbacks table"),
    key="agent_id")
CONTROLS = Topic(
    "trackside.controls", False, "controls (SPEC §9): stop a run, pause or resume a version",
    writers=("trackside stop / pause / resume (people)",
             "the sink: a stop_run for a firing alert that asks for one, a pause_version for a rollback"),
    readers=("agents and deploy tooling", "the sink (trackside-store): the controls table"),
    key="run_id (stop_run), agent_id/agent_version (pause_version, resume_version)")
GATES = Topic(
    "trackside.gates", False, "verdicts of evaluation gates (SPEC §11), one `gates` row each",
    writers=("trackside gate (CI, before a release)",),
    readers=("the sink (trackside-store): the gates table", "CI and deploy tooling"),
    key="agent_id")

# One message per polled batch of one agent.events partition (or of the OTLP runs routed to
# it), sent to the same partition number, so every event of a run reaches the same assembler.
EVENT_BATCHES = Topic(
    "trackside.event-batches", True, "validated events, batched per partition (EventBatch)",
    writers=("the sink",),
    readers=("assemble_runs (trackside-processors)",),
    key="none: the partition of the run's assembler")
# Closed runs, batched per target partition of agent_id so a window's runs meet in one
# place; also what the metrics stage needs from elsewhere: deployments and tenant costs.
RUN_RESULTS = Topic(
    "trackside.run-results", True,
    "closed runs (ClosedRuns), deployments (Deployments), tenant costs (TenantCosts), failed runs (FailedRuns), batched",
    writers=("assemble_runs (ClosedRuns)", "the sink (Deployments)", "compute_metrics (TenantCosts, FailedRuns)"),
    readers=("compute_metrics (trackside-processors)", "the sink (trackside-store): runs and stage_progress"),
    key="none: the metrics partition of the agent (agent_partition), tenant (tenant_partition_key) or "
        "failure mode key (mode_partition_key); ClosedRuns without runs (watermarks) go to any partition")
# Rows for the store, and the processors' dead letters.
METRIC_RESULTS = Topic(
    "trackside.metric-results", True,
    "agent_metrics, drift, failure_clusters, failure_cluster_agents, canaries and enriched runs rows, and dead letters "
    "(MetricResults)",
    writers=("compute_metrics", "the guard of each processor stage (dead letters)"),
    readers=("the sink (trackside-store)",),
    key="none: the partition of the input message")

ALL = (
    AGENT_EVENTS, AGENT_DEPLOYMENTS, OTLP_SPANS, DEAD_LETTERS, ALERTS, ROLLBACKS, CONTROLS, GATES,
    EVENT_BATCHES, RUN_RESULTS, METRIC_RESULTS,
)


# How messages are routed between the stages' partitions.


def agent_partition(agent_id: str, partitions: int) -> int:
    """The partition of an agent's closed runs and windows: stable across processes and restarts."""
    return zlib.crc32(agent_id.encode()) % partitions


def run_partition(run_id: str, partitions: int) -> int:
    """The assembler partition of a run whose events come unkeyed (OTLP spans): CRC-32 of the
    run id, the same function as ClickHouse's `CRC32`, so recovery can select them in SQL."""
    return zlib.crc32(run_id.encode()) % partitions


def tenant_partition_key(tenant: str) -> str:
    """The key whose agent partition holds a tenant's budget (tenants and agents share partitions)."""
    return "tenant:" + tenant


def mode_partition_key(mode_key: str) -> str:
    """The key whose agent partition holds the failure modes of a mode key (streams.detect.failures.mode_key),
    so that the failed runs of one cause meet in one partition whichever agent they come from."""
    return "failure-mode:" + mode_key
