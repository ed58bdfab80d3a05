"""Governance signals of closed runs (SPEC §4 `policy_hit`, `approval`, `run_end` escalated): how the
canary analysis, the drift tests and the windows read them from a run's row (rows written before
these fields existed read as none), and their spikes per agent version against its own baseline:
runs where a guardrail acted (`policy` alerts) and runs that ended escalated (`escalation` alerts)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterable

from streams.contracts.alerts import FIRING, RESOLVED, fingerprint, make_alert, utc_text

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


# --- spikes ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signal:
    kind: str  # the alert's
    metric: str  # the `agent_metrics` column it is the rate of
    what: str  # in a summary: "<share> of runs <what>"


POLICY = Signal("policy", "guardrail_rate", "tripped a guardrail")
ESCALATION = Signal("escalation", "escalation_rate", "escalated")
SIGNALS = (POLICY, ESCALATION)


def _flags(run: Mapping) -> int:
    """The run's signals as bits: bit i set when it counts for SIGNALS[i] (a small int: one shared copy)."""
    return guardrail_acted(run) | (run.get("outcome") == "escalated") << 1


def hypergeometric_sf(x: int, n: int, b: int, m: int) -> float:
    """One-sided Fisher exact p-value: P(X >= x) for X the flagged runs among the window's n when
    the x + b flagged runs of n + m are spread at random over the window and its baseline of m."""
    from scipy.stats import hypergeom  # here: the assembler's process never tests a window

    return float(hypergeom.sf(x - 1, n + m, x + b, n))


@dataclass(slots=True)
class _Window:
    """A window holds its runs for window + lateness of event time (minutes), so it keeps little a
    run: hash(run_id) -> its flags, and the guardrail hits ("policy:decision" -> count) of the
    runs that had any. A run landing again (with more events) replaces its first row."""

    start: int
    runs: dict[int, int] = field(default_factory=dict)
    hits: dict[int, Mapping[str, int]] = field(default_factory=dict)

    def add(self, run: Mapping) -> None:
        key = hash(run["run_id"])
        self.runs[key] = _flags(run)
        if hits := run.get("policy_hits"):
            self.hits[key] = hits
        else:
            self.hits.pop(key, None)

    def flagged(self, signal: int) -> int:
        return sum(flags >> signal & 1 for flags in self.runs.values())


@dataclass(slots=True)
class _Tested:
    start: int
    runs: int
    flagged: tuple[int, int]  # per signal
    spiking: tuple[bool, bool]  # per signal: kept out of that signal's baseline


@dataclass(slots=True)
class _Series:
    open: dict[int, _Window] = field(default_factory=dict)
    tested: list[_Tested] = field(default_factory=list)  # oldest first, at most baseline_windows
    firing: list[str] = field(default_factory=lambda: ["", ""])  # per signal: the episode, "" when not firing
    clean: list[int] = field(default_factory=lambda: [0, 0])  # per signal: clean windows in a row while firing
    severity: list[str] = field(default_factory=lambda: ["warning", "warning"])  # per signal: of its firing alert


