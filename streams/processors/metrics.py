"""One partition of the metrics stage: run results in; window, drift, failure mode and canary rows, alerts,
rollbacks, tenant costs and failed runs for the partition of their failure mode out."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from streams.contracts.messages import Deployments, FailedRuns, MetricResults, RunResult, TenantCosts
from streams.contracts.topics import agent_partition, mode_partition_key, tenant_partition_key
from streams.detect.budgets import PeriodBudgets
from streams.detect.drift import DriftDetector
from streams.detect.failures import FailureClusterer, TrafficCounts, is_failed, mode_key
from streams.detect.governance import GovernanceWatch
from streams.detect.metrics import MetricWindows
from streams.detect.policy import Policy
from streams.detect.rollout import RolloutController
from streams.detect.runs import reemitted_within_ms, row_version
from streams.settings import Settings

@dataclass
class MetricsState:
    """What a metrics partition starts from, read from the store (`streams.processors.recovery`).
    The runs come a page at a time (lists of rows, oldest first), so that a rebuild holds a
    page or two of rows, not hours of them."""

    open_windows: set[tuple[str, str, int]] = field(default_factory=set)  # (agent, version, start ms) not final yet
    window_runs: Iterable[list[dict]] = ()  # their runs that ended before the history's
    final_before: int = 0  # where final windows end
    history: Iterable[list[dict]] = ()  # recent runs the detectors learn again (and the open windows take)
    watermark: int | None = None  # event time every assembler partition had passed (None: unknown)
    # the newest watermark an assembler partition had landed once the history was read (None: unknown)
    landed_watermark: int | None = None
    deployments: list[dict] = field(default_factory=list)
    versions: list[dict] = field(default_factory=list)  # each version's first run (`agent_versions`)
    canaries: list[dict] = field(default_factory=list)  # the canary analyses as they were (`canaries`)
    tenant_runs: list[dict] = field(default_factory=list)  # runs of the partition's tenants, for their budgets
    # the failure modes of the partition's mode keys as stored, their breakdown, their agents'
    # closed runs per window, and their failed runs of the history (pages, oldest first)
    modes: list[dict] = field(default_factory=list)
    mode_agents: list[dict] = field(default_factory=list)
    mode_traffic: dict[str, dict[int, int]] = field(default_factory=dict)
    mode_history: Iterable[list[dict]] = ()
    mode_incidents: list[dict] = field(default_factory=list)  # their incidents still open: alerts as sent
    sent: set[str] = field(default_factory=set)  # ids of alerts and rollbacks already out


@dataclass
class MetricsOutput:
    results: MetricResults  # for the store sink; sent even when empty: it tells the pipeline watch how far this stage is
    alerts: list[dict]  # not sent before
    rollbacks: list[dict]  # not sent before
    tenant_costs: dict[int, TenantCosts]  # metrics partition that owns the tenant -> its message
    failed_runs: dict[int, FailedRuns] = field(default_factory=dict)  # partition of a failure mode key -> its message


@dataclass
class _Found:
    """What folding runs in gave, gathered until it goes out."""

    drift: list[dict] = field(default_factory=list)
    failure_clusters: dict[str, dict] = field(default_factory=dict)  # cluster_id -> its newest row
    failure_cluster_agents: dict[tuple, dict] = field(default_factory=dict)  # (cluster, agent, version) -> newest row
    runs: list[dict] = field(default_factory=list)
    canaries: list[dict] = field(default_factory=list)
    alerts: list[dict] = field(default_factory=list)
    rollbacks: list[dict] = field(default_factory=list)
    tenant_costs: dict[int, TenantCosts] = field(default_factory=dict)
    failed_runs: dict[int, FailedRuns] = field(default_factory=dict)


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
        self.windows = MetricWindows(window_ms, idle_timeout_ms, settings.partitions,
                                     reemit_ms=reemitted_within_ms(settings.allowed_lateness_seconds * 1000))
        self.windows.restore(state.final_before, state.window_runs)
        self.rollouts = RolloutController(policy, window_ms, state.sent)
        self.rollouts.deploy(state.deployments)
        self.rollouts.restore(state.versions, state.canaries)
        self.budgets = PeriodBudgets(policy)
        self.budgets.spend_tenants(state.tenant_runs)
        self.drift = DriftDetector(window_ms=window_ms, lateness_ms=settings.allowed_lateness_seconds * 1000,
                                   baseline_version=self.rollouts.rollouts.canary_baseline)
        # Failure modes span agents: each failed run goes to the partition of its mode key, whose
        # clusterer holds every mode of that key; the runs of this partition's agents are counted
        # here per window (`traffic`) and the counts go along, for the spike tests.
        self.clusters = FailureClusterer(window_ms=window_ms)
        self.clusters.restore(state.modes, state.mode_agents)
        self.clusters.count_traffic(state.mode_traffic)
        self._found = _Found()
        for failed in state.mode_history:
            self._modes(failed, {}, now_ms, emit=False)
        # after the history: its silent replay must not close them (a resolve would go unsent)
        self.clusters.restore_incidents(state.mode_incidents, sent=state.sent)
        self.traffic = TrafficCounts(window_ms)
        self.mode_targets: dict[str, set[int]] = {}  # agent -> partitions its failed runs went to
        self.pending_traffic: dict[int, set[tuple[str, int]]] = {}  # partition -> (agent, window) counts to send
        self.governance = GovernanceWatch(window_ms, lateness_ms=settings.allowed_lateness_seconds * 1000)
        for runs in state.history:
            # One read of the runs for both: those of open windows go back into them.
            if state.open_windows:
                self.windows.restore(state.final_before, [
                    [row for row in runs if self.windows.key_of(row) in state.open_windows]])
            # The history comes in order of ended_at: a window before the last run of a page
            # has all its runs (and is tested if every partition had passed it).
            passed = -(2 ** 62) if state.watermark is None or not runs else min(state.watermark, runs[-1]["ended_at"])
            self._fold(runs, passed, now_ms, test=False)
        self.windows.restore(state.final_before, (), emitted_by=state.landed_watermark)

    def handle(self, message: RunResult, processed_ts: int, now_ms: int) -> MetricsOutput:
        """Fold one run result in. `processed_ts`: its Kafka timestamp (ms). Blocking (the drift
        tests take milliseconds): the faust agent runs it off its event loop."""
        out = MetricResults(partition=self.partition, processed_ts=processed_ts)
        if isinstance(message, Deployments):
            self._found.alerts += self.rollouts.deploy(message.deployments)
        elif isinstance(message, TenantCosts):
            self._found.alerts += self.budgets.spend_tenants(message.tenant_runs)
        elif isinstance(message, FailedRuns):
            self._modes(message.failed_runs, message.traffic, now_ms)
        else:
            out.metrics = self.windows.apply(message.runs, message.partition, message.watermark, now_ms)
            # A window is tested once every upstream partition has passed it, so none of its
            # runs is late here; a message with no runs may be what moves that on.
            self._fold(message.runs, self.windows.slowest_watermark(now_ms) or -(2 ** 62), now_ms, test=True)
        found, self._found = self._found, _Found()
        out.drift, out.failure_clusters, out.failure_cluster_agents, out.runs, out.canaries = (
            found.drift, list(found.failure_clusters.values()), list(found.failure_cluster_agents.values()),
            found.runs, found.canaries)
        return MetricsOutput(out, [alert for alert in found.alerts if alert["alert_id"] not in self.sent],
                             found.rollbacks, found.tenant_costs, found.failed_runs)

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
        self._route_failures(runs, now_ms, send=test)
        rollbacks, rollout_alerts, canaries = self.rollouts.update(runs)
        found.rollbacks += rollbacks
        found.canaries += [{**row, "updated_at": now_ms} for row in canaries]
        found.alerts += rollout_alerts + self.budgets.spend_agents(runs)
        if self.policy.tenant_budgets:
            found.alerts += self._tenant_costs(runs, found.tenant_costs)

    def _route_failures(self, runs: list[dict], now_ms: int, *, send: bool) -> None:
        """Count the runs per agent and window, and hand each failed run to the partition of its
        mode key with the counts (this partition's own, at once). Counts also go, without runs, to
        the partitions an agent's failures went to before, once a window of theirs is over, so
        that a mode's history knows its agents' whole traffic. `send=False` (the history a
        restart reads again): counted only, since every mode partition rebuilds its own runs."""
        touched = self.traffic.add(runs)
        current = self.traffic.window_of(max(row["ended_at"] for row in runs))
        by_target: dict[int, list[dict]] = defaultdict(list)
        for row in runs:
            if is_failed(row):
                key = mode_key(row["outcome"], row.get("error_type") or "", row.get("error_message") or "",
                               bool(row["loop_detected"]))
                target = agent_partition(mode_partition_key(key), self.partitions)
                by_target[target].append(row)
                self.mode_targets.setdefault(row["agent_id"], set()).add(target)
        if not send:
            return
        for target in by_target:  # every agent of the batch: the target may see its failures later
            self.pending_traffic.setdefault(target, set()).update(touched)
        for agent, window in touched:
            for target in self.mode_targets.get(agent, ()):
                self.pending_traffic.setdefault(target, set()).add((agent, window))
        outgoing = self._found.failed_runs
        for target in list(self.pending_traffic):
            pairs = self.pending_traffic[target]
            # counts alone wait until one of their windows is over, then go out once
            if target in by_target or min(window for _, window in pairs) < current:
                message = outgoing.setdefault(target, FailedRuns([]))
                message.failed_runs.extend(by_target.get(target, ()))
                for agent, windows in self.traffic.counts(pairs).items():
                    message.traffic.setdefault(agent, {}).update(windows)
                del self.pending_traffic[target]
        if self.partition in outgoing:
            mine = outgoing.pop(self.partition)
            self._modes(mine.failed_runs, mine.traffic, now_ms)

    def _modes(self, failed: list[dict], traffic: dict, now_ms: int, emit: bool = True) -> None:
        """Failed runs of this partition's mode keys, from any partition: their modes' rows, the
        breakdown, incidents, and each run's row again with its mode (`emit=False`: the history
        a restart reads again, learnt silently)."""
        found = self._found
        out = self.clusters.update_modes(failed, now_ms, traffic=traffic, emit=emit)
        found.failure_clusters.update((row["cluster_id"], row) for row in out.rows)
        found.failure_cluster_agents.update(
            ((row["cluster_id"], row["agent_id"], row["agent_version"]), row) for row in out.breakdown)
        found.alerts += out.alerts
        # The run's row again, with its failure mode: it replaces the plain one (a run read back
        # from the store already has it).
        found.runs += [{**row, "failure_cluster_id": out.assigned[row["run_id"]],
                        "version": row_version(row["event_count"], True)}
                       for row in failed
                       if out.assigned.get(row["run_id"], row["failure_cluster_id"]) != row["failure_cluster_id"]]

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
