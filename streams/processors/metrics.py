"""One partition of the metrics stage: run results in; window, drift, cluster and canary rows, alerts,
rollbacks and tenant costs out."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from streams.contracts.messages import ClosedRuns, Deployments, MetricResults, RunResult, TenantCosts
from streams.contracts.topics import agent_partition, tenant_partition_key
from streams.detect.budgets import PeriodBudgets
from streams.detect.drift import DriftDetector
from streams.detect.failures import FailureClusterer
from streams.detect.metrics import MetricWindows
from streams.detect.policy import Policy
from streams.detect.rollout import RolloutController
from streams.detect.runs import row_version
from streams.settings import Settings

@dataclass
class MetricsState:
    """What a metrics partition starts from, read from the store (`streams.processors.recovery`)."""

    window_runs: list[dict] = field(default_factory=list)  # runs of windows not final yet
    final_before: int = 0  # where final windows end
    history: list[dict] = field(default_factory=list)  # recent runs the detectors learn again
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


class MetricsPartition:
    """The windows, drift tests, failure clusters, canary analyses and budgets of the agents
    (and tenants) of one partition; no I/O. The runs a restart relearns are folded in with the
    first message, where a run seen twice counts once."""

    def __init__(self, partition: int, settings: Settings, policy: Policy, state: MetricsState) -> None:
        window_ms = settings.window_seconds * 1000
        idle_timeout_ms = settings.run_idle_timeout_seconds * 1000
        self.partition = partition
        self.partitions = settings.partitions
        self.policy = policy
        self.sent = state.sent
        self.windows = MetricWindows(window_ms, idle_timeout_ms, settings.partitions)
        self.windows.restore(state.window_runs, state.final_before)
        self.rollouts = RolloutController(policy, window_ms, state.sent)
        self.rollouts.deploy(state.deployments)
        self.rollouts.restore(state.versions, state.canaries)
        self.budgets = PeriodBudgets(policy)
        self.budgets.spend_tenants(state.tenant_runs)
        self.drift = DriftDetector(window_ms=window_ms, lateness_ms=settings.allowed_lateness_seconds * 1000,
                                   baseline_version=self.rollouts.rollouts.canary_baseline)
        self.clusters = FailureClusterer(window_ms=window_ms)
        self._history = state.history

    def handle(self, message: RunResult, processed_ts: int, now_ms: int) -> MetricsOutput:
        """Fold one run result in. `processed_ts`: its Kafka timestamp (ms). Blocking (the drift
        tests take milliseconds): the faust agent runs it off its event loop."""
        alerts: list[dict] = []
        rollbacks: list[dict] = []
        tenant_costs: dict[int, TenantCosts] = {}
        out = MetricResults(partition=self.partition, processed_ts=processed_ts)
        runs, self._history = self._history, []
        if isinstance(message, Deployments):
            alerts += self.rollouts.deploy(message.deployments)
        elif isinstance(message, TenantCosts):
            alerts += self.budgets.spend_tenants(message.tenant_runs)
        else:
            out.metrics = self.windows.apply(message.runs, message.partition, message.watermark, now_ms)
            runs += message.runs  # a run in both counts once
        if runs or isinstance(message, ClosedRuns):
            # A window is tested once every upstream partition has passed it, so none of its
            # runs is late here; a message with no runs may be what moves that on.
            drift_rows, drift_alerts = self.drift.update(runs, self.windows.slowest_watermark(now_ms) or -(2 ** 62))
            out.drift = [{**row, "updated_at": now_ms} for row in drift_rows]
            alerts += drift_alerts
        if runs:
            out.failure_clusters, cluster_alerts, assigned = self.clusters.update(runs, now_ms)
            # The run's row again, with its failure cluster: it replaces the plain one.
            out.runs = [{**row, "failure_cluster_id": assigned[row["run_id"]],
                         "version": row_version(row["event_count"], True)}
                        for row in runs if assigned.get(row["run_id"])]
            rollbacks, rollout_alerts, canaries = self.rollouts.update(runs)
            out.canaries = [{**row, "updated_at": now_ms} for row in canaries]
            alerts += cluster_alerts + rollout_alerts + self.budgets.spend_agents(runs)
            if self.policy.tenant_budgets:
                alerts += self._tenant_costs(runs, tenant_costs)
        return MetricsOutput(out, [alert for alert in alerts if alert["alert_id"] not in self.sent], rollbacks,
                             tenant_costs)

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
                outgoing[target] = TenantCosts(items)
        return alerts