class GovernanceWatch:
    """Per agent version, each event-time window of `window_ms` (by `ended_at`) is tested once the
    upstream watermark passes its end plus `lateness_ms`: the share of its runs where a guardrail
    acted, and the share that escalated, against the same version's last `baseline_windows` tested
    windows (those that did not spike themselves), with a one-sided Fisher exact test.

    A spike needs `min_runs` runs in the window and `min_flagged` flagged ones, a baseline of
    `min_baseline_runs`, a rate at least `min_lift` times the baseline's (smoothed: (b + 1) / (m + 2),
    so a clean baseline is not a rate of zero) and p <= `alpha`. One test per window and signal:
    a version's false alarms are at most `alpha` per window and signal. A fleet of 10 versions has
    5,760 such tests a day with 5-minute windows: at 1e-3, 2 alerts in 2,000 tests of steady
    traffic (measured, `tests/unit/test_governance.py`), a few false pages a day; at the default
    1e-5 one in ~17 days, while a guardrail rate of 3% going to 20% of 100 runs has p ~ 7e-10.
    It fires once (warning; critical at
    `critical_lift`) and resolves after `persistence` tested windows in a row without a spike (p >
    `clear_alpha`). Runs that arrive for a tested window are counted in `late_runs` and dropped.
    """

    def __init__(self, window_ms: int = 300_000, lateness_ms: int = 120_000, *, alpha: float = 1e-5,
                 clear_alpha: float = 0.05, min_runs: int = 20, min_flagged: int = 5, min_lift: float = 2.0,
                 critical_lift: float = 3.0, baseline_windows: int = 12, min_baseline_runs: int = 100,
                 persistence: int = 2) -> None:
        self.window_ms = window_ms
        self.lateness_ms = lateness_ms
        self.alpha = alpha
        self.clear_alpha = clear_alpha
        self.min_runs = min_runs
        self.min_flagged = min_flagged
        self.min_lift = min_lift
        self.critical_lift = critical_lift
        self.baseline_windows = baseline_windows
        self.min_baseline_runs = min_baseline_runs
        self.persistence = persistence
        self.series: dict[tuple[str, str], _Series] = {}
        self.late_runs = 0

    def update(self, runs: Iterable[Mapping], passed: int) -> list[dict]:
        """Fold closed runs in; test the windows `passed` (event time every upstream partition has
        passed) has left behind. Returns the alerts that fired or resolved."""
        for run in runs:
            series = self.series.setdefault((run["agent_id"], run["agent_version"]), _Series())
            start = run["ended_at"] - run["ended_at"] % self.window_ms
            if series.tested and start <= series.tested[-1].start:
                self.late_runs += 1
                continue
            window = series.open.get(start)
            if window is None:
                window = series.open[start] = _Window(start)
            window.add(run)
        alerts = []
        for key, series in self.series.items():
            for start in sorted(series.open):
                if start + self.window_ms + self.lateness_ms > passed:
                    break
                alerts += self._test(key, series, series.open.pop(start))
        return alerts

    def _test(self, key: tuple[str, str], series: _Series, window: _Window) -> list[dict]:
        n = len(window.runs)
        flagged = tuple(window.flagged(i) for i in range(len(SIGNALS)))
        spiking = [False] * len(SIGNALS)
        alerts = []
        for i, signal in enumerate(SIGNALS):
            baseline = [t for t in series.tested if not t.spiking[i]]
            m, b = sum(t.runs for t in baseline), sum(t.flagged[i] for t in baseline)
            x = flagged[i]
            if n < self.min_runs or m < self.min_baseline_runs:
                continue  # neither a spike nor a clean window: too few runs to tell
            rate, base = x / n, (b + 1) / (m + 2)
            p = hypergeometric_sf(x, n, b, m) if x else 1.0
            spiking[i] = x >= self.min_flagged and rate >= self.min_lift * base and p <= self.alpha
            evidence = {
                "metric": signal.metric, "value": rate, "baseline": b / m, "threshold": self.alpha, "p_value": p,
                "test": "fisher_exact_one_sided", "window": window.start, "window_end": window.start + self.window_ms,
                "runs": n, "flagged_runs": x, "baseline_runs": m, "baseline_flagged_runs": b,
                "baseline_windows": len(baseline), "min_lift": self.min_lift,
            }
            if signal is POLICY:
                hits = Counter()
                for policy_hits in window.hits.values():
                    hits.update(policy_hits)
                evidence["policy_hits"] = dict(hits.most_common(10))
            alerts += self._advance(key, series, i, signal, spiking[i], p, rate / base, evidence)
        series.tested.append(_Tested(window.start, n, flagged, tuple(spiking)))
        del series.tested[:-self.baseline_windows]
        return alerts

    def _advance(self, key: tuple[str, str], series: _Series, i: int, signal: Signal, spiking: bool, p: float,
                 lift: float, evidence: dict) -> list[dict]:
        agent, version = key
        share = f"{evidence['value']:.1%} of {evidence['runs']} runs {signal.what}"
        since = f"in the window from {utc_text(evidence['window'])}"
        base = f"{evidence['baseline']:.1%} over its last {evidence['baseline_runs']} runs"
        if spiking:
            series.clean[i] = 0
            if series.firing[i]:
                return []
            series.firing[i] = str(evidence["window"])
            top = ""
            if signal is POLICY and evidence["policy_hits"]:
                top = "; most hits: " + ", ".join(f"{name} x{count}" for name, count in
                                                  list(evidence["policy_hits"].items())[:3])
            series.severity[i] = "critical" if lift >= self.critical_lift else "warning"
            return [self._alert(signal, FIRING, series.severity[i], key, series.firing[i], evidence,
                                f"{agent} {version}: {share} {since} (p={p:.2g}), against {base}{top}")]
        if not series.firing[i] or p <= self.clear_alpha:
            return []
        series.clean[i] += 1
        if series.clean[i] < self.persistence:
            return []
        episode, series.firing[i], series.clean[i] = series.firing[i], "", 0
        return [self._alert(signal, RESOLVED, series.severity[i], key, episode, evidence,
                            f"{agent} {version}: {signal.kind} back in line for {self.persistence} windows "
                            f"({share} {since}, against {base})")]

    def _alert(self, signal: Signal, status: str, severity: str, key: tuple[str, str], episode: str,
               evidence: dict, summary: str) -> dict:
        return make_alert(kind=signal.kind, severity=severity, status=status, fingerprint=fingerprint(signal.kind, *key),
                          ts=evidence["window_end"], agent_id=key[0], agent_version=key[1], summary=summary,
                          evidence={**evidence, "episode": episode}, episode=episode)

