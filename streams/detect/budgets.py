"""Cost budgets (limits from `streams.detect.policy`): a run's envelope, an agent's hour, a tenant's day.
When each is checked and how sums count runs: streams/detect/README.md, "Budgets"."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from streams.contracts.alerts import FIRING, RESOLVED, cleared, fingerprint, make_alert, utc_text
from streams.detect.policy import Policy

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def run_over_envelope(run_id: str, agent_id: str, agent_version: str, cost_usd: float, steps: int,
                      limit: float, ts: int) -> dict | None:
    """The firing `budget` alert of a run whose cost went over its envelope (0: none), or None."""
    if limit <= 0 or cost_usd <= limit:
        return None
    return make_alert(
        kind="budget", severity="critical", status=FIRING, fingerprint=fingerprint("budget", "run", run_id),
        ts=ts, agent_id=agent_id, agent_version=agent_version, run_id=run_id,
        summary=f"run {run_id} of {agent_id} {agent_version} has cost ${cost_usd:.4f}, "
                f"over its envelope of ${limit:.4f}",
        evidence={"scope": "run", "cost_usd": cost_usd, "limit_usd": limit, "steps": steps},
        action="stop_run")


def run_envelope_cleared(firing: dict, cost_usd: float, ts: int) -> dict:
    """The resolved alert of a run's envelope once the run has ended."""
    return make_alert(
        kind="budget", severity=firing["severity"], status=RESOLVED, fingerprint=firing["fingerprint"],
        ts=ts, agent_id=firing["agent_id"], agent_version=firing["agent_version"], run_id=firing["run_id"],
        summary=f"run {firing['run_id']} of {firing['agent_id']} ended at ${cost_usd:.4f}",
        evidence={**firing["evidence"], "cost_usd": cost_usd})


@dataclass(slots=True)
class _Period:
    """The runs of one subject in one hour or day: cost by run_id, and their running sum."""

    runs: dict[str, float] = field(default_factory=dict)
    total: float = 0.0


class PeriodBudgets:
    """The agent-hour and tenant-day sums of one metrics partition, and their alerts.

    A tenant's runs come from every agent, so the caller sends each run's cost to the
    partition of its tenant (`streams.contracts.topics.tenant_partition_key`) and calls
    `spend_tenants` there.
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.hour_costs: dict[tuple[str, int], _Period] = defaultdict(_Period)
        self.tenant_costs: dict[tuple[str, int], _Period] = defaultdict(_Period)
        self.firing: dict[str, dict] = {}  # fingerprint -> its firing alert

    def spend_agents(self, runs: Iterable[Mapping]) -> list[dict]:
        """Per agent per hour, by the event time each run ended."""
        return self._spend_all(runs, "agent_hour", lambda run: run["agent_id"],
                               lambda run: self.policy.budget(run["agent_id"], "agent_hour_usd"))

    def spend_tenants(self, runs: Iterable[Mapping]) -> list[dict]:
        """Per tenant per day, by the event time each run ended."""
        return self._spend_all(runs, "tenant_day", lambda run: run["tenant"],
                               lambda run: self.policy.tenant_day_usd(run["tenant"]))

    def _spend_all(self, runs: Iterable[Mapping], scope: str, subject: Callable[[Mapping], str],
                   limit: Callable[[Mapping], float]) -> list[dict]:
        costs, length = self._period(scope)
        alerts = []
        for run in sorted(runs, key=lambda r: (r["ended_at"], r["run_id"])):
            ended = int(run["ended_at"])
            alerts += self._spend(costs, (subject(run), ended - ended % length), run, limit(run), length, scope)
            alerts += self._clear(scope, ended)
        return alerts

    def _period(self, scope: str) -> tuple[dict, int]:
        return (self.hour_costs, HOUR_MS) if scope == "agent_hour" else (self.tenant_costs, DAY_MS)

    def _clear(self, scope: str, ended: int) -> list[dict]:
        """Resolve budgets of periods that runs now end after; drop sums no run can reach."""
        alerts = []
        for fp, alert in list(self.firing.items()):
            evidence = alert["evidence"]
            if evidence["scope"] == scope and ended >= evidence["period_start"] + evidence["period_ms"] + HOUR_MS:
                alerts.append(cleared(alert, ended))
                del self.firing[fp]
        costs, length = self._period(scope)
        for key in [k for k in costs if k[1] + 2 * length <= ended]:
            del costs[key]
        return alerts

    def _spend(self, costs: dict, key: tuple[str, int], run: Mapping, limit: float, length: int,
               scope: str) -> list[dict]:
        if limit <= 0:  # no budget: nothing to sum
            return []
        period = costs[key]
        cost = float(run.get("cost_usd") or 0.0)
        period.total += cost - period.runs.get(run["run_id"], 0.0)  # a run seen again counts once
        period.runs[run["run_id"]] = cost
        if period.total <= limit:
            return []
        total = period.total = math.fsum(period.runs.values())  # exact once it matters
        fp = fingerprint("budget", scope, *map(str, key))
        if total <= limit or fp in self.firing:
            return []
        subject, start = key
        who = f"tenant {subject}" if scope == "tenant_day" else subject
        unit = "day" if scope == "tenant_day" else "hour"
        alert = make_alert(
            kind="budget", severity="critical" if total >= 2 * limit else "warning", status=FIRING,
            fingerprint=fp, ts=int(run["ended_at"]), agent_id=run["agent_id"] if scope == "agent_hour" else "",
            summary=f"{who} spent ${total:.4f} in the {unit} from {utc_text(start)}, over its budget of ${limit:.4f}",
            evidence={"scope": scope, "subject": subject, "period_start": start, "period_ms": length,
                      "spent_usd": total, "limit_usd": limit, "runs": len(period.runs), "last_run_id": run["run_id"]},
            episode=str(start))
        self.firing[fp] = alert
        return [alert]
