"""Rollout state and canary decisions per agent (SPEC §5, §6, §7).
Declared and inferred roles, verdicts and rollbacks: streams/detect/README.md, "Rollouts"."""

from __future__ import annotations

import hashlib
import sys
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, NamedTuple

import orjson

from streams.contracts.alerts import FIRING, cleared, fingerprint, make_alert
from streams.detect.canary import CanaryAnalysis, RunFacts, Verdict, run_facts
from streams.detect.policy import Policy

# Recent runs kept per agent, so that a canary known late (roles are inferred once a window has
# settled) still gets both arms' runs that ended after it started: what the analysis counts of
# each (`Recent`, ~0.3 KB), not its row (~2.4 KB).
BACKLOG = 5_000
# Roles inferred from traffic are judged on settled windows (complete, and a whole window
# behind the newest run, so that late runs are in), the last SETTLED_POOL of them pooled: at a
# few runs per window, one window's counts are noise.
SETTLED_POOL = 3
# Another version takes over as the inferred stable one with this many times its pooled runs,
# and at least TAKEOVER_MIN_RUNS of them.
STICKY = 2.0
TAKEOVER_MIN_RUNS = 10
# The roles whose runs are analysed against the stable version. A shadow gets copies of real
# traffic (SPEC §5): its verdict is recorded and a worse one alerts, but it is never rolled back,
# so it is never paused either (the pause follows a rollback decision).
CANARY, SHADOW = "canary", "shadow"
ANALYSED = (CANARY, SHADOW)
# The alert kind of each canary metric; SPEC §6 names the first three. One kind per metric: a
# canary alert's fingerprint is (kind, canary, agent, version), so two metrics of one kind would
# make one alert.
METRIC_KINDS = {
    "success_rate": "success_rate", "cost_per_success": "cost", "tool_error_rate": "error_rate",
    "loop_rate": "loop_rate", "p95_duration": "latency", "guardrail_rate": "guardrail", "denial_rate": "denial",
    "escalation_steps": "escalation",
}


@dataclass
class _Agent:
    deployed: dict[str, dict] = field(default_factory=dict)  # version -> its latest deployment event
    first_seen: dict[str, int] = field(default_factory=dict)  # version -> earliest run start
    windows: dict[int, Counter] = field(default_factory=dict)  # window start -> runs per version
    newest_end: int = 0
    inferred: str | None = None  # the stable version inferred so far (kept unless clearly overtaken)
    # `Rollouts.stable` as last computed, while nothing it reads has changed since (`known`)
    stable: str | None = None
    known: bool = False


