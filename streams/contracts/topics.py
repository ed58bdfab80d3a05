"""Every Kafka topic Trackside touches, named once, with who writes and who reads it.

All of them get `settings.partitions` partitions, created before any client connects, so
that per-run and per-agent state stays co-partitioned across stages."""

from __future__ import annotations

import zlib
from dataclasses import dataclass



@dataclass(frozen=True)
class Topic:
    name: str
    # Internal topics carry Trackside's own batches between its stages; nobody outside reads them.
    internal: bool
    about: str


# Written by agents, read by the ingest stage. Key: run_id.
AGENT_EVENTS = Topic("agent.events", False, "agent events (SPEC §4)")
# Written by deploy tooling, read by the rollout processor. Key: agent_id.
AGENT_DEPLOYMENTS = Topic("agent.deployments", False, "rollout changes (SPEC §5)")
# Written by the OpenTelemetry Collector's kafka exporter, read by the OTLP ingest.
OTLP_SPANS = Topic("otlp_spans", False, "OTLP TracesData batches")
# Written by the ingest stage, read by people and replay tools. Key: as received.
DEAD_LETTERS = Topic("agent.events.dlq", False, "rejected messages with trackside.error/source headers")
# Written by the processors, read by alerting systems and the store sink. Key: fingerprint.
ALERTS = Topic("trackside.alerts", False, "alerts (SPEC §6)")
# Written by the rollout processor, read by deploy tooling and the store sink. Key: agent_id.
ROLLBACKS = Topic("trackside.rollbacks", False, "rollback decisions (SPEC §7)")

# Written by the ingest stage, read by the faust run assembler: one message per polled
# batch of one agent.events partition, sent to the same partition number, so every
# event of a run reaches the same assembler.
EVENT_BATCHES = Topic("trackside.event-batches", True, "validated events, batched per partition")
# Written by the run assembler, read by the metrics processor and the store sink: closed
# runs, batched per target partition of agent_id so a window's runs meet in one place.
RUN_RESULTS = Topic("trackside.run-results", True, "closed runs, batched, partitioned by agent_id")
# Written by the metrics processor, read by the store sink: window rows, batched.
METRIC_RESULTS = Topic("trackside.metric-results", True, "agent_metrics rows, batched")

ALL = (
    AGENT_EVENTS, AGENT_DEPLOYMENTS, OTLP_SPANS, DEAD_LETTERS, ALERTS, ROLLBACKS,
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
