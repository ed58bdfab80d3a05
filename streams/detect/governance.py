"""A closed run's governance signals (SPEC §4 `policy_hit`, `approval`) as the canary analysis and
the drift tests read them from its row; rows written before these fields existed read as none."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Decisions of a policy hit, least to most severe. A decision outside these (a hit that carried
# none) ranks below `allowed`: a guardrail was evaluated, what it did is unknown.
DECISIONS = ("allowed", "warned", "redacted", "blocked")
UNKNOWN, NONE = "unknown", "none"
_RANK = {decision: rank for rank, decision in enumerate((UNKNOWN, *DECISIONS), start=1)}
_ONE_COPY = {decision: decision for decision in DECISIONS}  # a key's slice -> the constant
# A guardrail acted on the run: it did something other than let the call through.
ACTED = frozenset(("warned", "redacted", "blocked"))


def guardrail(run: Mapping[str, Any]) -> str:
    """The most severe decision among the run's policy hits (`policy_hits`: "policy:decision" ->
    count, the key split at its last ':'), `unknown` for hits without a known decision, or `none`.

    Always one of the module's constants, so that many runs share one copy of each string.
    """
    hits = run.get("policy_hits")
    if not hits:
        return NONE
    worst, rank = NONE, 0
    for key, count in hits.items() if isinstance(hits, Mapping) else hits:  # a dict, or (key, count) pairs
        if not count:
            continue
        decision = _ONE_COPY.get(str(key).rpartition(":")[2], UNKNOWN)
        if _RANK[decision] > rank:
            worst, rank = decision, _RANK[decision]
    return worst


def guardrail_acted(run: Mapping[str, Any]) -> bool:
    """Whether a guardrail acted on the run: a policy hit warned, redacted or blocked."""
    return guardrail(run) in ACTED


def approval_denied(run: Mapping[str, Any]) -> bool:
    """Whether an approval the run asked for was denied."""
    return bool(run.get("approvals_denied") or 0)