class Rollouts:
    """Stable and canary versions per agent, declared or inferred (SPEC §5)."""

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self.agents: dict[str, _Agent] = defaultdict(_Agent)

    def deploy(self, event: Mapping) -> None:
        agent = self.agents[event["agent_id"]]
        known = agent.deployed.get(event["version"])
        if known is None or known["ts"] <= event["ts"]:
            agent.deployed[event["version"]] = dict(event)
            agent.known = False

    def observe(self, run: Mapping) -> None:
        agent = self.agents[run["agent_id"]]
        version, started, ended = run["agent_version"], int(run["started_at"]), int(run["ended_at"])
        if started < agent.first_seen.get(version, started + 1):
            agent.first_seen[version] = started
            agent.known = False
        start = ended - ended % self.window_ms
        agent.windows.setdefault(start, Counter())[version] += 1
        current = agent.newest_end - agent.newest_end % self.window_ms
        agent.newest_end = max(agent.newest_end, ended)
        # what `stable` reads changes only with a settled window's counts or the newest window
        if start < current - self.window_ms or agent.newest_end - agent.newest_end % self.window_ms != current:
            agent.known = False
        for old in [s for s in agent.windows if s < agent.newest_end - (SETTLED_POOL + 2) * self.window_ms]:
            del agent.windows[old]
            agent.known = False

    def restore(self, agent_id: str, version: str, first_started: int) -> None:
        """A version's first run as the store knows it (older than what a restart replays)."""
        agent = self.agents[agent_id]
        agent.first_seen[version] = min(first_started, agent.first_seen.get(version, first_started))
        agent.known = False

    def infer(self, agent_id: str, stable: str) -> None:
        """The inferred stable version as it was before a restart."""
        self.agents[agent_id].inferred = stable
        self.agents[agent_id].known = False

    def declared(self, agent_id: str) -> bool:
        return bool(self.agents[agent_id].deployed)

    def stable(self, agent_id: str) -> str | None:
        """The last known good version: the newest stable deployment, or the inferred one."""
        agent = self.agents[agent_id]
        if not agent.known:  # asked again and again (for every run, by every drift test): kept
            agent.stable, agent.known = self._stable(agent), True
        return agent.stable

    def _stable(self, agent: _Agent) -> str | None:
        stables = [d for d in agent.deployed.values() if d["role"] == "stable"]
        if stables:
            return max(stables, key=lambda d: (d["ts"], d["version"]))["version"]
        current = agent.newest_end - agent.newest_end % self.window_ms
        settled = sorted(start for start in agent.windows if start < current - self.window_ms)[-SETTLED_POOL:]
        if not settled:
            return agent.inferred  # None until a window has settled
        counts = sum((agent.windows[start] for start in settled), Counter())
        leader = max(counts, key=lambda v: (counts[v], -agent.first_seen.get(v, 0)))
        if agent.inferred is None or counts[leader] >= max(TAKEOVER_MIN_RUNS, STICKY * counts[agent.inferred]):
            agent.inferred = leader
        return agent.inferred

    def role(self, agent_id: str, version: str) -> str:
        """`shadow` for a version deployed as one, else `canary` (inferred roles know no shadows)."""
        d = self.agents[agent_id].deployed.get(version)
        return SHADOW if d is not None and d["role"] == SHADOW else CANARY

    def canary_baseline(self, agent_id: str, version: str) -> str | None:
        """The version a canary is compared with (its stable one); None for any other version."""
        return self.stable(agent_id) if self.canary_since(agent_id, version) is not None else None

    def canary_since(self, agent_id: str, version: str) -> int | None:
        """When `version` became a canary or a shadow (event time), or None if it is neither now.
        A shadow is analysed like a canary (SPEC §5); `role` tells them apart."""
        agent = self.agents[agent_id]
        stable = self.stable(agent_id)
        if stable is None or version == stable:
            return None
        if agent.deployed:
            d = agent.deployed.get(version)
            return d["ts"] if d is not None and d["role"] in ANALYSED and d["traffic_pct"] > 0 else None
        first, stable_first = agent.first_seen.get(version), agent.first_seen.get(stable)
        return first if first is not None and stable_first is not None and first > stable_first else None


@dataclass
class _Canary:
    agent_id: str
    version: str
    stable: str
    since: int
    inferred: bool
    analysis: CanaryAnalysis
    newest: int = 0  # newest ended_at of either arm
    changed: bool = True
    verdict: Verdict | None = None
    decided_at: int | None = None
    alerts: list[dict] = field(default_factory=list)  # the firing alerts of a rollback (a shadow's: of its verdict)
    role: str = CANARY  # or SHADOW


class Recent(NamedTuple):
    """A run of an agent's backlog."""

    run_id: str
    agent_version: str
    ended_at: int
    facts: RunFacts


