"""One partition of the run assembler: event batches in; closed runs (per agent partition) and alerts out."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from streams.contracts.messages import ClosedRuns, EventBatch
from streams.contracts.topics import agent_partition
from streams.detect.policy import Policy
from streams.detect.runs import RunAssembler
from streams.settings import Settings

# A partition whose watermark moved tells the metric partitions without runs at most this often.
WATERMARK_EVERY_S = 1.0


@dataclass
class AssemblerOutput:
    closed: list[dict]  # rows of runs that closed (or changed after closing)
    alerts: list[dict]  # not sent before
    results: dict[int, ClosedRuns]  # metrics partition -> its message


class AssemblerPartition:
    """Folds the event batches of one partition into runs; no I/O.

    Built from what the store holds (`streams.processors.recovery.read_open_runs`): the
    events of runs still open, packed, replayed a few runs at a time (each run's events
    together), and the alerts already sent about them, which a replay or a redelivery raises
    again and which are therefore not sent twice.
    """

    def __init__(self, partition: int, settings: Settings, policy: Policy, stored_events: Iterable[list],
                 sent_alert_ids: set[str], now_ms: int) -> None:
        self.partition = partition
        self.partitions = settings.partitions
        self.assembler = RunAssembler(
            settings.run_idle_timeout_seconds * 1000, settings.allowed_lateness_seconds * 1000,
            settings.loop_policy(), lambda agent: policy.budget(agent, "run_usd"))
        self.sent = sent_alert_ids
        self._told: dict[int, float] = {}  # metrics partition -> wall time of the last message to it
        self._recovered: list[dict] = []
        for events in stored_events:
            self._recovered += self.assembler.apply_packed(events, now_ms, replay=True)

    def handle(self, batch: EventBatch, processed_ts: int, now_ms: int, wall_s: float) -> AssemblerOutput:
        """Fold one batch in. `processed_ts`: the batch message's Kafka timestamp (ms)."""
        closed, self._recovered = self._recovered + self.assembler.apply_packed(batch.events, now_ms), []
        alerts = [alert for alert in self.assembler.take_alerts() if alert["alert_id"] not in self.sent]
        by_target: dict[int, list[dict]] = defaultdict(list)
        for row in closed:
            by_target[agent_partition(row["agent_id"], self.partitions)].append(row)
        results = {}
        for target in range(self.partitions):
            rows = by_target.get(target)
            if not rows and wall_s - self._told.get(target, 0.0) < WATERMARK_EVERY_S:
                continue
            self._told[target] = wall_s
            results[target] = ClosedRuns(self.partition, self.assembler.watermark, rows or [], processed_ts)
        if not results:  # one message at least: it tells the pipeline watch this batch is done
            results[self.partition] = ClosedRuns(self.partition, self.assembler.watermark, [], processed_ts)
        return AssemblerOutput(closed, alerts, results)
