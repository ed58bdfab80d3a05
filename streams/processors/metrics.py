"""One partition of the metrics stage: run results in; window, drift, cluster and canary rows, alerts,
rollbacks and tenant costs out."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from streams.contracts.messages import Deployments, MetricResults, RunResult, TenantCosts
from streams.contracts.topics import agent_partition, tenant_partition_key
from streams.detect.budgets import PeriodBudgets
from streams.detect.drift import DriftDetector
from streams.detect.failures import FailureClusterer
from streams.detect.governance import GovernanceWatch
from streams.detect.metrics import MetricWindows
from streams.detect.policy import Policy
from streams.detect.rollout import RolloutController
from streams.detect.runs import row_version
from streams.settings import Settings

@dataclass
class MetricsState:
    """What a metrics partition starts from, read from the store (`streams.processors.recovery`).
    The runs come a page at a time (lists of rows, oldest first), so that a rebuild holds one
    page of rows, not hours of them."""

    window_runs: Iterable[list[dict]] = ()  # runs of windows not final yet
    final_before: int = 0  # where final windows end
    history: Iterable[list[dict]] = ()  # recent runs the detectors learn again
    watermark: int | None = None  # event time every assembler partition had passed (None: unknown)
    deployments: list[dict] = field(default_factory=list)
    versions: list[dict] = field(default_factory=list)  # each version's first run (`agent_versions`)
    canaries: list[dict] = field(default_factory=list)  # the canary analyses as they were (`canaries`)
    tenant_runs: list[dict] = field(default_factory=list)  # runs of the partition's tenants, for their budgets
    sent: set[str] = field(default_factory=set)  # ids of alerts and rollbacks already out


@dataclass
class MetricsOutput:
    results: MetricResults  # for the store sink; sent even when empty: it tells the pipeline watch how far this stage is
    alerts: list[dict]  # not sent before
    rollbacks: list[dict]  # not sent before
    tenant_costs: dict[int, TenantCosts]  # metrics partition that owns the tenant -> its message


@dataclass
class _Found:
    """What folding runs in gave, gathered until it goes out."""

    drift: list[dict] = field(default_factory=list)
    failure_clusters: dict[str, dict] = field(default_factory=dict)  # cluster_id -> its newest row
    runs: list[dict] = field(default_factory=list)
    canaries: list[dict] = field(default_factory=list)
    alerts: list[dict] = field(default_factory=list)
    rollbacks: list[dict] = field(default_factory=list)
    tenant_costs: dict[int, TenantCosts] = field(default_factory=dict)


class MetricsPartition:
    """The windows, drift tests, failure clusters, canary analyses and budgets of the agents
    (and tenants) of one partition; no I/O. The runs a restart relearns are folded in as they
    are read, page by page; what that finds goes out with the first message."""

    def __init__(self, partition: int, settings: Settings, policy: Policy, state: MetricsState, now_ms: int = 0) -> None:
        window_ms = settings.window_seconds * 1000
        idle_timeout_ms = settings.run_idle_timeout_seconds * 1000
        self.partition = partition
        self.partitions = settings.partitions
        self.policy = policy
        self.sent = state.sent
        self.windows = MetricWindows(window_ms, idle_timeout_ms, settings.partitions)
        self.windows.restore(state.final_before, state.window_runs)
        self.rollouts = RolloutController(policy, window_ms, state.sent)
        self.rollouts.deploy(state.deployments)
        self.rollouts.restore(state.versions, state.canaries)
        self.budgets = PeriodBudgets(policy)
        self.budgets.spend_tenants(state.tenant_runs)
        self.drift = DriftDetector(window_ms=window_ms, lateness_ms=settings.allowed_lateness_seconds * 1000,
                                   baseline_version=self.rollouts.rollouts.canary_baseline)
        self.clusters = FailureClusterer(window_ms=window_ms)
        self.governance = GovernanceWatch(window_ms, lateness_ms=settings.allowed_lateness_seconds * 1000)
        self._found = _Found()
        for runs in state.history:
            # The history comes in order of ended_at: a window before the last run of a page
            # has all its runs (and is tested if every partition had passed it).
            passed = -(2 ** 62) if state.watermark is None or not runs else min(state.watermark, runs[-1]["ended_at"])
            self._fold(runs, passed, now_ms, test=False)

    def handle(self, message: RunResult, processed_ts: int, now_ms: int) -> MetricsOutput:
        """Fold one run result in. `processed_ts`: its Kafka timestamp (ms). Blocking (the drift
        tests take milliseconds): the faust agent runs it off its event loop."""
        out = MetricResults(partition=self.partition, processed_ts=processed_ts)
        if isinstance(message, Deployments):
            self._found.alerts += self.rollouts.deploy(message.deployments)
        elif isinstance(message, TenantCosts):
            self._found.alerts += self.budgets.spend_tenants(message.tenant_runs)
        else:
            out.metrics = self.windows.apply(message.runs, message.partition, message.watermark, now_ms)
            # A window is tested once every upstream partition has passed it, so none of its
            # runs is late here; a message with no runs may be what moves that on.
            self._fold(message.runs, self.windows.slowest_watermark(now_ms) or -(2 ** 62), now_ms, test=True)
        found, self._found = self._found, _Found()
        out.drift, out.failure_clusters, out.runs, out.canaries = (
            found.drift, list(found.failure_clusters.values()), found.runs, found.canaries)
        return MetricsOutput(out, [alert for alert in found.alerts if alert["alert_id"] not in self.sent],
                             found.rollbacks, found.tenant_costs)

    def _fold(self, runs: list[dict], passed: int, now_ms: int, *, test: bool) -> None:
        """Fold closed runs into the detectors; `passed`: the event time every upstream partition
        has passed; `test`: test the drift windows that completes even without runs."""
        found = self._found
        if runs or test:
            drift_rows, drift_alerts = self.drift.update(runs, passed)
            found.drift += [{**row, "updated_at": now_ms} for row in drift_rows]
            found.alerts += drift_alerts + self.governance.update(runs, passed)
        if not runs:
            return
        clusters, cluster_alerts, assigned = self.clusters.update(runs, now_ms)
        found.failure_clusters.update((row["cluster_id"], row) for row in clusters)
        # The run's row again, with its failure cluster: it replaces the plain one (a run read
        # back from the store already has it).
        found.runs += [{**row, "failure_cluster_id": assigned[row["run_id"]],
                        "version": row_version(row["event_count"], True)}
                       for row in runs if assigned.get(row["run_id"], row["failure_cluster_id"]) != row["failure_cluster_id"]]
        rollbacks, rollout_alerts, canaries = self.rollouts.update(runs)
        found.rollbacks += rollbacks
        found.canaries += [{**row, "updated_at": now_ms} for row in canaries]
        found.alerts += cluster_alerts + rollout_alerts + self.budgets.spend_agents(runs)
        if self.policy.tenant_budgets:
            found.alerts += self._tenant_costs(runs, found.tenant_costs)

    def _tenant_costs(self, runs: list[dict], outgoing: dict[int, TenantCosts]) -> list[dict]:
        """Each run's cost to the partition of its tenant, whose budget sums every agent's runs;
        this partition's tenants are summed here (returns their alerts)."""
        by_target: dict[int, list[dict]] = defaultdict(list)
        for row in runs:
            if row.get("tenant"):
                by_target[agent_partition(tenant_partition_key(row["tenant"]), self.partitions)].append(
                    {key: row[key] for key in ("run_id", "agent_id", "tenant", "ended_at", "cost_usd")})
        alerts = []
        for target, items in by_target.items():
            if target == self.partition:
                alerts += self.budgets.spend_tenants(items)
            else:
                outgoing.setdefault(target, TenantCosts([])).tenant_runs.extend(items)
        return alerts