class RolloutController:
    """Canary analyses of the agents of one metrics partition; see streams/detect/README.md, "Rollouts"."""

    def __init__(self, policy: Policy, window_ms: int, sent: Iterable[str] = ()) -> None:
        self.policy = policy
        self.rollouts = Rollouts(window_ms)
        self.canaries: dict[tuple[str, str, str], _Canary] = {}
        self.recent_runs: dict[str, deque] = defaultdict(lambda: deque(maxlen=BACKLOG))
        self.sent = set(sent)  # alert and rollback ids already out (after a restart)

    def restore(self, versions: Iterable[Mapping], canaries: Iterable[Mapping]) -> None:
        """Start where the store says the rollouts were: each version's first run (`agent_versions`)
        and each canary analysis (`canaries`) with the stable version and start it had, so that a
        restart neither moves roles inferred from traffic nor starts an analysis again under
        another id. A pending analysis relearns its runs from the history replayed after this;
        a decided one stays decided."""
        for row in versions:
            self.rollouts.restore(row["agent_id"], row["agent_version"], int(row["first_started_at"]))
        newest: dict[str, Mapping] = {}
        for row in sorted(canaries, key=lambda r: r["updated_at"]):
            canary = self.canaries[(row["agent_id"], row["version"], row["stable_version"])] = _Canary(
                row["agent_id"], row["version"], row["stable_version"], int(row["since"]), bool(row["inferred"]),
                CanaryAnalysis(self.policy.canary(row["agent_id"])), changed=False, role=row.get("role") or CANARY)
            if row["decision"] != "pending":
                canary.decided_at = int(row["decided_at"])
            if row["inferred"]:
                newest[row["agent_id"]] = row
        for agent_id, row in newest.items():
            self.rollouts.infer(agent_id, row["stable_version"])

    # --- inputs --------------------------------------------------------------------------

    def deploy(self, deployments: Iterable[Mapping]) -> list[dict]:
        """Apply deployment events; returns alerts resolved because a canary left."""
        events = sorted(deployments, key=lambda d: d["ts"])
        if not events:
            return []
        for event in events:
            self.rollouts.deploy(event)
        alerts = []
        for canary in self.canaries.values():
            if canary.alerts and self.rollouts.canary_since(canary.agent_id, canary.version) != canary.since:
                # rolled back (or promoted) by the deploy tooling: the condition is gone
                alerts += [cleared(alert, events[-1]["ts"]) for alert in canary.alerts]
                canary.alerts = []
        return self._fresh(alerts)

    def update(self, runs: Iterable[Mapping]) -> tuple[list[dict], list[dict], list[dict]]:
        """Fold closed runs in: (rollback decisions, alerts, `canaries` rows that changed)."""
        alerts: list[dict] = []
        for run in sorted(runs, key=lambda r: (r["ended_at"], r["run_id"])):
            self.rollouts.observe(run)
            self._route(run)
        rollbacks, rows = [], []
        for canary in self.canaries.values():
            if not canary.changed:
                continue
            canary.changed = False
            if canary.decided_at is None:
                verdict = canary.analysis.decide()
                canary.verdict = verdict
                if verdict.decision != "pending":
                    canary.decided_at = canary.newest
                    if verdict.decision == "rollback" and canary.role == SHADOW:
                        alerts += self._alerts(canary, verdict)  # judged worse, never rolled back
                    elif verdict.decision == "rollback":
                        decision, fired = self._rollback(canary, verdict)
                        alerts += fired
                        rollbacks.append(decision)
            rows.append(self._row(canary))
        return [r for r in rollbacks if r["rollback_id"] not in self.sent], self._fresh(alerts), rows

    # --- canaries ------------------------------------------------------------------------

    def _route(self, run: Mapping) -> None:
        agent_id, version, ended = run["agent_id"], run["agent_version"], int(run["ended_at"])
        recent = Recent(run["run_id"], sys.intern(version), ended, run_facts(run))
        stable = self.rollouts.stable(agent_id)
        since = self.rollouts.canary_since(agent_id, version)
        if since is not None and ended >= since:
            key = (agent_id, version, stable)
            canary = self.canaries.get(key)
            role = self.rollouts.role(agent_id, version)
            # A shadow deployed as a canary next starts an analysis of its own: its verdict as a
            # shadow (never acted on) must not decide the canary's (it replaces the shadow's row).
            if canary is None or canary.role != role:
                canary = self.canaries[key] = _Canary(
                    agent_id, version, stable, since, not self.rollouts.declared(agent_id),
                    CanaryAnalysis(self.policy.canary(agent_id)), role=role)
                for arm, arm_version in (("stable", stable), ("canary", version)):
                    backlog = [(r.run_id, r.facts) for r in self.recent_runs[agent_id]
                               if r.agent_version == arm_version and r.ended_at >= since]
                    if backlog:
                        canary.analysis.add_facts(arm, backlog)
            self._add(canary, "canary", recent)
        elif version == stable:
            for canary in self.canaries.values():
                if canary.agent_id == agent_id and canary.stable == version and ended >= canary.since:
                    self._add(canary, "stable", recent)
        self.recent_runs[agent_id].append(recent)

    @staticmethod
    def _add(canary: _Canary, arm: str, run: Recent) -> None:
        if canary.decided_at is not None:
            return
        canary.analysis.add_facts(arm, [(run.run_id, run.facts)])
        canary.newest = max(canary.newest, run.ended_at)
        canary.changed = True

    @staticmethod
    def _alerts(canary: _Canary, verdict: Verdict) -> list[dict]:
        """One firing alert per metric shown worse: critical, asking for the rollback, for a
        canary; a warning that asks for nothing, for a shadow (its own fingerprints, so that the
        same version as a canary later has alerts of its own)."""
        shadow = canary.role == SHADOW
        alerts = []
        for metric in verdict.metrics:
            if not metric.worse:
                continue
            kind = METRIC_KINDS.get(metric.metric, metric.metric)
            alerts.append(make_alert(
                kind=kind, severity="warning" if shadow else "critical", status=FIRING,
                fingerprint=fingerprint(kind, canary.role, canary.agent_id, canary.version),
                ts=canary.decided_at, agent_id=canary.agent_id, agent_version=canary.version,
                summary=f"{canary.role} {canary.agent_id} {canary.version} worse than {canary.stable}: "
                        f"{_describe(metric)} after {verdict.canary_runs} {canary.role} runs"
                        + (" (a shadow: not rolled back)" if shadow else ""),
                evidence={**metric.as_dict(), "stable_version": canary.stable, "since": canary.since,
                          "role": canary.role},
                action="" if shadow else "rollback", episode=str(canary.since)))
        canary.alerts = alerts
        return alerts

    def _rollback(self, canary: _Canary, verdict: Verdict) -> tuple[dict, list[dict]]:
        episode = str(canary.since)
        alerts = self._alerts(canary, verdict)
        decision = {
            "rollback_id": hashlib.sha1(f"{canary.agent_id}|{canary.version}|{episode}".encode()).hexdigest()[:32],
            "ts": canary.decided_at, "agent_id": canary.agent_id, "from_version": canary.version,
            "to_version": canary.stable, "reason": verdict.reason, "alert_ids": [a["alert_id"] for a in alerts],
            "evidence": {**verdict.as_dict(), "since": canary.since, "inferred_roles": canary.inferred},
        }
        return decision, alerts

    def _row(self, canary: _Canary) -> dict:
        verdict = canary.verdict
        return {
            "agent_id": canary.agent_id, "version": canary.version, "stable_version": canary.stable,
            "since": canary.since, "inferred": canary.inferred, "role": canary.role,
            "decision": verdict.decision if verdict else "pending", "decided_at": canary.decided_at,
            "canary_runs": verdict.canary_runs if verdict else 0, "stable_runs": verdict.stable_runs if verdict else 0,
            "reason": verdict.reason if verdict else "",
            "evidence": orjson.dumps(verdict.as_dict() if verdict else {}).decode(),
        }

    # --- helpers ---------------------------------------------------------------------------

    def _fresh(self, alerts: list[dict]) -> list[dict]:
        return [a for a in alerts if a["alert_id"] not in self.sent]


def _describe(metric: Any) -> str:
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4g}"
    return (f"{metric.metric} {fmt(metric.stable)} -> {fmt(metric.canary)} "
            f"(always-valid p={metric.p_value:.1e} < {metric.threshold:.1e})")

