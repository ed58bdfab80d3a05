"""Lifecycle policy: canary analysis, evaluation gates and budgets, per agent and tenant, from one TOML file.
The file's layout: streams/detect/README.md, "Policy"; every key: infra/policy.toml."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from streams.detect.canary import CanaryPolicy
from streams.detect.gate import GatePolicy
from streams.errors import TracksideError

BUDGET_KEYS = ("run_usd", "agent_hour_usd", "tenant_day_usd")
DEFAULT_BUDGET = {"run_usd": 5.0, "agent_hour_usd": 0.0, "tenant_day_usd": 0.0}


class PolicyError(TracksideError):
    pass


@dataclass(frozen=True)
class Policy:
    canary_defaults: Mapping[str, Any] = field(default_factory=dict)
    gate_defaults: Mapping[str, Any] = field(default_factory=dict)
    budget_defaults: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_BUDGET))
    agents: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    tenants: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path | None) -> "Policy":
        """The policy of a TOML file; the defaults when `path` is empty."""
        if not path:
            return cls()
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise PolicyError(f"cannot read the policy file {path}: {error}") from None
        return cls.from_mapping(data, str(path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "policy") -> "Policy":
        unknown = set(data) - {"canary", "gate", "budget", "agents", "tenants"}
        if unknown:
            raise PolicyError(f"{where}: unknown sections {sorted(unknown)}")
        policy = cls(
            canary_defaults=dict(data.get("canary", {})),
            gate_defaults=dict(data.get("gate", {})),
            budget_defaults={**DEFAULT_BUDGET, **_budget(data.get("budget", {}), f"{where} [budget]")},
            agents={agent: dict(spec) for agent, spec in data.get("agents", {}).items()},
            tenants={tenant: dict(spec) for tenant, spec in data.get("tenants", {}).items()},
        )
        # Check every part now, so a bad file fails at start, not at the first canary.
        for agent, spec in policy.agents.items():
            unknown = set(spec) - {"canary", "gate", "budget", "pause_on_rollback"}
            if unknown:
                raise PolicyError(f"{where} [agents.{agent}]: unknown keys {sorted(unknown)}")
            _budget(spec.get("budget", {}), f"{where} [agents.{agent}.budget]")
            if not isinstance(spec.get("pause_on_rollback", True), bool):
                raise PolicyError(f"{where} [agents.{agent}]: pause_on_rollback must be true or false")
            policy.canary(agent)
            policy.gate(agent)
        policy.canary("")
        policy.gate("")
        for tenant, spec in policy.tenants.items():
            if set(spec) - {"day_usd"} or not _is_amount(spec.get("day_usd", 0.0)):
                raise PolicyError(f"{where} [tenants.{tenant}]: only day_usd = a non-negative number is allowed")
        return policy

    def canary(self, agent_id: str) -> CanaryPolicy:
        spec = self.agents.get(agent_id, {}).get("canary", {})
        merged = {**self.canary_defaults, **spec}
        for per_metric in ("margins", "tau"):  # per-metric tables merge key by key
            values = {**self.canary_defaults.get(per_metric, {}), **spec.get(per_metric, {})}
            if values:
                merged[per_metric] = values
        try:
            return CanaryPolicy.from_mapping(merged)
        except (ValueError, TypeError) as error:
            raise PolicyError(f"canary policy of {agent_id or 'every agent'}: {error}") from None

    def gate(self, agent_id: str) -> GatePolicy:
        """The evaluation gate's policy of an agent (`trackside gate`): [gate] merged with
        [agents.NAME.gate], margins key by key."""
        spec = self.agents.get(agent_id, {}).get("gate", {})
        merged = {**self.gate_defaults, **spec}
        margins = {**self.gate_defaults.get("margins", {}), **spec.get("margins", {})}
        if margins:
            merged["margins"] = margins
        try:
            return GatePolicy.from_mapping(merged)
        except (ValueError, TypeError) as error:
            raise PolicyError(f"gate policy of {agent_id or 'every agent'}: {error}") from None

    def pause_on_rollback(self, agent_id: str) -> bool:
        """Whether a rolled-back version of the agent is paused (a pause_version control): yes
        unless the agent's entry says `pause_on_rollback = false`."""
        return bool(self.agents.get(agent_id, {}).get("pause_on_rollback", True))

    def budget(self, agent_id: str, key: str) -> float:
        """A budget limit of an agent in USD (0: none); `key` is one of BUDGET_KEYS."""
        return float(self.agents.get(agent_id, {}).get("budget", {}).get(key, self.budget_defaults[key]))

    @property
    def tenant_budgets(self) -> bool:
        """Whether any tenant has a daily budget (else no tenant costs are summed at all)."""
        return self.budget_defaults["tenant_day_usd"] > 0 or any(
            spec.get("day_usd", 0) > 0 for spec in self.tenants.values())

    def tenant_day_usd(self, tenant: str) -> float:
        return float(self.tenants.get(tenant, {}).get("day_usd", self.budget_defaults["tenant_day_usd"]))


def _is_amount(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def _budget(spec: Mapping[str, Any], where: str) -> dict[str, float]:
    unknown = set(spec) - set(BUDGET_KEYS)
    if unknown:
        raise PolicyError(f"{where}: unknown keys {sorted(unknown)} (known: {', '.join(BUDGET_KEYS)})")
    for key, value in spec.items():
        if not _is_amount(value):
            raise PolicyError(f"{where}: {key} must be a non-negative number of USD, not {value!r}")
    return {key: float(value) for key, value in spec.items()}
