"""Sequential canary analysis: a canary version against its stable version, rollback / promote / pending
after every batch of runs, with always-valid (mixture SPRT) tests: streams/detect/README.md, "Canary analysis"."""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

from streams.detect.estimators import quantile
from streams.detect.governance import approval_denied, guardrail_acted

METRICS = ("success_rate", "cost_per_success", "loop_rate", "tool_error_rate", "p95_duration", "guardrail_rate",
           "denial_rate", "escalation_steps")
ARMS = ("stable", "canary")

# Tolerated degradation per metric: absolute for the rates, relative for cost per success, p95
# duration and escalation steps. A canary within these is as good as stable for a rollout's
# purposes; they are also what promotion must prove, so a smaller margin costs many more runs to
# promote.
DEFAULT_MARGINS: Mapping[str, float] = MappingProxyType({
    "success_rate": 0.03,  # 3 points of task success, about a fifth of the failures of an 85% agent
    "cost_per_success": 0.15,  # +15% cost per successful task
    "loop_rate": 0.02,  # 2 more runs in 100 caught in a loop (the simulated fleet loops ~3%)
    "tool_error_rate": 0.03,  # 3 more failed tool calls in 100
    "p95_duration": 0.20,  # +20% on the slow tail
    # governance (SPEC §4 policy_hit, approval), from each run's row; 0 in both arms without them
    "guardrail_rate": 0.02,  # 2 more runs in 100 where a guardrail warned, redacted or blocked
    "denial_rate": 0.02,  # 2 more runs in 100 with an approval denied
    "escalation_steps": 0.25,  # escalating after +25% steps (the median escalation, ~1-2 steps at 4-8)
})

# Scale τ of the mixing distribution, on each metric's test scale (absolute rate, log ratio of
# cost per success, excess share of slow runs for p95, of late escalations for escalation steps).
# Λ rises fastest for degradations beyond the margin of about τ, so τ is set to the excess that
# should stop a canary within a few dozen runs: 20 points of success, +35% cost (log 1.35 ≈ 0.3),
# 5 points of loops, tool errors, guardrail actions or denials, 10 points more runs beyond the
# slow threshold, 20 points more escalated runs beyond the late threshold (a share near 1/2, so
# a few dozen escalations resolve about that much). The mixture is forgiving, and τ never affects
# validity: for the success rate of the simulated support-bot, a 0.85 -> 0.5 canary is rolled
# back after a median (p95) of 63 (113) canary runs with τ = 0.1, 49 (103) with 0.2 and 47 (103)
# with 0.3 (300 seeds each; at α/5, before the governance metrics), while at 1,000 runs the
# boundary is 6.0, 6.2 and 6.4 points beyond the margin: a larger τ is quicker on gross
# regressions and slightly slower on subtle ones.
DEFAULT_TAU: Mapping[str, float] = MappingProxyType({
    "success_rate": 0.20,
    "cost_per_success": 0.30,
    "loop_rate": 0.05,
    "tool_error_rate": 0.05,
    "p95_duration": 0.10,
    "guardrail_rate": 0.05,
    "denial_rate": 0.05,
    "escalation_steps": 0.20,
})

P95 = 0.95
MEDIAN = 0.5


# --- always-valid inference ---------------------------------------------------------------------


def log_mixture_lr(excess: float, variance: float, tau2: float) -> float:
    """log Λ of the one-sided (half-normal, scale² `tau2`) mixture SPRT for an estimate `excess`
    = θ̂ - δ beyond the null's boundary, with variance `variance` (both > 0)."""
    from scipy.special import log_ndtr  # here: every process reads the policy (CanaryPolicy) at start

    total = variance + tau2
    return (math.log(2.0) + 0.5 * math.log(variance / total)
            + tau2 * excess * excess / (2.0 * variance * total)
            + float(log_ndtr(excess * math.sqrt(tau2 / (variance * total)))))


def mixture_p_value(excess: float, variance: float, tau2: float) -> float:
    """min(1, 1/Λ): a p-value whose running minimum over any monitoring schedule stays valid."""
    if excess <= 0.0:  # Λ <= sqrt(V / (V + τ²)) < 1 there
        return 1.0
    return min(1.0, math.exp(-log_mixture_lr(excess, variance, tau2)))


def confidence_radius(variance: float, tau2: float, alpha: float) -> float:
    """The r > 0 with Λ(r) = 1/α: θ̂ + r is an always-valid level-(1 - α) upper bound of θ.

    The root is bracketed in closed form by bounding the Φ(.) factor of Λ between 1/2 and 1.
    """
    from scipy.optimize import brentq  # here: every process reads the policy (CanaryPolicy) at start

    target = -math.log(alpha)
    total = variance + tau2
    curvature = tau2 / (2.0 * variance * total)
    shrink = 0.5 * math.log(variance / total)
    low = math.sqrt(max(0.0, target - math.log(2.0) - shrink) / curvature)
    high = math.sqrt((target - shrink) / curvature)
    if high - low <= 1e-12 * high:
        return high
    return brentq(lambda r: log_mixture_lr(r, variance, tau2) - target, low, high, xtol=1e-12 * high)


# --- estimators --------------------------------------------------------------------------------------


def proportion_variance(count: float, n: int) -> float:
    """Variance of a proportion count/n, evaluated at (count + 1) / (n + 2).

    The pseudo-counts (Agresti-Coull style) keep an arm that has seen no loops, or only
    successes, from claiming a variance of zero; they move the variance only, not the estimate,
    so the arm with fewer runs is not pushed towards 1/2 (which would fake a degradation of a
    small-n canary's loop rate).
    """
    p = (count + 1) / (n + 2)
    return p * (1.0 - p) / n


def log_ratio_variance(n: int, num: float, num_sq: float, den: float, cross: float, den_sq: float) -> float:
    """Delta-method variance of log(Σx / Σy) over n iid runs, from the sums of x, x², y, xy, y².

    log(x̄/ȳ) ≈ log(μx/μy) + mean(x/μx - y/μy), so its variance is that of the per-run
    a = x/x̄ - y/ȳ (mean 0) divided by n. For cost per success x is a run's cost and y its
    success indicator (y² = y); correlation of cost with success enters through Σxy.
    """
    mx, my = num / n, den / n
    sum_a2 = num_sq / mx ** 2 - 2.0 * cross / (mx * my) + den_sq / my ** 2
    return max(sum_a2, 0.0) / (n * (n - 1))


def ratio_variance(n: int, num: float, num_sq: float, den: float, cross: float, den_sq: float) -> float:
    """Variance of the pooled ratio r = ΣE / ΣT over n runs, clustered by run (delta method).

    Per run the residual is e = E - r T; Var(r) ≈ n/(n-1) Σe² / (ΣT)². This is the variance of
    tool errors per tool call when one run's calls are not independent (a flaky upstream fails
    several calls of the same run). It is floored by the binomial variance at the pseudo-count
    rate (E + 1)/(T + 2), which binds only while an arm has seen almost no errors (all
    residuals 0); on the simulated fleet the clustered variance is ~1.6x the binomial one.
    """
    r = num / den
    sum_e2 = num_sq - 2.0 * r * cross + r * r * den_sq
    clustered = n / (n - 1) * max(sum_e2, 0.0) / den ** 2
    return max(clustered, proportion_variance(int(num), int(den)))


# --- policy ------------------------------------------------------------------------------------------


def _frozen(name: str, values: Mapping[str, Any], defaults: Mapping[str, float]) -> Mapping[str, float]:
    if not isinstance(values, Mapping):
        raise ValueError(f"{name} must be a mapping of metric to number, not {values!r}")
    unknown = sorted(set(values) - set(METRICS))
    if unknown:
        raise ValueError(f"{name}: unknown metrics {unknown} (known: {', '.join(METRICS)})")
    merged = {**defaults, **values}
    for metric, value in merged.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}.{metric} must be a number, not {value!r}")
    return MappingProxyType({m: float(merged[m]) for m in METRICS})


@dataclass(frozen=True)
class CanaryPolicy:
    """When a canary is judged, how sure the judgement must be, and what it may cost.

    min_runs: no verdict before this many canary runs; a metric is also tested only once the
        stable arm has as many. Below ~20 runs the normal approximation of a rate near 0.85 and
        the plug-in variances are unreliable, and even a very bad canary (0.85 -> 0.5 success,
        x2 cost) needs ~20-50 runs to cross its boundary at α/k, so waiting costs little.
    min_successes: cost_per_success is tested only once each arm has this many successes: the
        delta method needs the ratio's denominator well away from 0 (its coefficient of
        variation <= ~0.3).
    min_escalations: escalation_steps is tested only once each arm has this many escalated runs:
        it compares shares of escalated runs (a proportion near 1/2), whose normal approximation
        holds from about ten on. Until then it neither rolls back nor holds back a promotion on
        evidence: a canary that hardly escalates cannot escalate late often, and an agent that
        never escalates would otherwise never be promoted before max_runs.
    promote_after: no promotion on evidence before this many canary runs. Showing a canary as
        good as stable to be within the default margins takes, on the simulated support-bot
        (79% success, 3% loops, a 30% canary), ~400 canary runs for cost and p95, ~1,000 for
        tool errors, ~1,600 for loops and ~4,700 for the success rate, so this only guards the
        small-sample regime; with the defaults, promotion in practice comes from max_runs.
    max_runs: promote a canary that reached this many runs without a rollback. This is the
        real power limit: at 1,000 canary runs (~2,300 stable at a 30% canary) the rollback
        boundary of the success rate sits ~6 points beyond its margin and that of cost per
        success at ~+26%, so drops of >= ~12 points or cost >= ~+45% are rolled back with
        high probability, a 9.5-point drop about half the time (47% of 300 seeds in
        `jobs.evaluate_canary` with the eight default metrics at α/8; 55% with the five before
        the governance ones, at α/5), and smaller degradations beyond the margin are usually
        promoted. At a few runs a minute, a 30% canary reaches 1,000 runs in about half a day;
        a larger max_runs buys power slowly (the boundary shrinks ~1/sqrt(n)).
    alpha: total false-rollback rate over the metrics of `rollback_on` (Bonferroni, α/k each),
        under continuous monitoring. 0.01: a rollback pages people and reverts a release.
    margins: tolerated degradation per metric (see DEFAULT_MARGINS); a partial mapping is
        merged over the defaults.
    tau: mixing scale per metric on its test scale (see DEFAULT_TAU); partial, merged.
    rollback_on: metrics whose degradation rolls the canary back and that must be shown no
        worse to promote on evidence; the others are computed and reported only.
    """

    min_runs: int = 20
    promote_after: int = 200
    max_runs: int = 1000
    alpha: float = 0.01
    margins: Mapping[str, float] = field(default_factory=lambda: DEFAULT_MARGINS)
    rollback_on: tuple[str, ...] = METRICS
    tau: Mapping[str, float] = field(default_factory=lambda: DEFAULT_TAU)
    min_successes: int = 10
    min_escalations: int = 10

    def __post_init__(self) -> None:
        for name in ("min_runs", "promote_after", "max_runs", "min_successes", "min_escalations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, not {value!r}")
        if self.min_runs < 2:
            raise ValueError(f"min_runs must be >= 2 (a variance needs two runs), not {self.min_runs}")
        if not self.min_runs <= self.promote_after <= self.max_runs:
            raise ValueError(f"need min_runs <= promote_after <= max_runs, got {self.min_runs}, "
                             f"{self.promote_after}, {self.max_runs}")
        for name in ("min_successes", "min_escalations"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2, not {getattr(self, name)}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be a number in (0, 0.5), not {self.alpha!r}")
        margins = _frozen("margins", self.margins, DEFAULT_MARGINS)
        if any(v < 0 for v in margins.values()):
            raise ValueError(f"margins must be >= 0: {dict(margins)}")
        tau = _frozen("tau", self.tau, DEFAULT_TAU)
        if any(v <= 0 for v in tau.values()):
            raise ValueError(f"tau must be > 0: {dict(tau)}")
        rollback_on = (self.rollback_on,) if isinstance(self.rollback_on, str) else tuple(self.rollback_on)
        unknown = sorted(set(rollback_on) - set(METRICS))
        if unknown or not rollback_on:
            raise ValueError(f"rollback_on must name one or more of {', '.join(METRICS)}; got {list(rollback_on)}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "margins", margins)
        object.__setattr__(self, "tau", tau)
        object.__setattr__(self, "rollback_on", tuple(m for m in METRICS if m in rollback_on))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> CanaryPolicy:
        """A policy from a parsed YAML/JSON/TOML mapping: missing keys take their defaults,
        unknown keys (or metrics) raise ValueError naming them."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown canary policy keys {unknown} (known: {', '.join(known)})")
        return cls(**dict(data))

    @property
    def metric_alpha(self) -> float:
        """α of each metric's test: α / len(rollback_on)."""
        return self.alpha / len(self.rollback_on)


# --- results -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricResult:
    """One metric of both arms and its sequential test.

    stable, canary: the metric per arm (p95_duration in ms, escalation_steps the median steps of
    the escalated runs). difference: canary minus stable, absolute for the rates, relative
    (canary/stable - 1) for cost_per_success, p95_duration and escalation_steps. n_stable,
    n_canary: runs of each arm (escalation_steps uses their escalated ones).
    The test runs on the degradation θ (positive = worse): stable - canary success rate,
    log(canary/stable) cost per success, canary - stable loop, tool error, guardrail and denial
    rates, for p95_duration the share of canary runs slower than (1 + margin) x the stable p95
    minus the stable share above its own p95, and for escalation_steps the same with escalated
    runs' steps and the median (so the margin is built into the threshold, 0 on this
    scale). statistic: z = (θ̂ - δ) / sqrt(V). p_value: always-valid p, the running minimum of
    1/Λ. threshold: α of this metric. worse: p_value <= threshold. margin: the tolerated
    degradation as configured (relative for cost, p95 and escalation steps). upper_excess:
    always-valid upper confidence bound of θ - δ at level 1 - threshold (< 0: shown no worse).
    Test fields are None until both arms have enough runs (and successes, for cost; escalated
    runs, for escalation steps).
    """

    metric: str
    stable: float | None
    canary: float | None
    n_stable: int
    n_canary: int
    difference: float | None
    statistic: float | None
    p_value: float | None
    threshold: float
    worse: bool
    margin: float
    upper_excess: float | None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Verdict:
    """What to do with the canary now, with the evidence of every metric."""

    decision: str
    canary_runs: int
    stable_runs: int
    metrics: tuple[MetricResult, ...]
    reason: str

    def as_dict(self) -> dict:
        return {"decision": self.decision, "canary_runs": self.canary_runs, "stable_runs": self.stable_runs,
                "reason": self.reason, "metrics": [m.as_dict() for m in self.metrics]}


# --- state -------------------------------------------------------------------------------------------


class RunFacts(NamedTuple):
    """What the analysis counts of one run (`run_facts`)."""

    success: int
    cost: float
    loop: int
    tool_calls: int
    tool_errors: int
    duration: int
    guardrail: int  # a guardrail acted (warned, redacted, blocked)
    denied: int  # an approval was denied
    escalation: int  # steps before escalating; -1: not escalated


def run_facts(row: Mapping[str, Any]) -> RunFacts:
    """What the analysis counts of a run (a row of the runs table)."""
    try:
        outcome, duration = row["outcome"], row["duration_ms"]
    except KeyError as missing:
        raise ValueError(f"run {row.get('run_id')!r} has no {missing.args[0]}") from None
    return RunFacts(int(outcome == "success"), float(row.get("cost_usd") or 0.0), int(bool(row.get("loop_detected"))),
                    int(row.get("tool_calls") or 0), int(row.get("tool_errors") or 0), int(duration),
                    int(guardrail_acted(row)), int(approval_denied(row)),
                    int(row.get("steps") or 0) if outcome == "escalated" else -1)


def _facts(row: Mapping[str, Any]) -> tuple[str, RunFacts]:
    run_id = row.get("run_id")
    if not run_id:
        raise ValueError("a run needs a run_id")
    return run_id, run_facts(row)


class _Arm:
    """One arm's runs by run_id (so a redelivered run replaces itself), their running sums, and
    its durations and escalated runs' steps kept sorted.

    The sums are the sufficient statistics of every metric but p95 and escalation steps; those
    tests need the exact order statistics of both arms (the stable p95, and how many canary runs
    exceed a multiple of it, which moves with every stable run), so durations are kept whole, as
    a sorted list: a few thousand ints per canary, bounded in practice by max_runs and the
    traffic split. A reservoir would add sampling noise the variance does not account for.
    """

    def __init__(self) -> None:
        self.runs: dict[str, RunFacts] = {}
        self.durations: list[int] = []
        self.escalations: list[int] = []  # steps of the escalated runs
        self.successes = self.loops = self.guardrails = self.denials = 0
        self.cost = self.cost_sq = self.cost_success = 0.0
        self.calls = self.calls_sq = self.errors = self.errors_sq = self.errors_calls = 0

    @property
    def n(self) -> int:
        return len(self.runs)

    def add(self, run_id: str, run: RunFacts) -> None:
        self.runs[run_id] = run
        bisect.insort(self.durations, run.duration)
        if run.escalation >= 0:
            bisect.insort(self.escalations, run.escalation)
        self._count(run, 1)

    def remove(self, run_id: str) -> None:
        run = self.runs.pop(run_id)
        del self.durations[bisect.bisect_left(self.durations, run.duration)]
        if run.escalation >= 0:
            del self.escalations[bisect.bisect_left(self.escalations, run.escalation)]
        self._count(run, -1)
        # Subtracting a float back out can cancel catastrophically (a cost that was wrong by
        # orders of magnitude, then corrected); replacements are rare, so sum afresh.
        self.cost = math.fsum(r.cost for r in self.runs.values())
        self.cost_sq = math.fsum(r.cost * r.cost for r in self.runs.values())
        self.cost_success = math.fsum(r.cost * r.success for r in self.runs.values())

    def _count(self, run: RunFacts, sign: int) -> None:
        self.successes += sign * run.success
        self.loops += sign * run.loop
        self.guardrails += sign * run.guardrail
        self.denials += sign * run.denied
        self.cost += sign * run.cost
        self.cost_sq += sign * run.cost * run.cost
        self.cost_success += sign * run.cost * run.success
        self.calls += sign * run.tool_calls
        self.calls_sq += sign * run.tool_calls * run.tool_calls
        self.errors += sign * run.tool_errors
        self.errors_sq += sign * run.tool_errors * run.tool_errors
        self.errors_calls += sign * run.tool_errors * run.tool_calls

    def above(self, threshold: float) -> int:
        """Runs strictly slower than `threshold` ms."""
        return self.n - bisect.bisect_right(self.durations, threshold)

    def escalated_above(self, threshold: float) -> float:
        """Escalated runs with more steps than `threshold`, those with exactly as many counted
        half (steps are small integers, so ties at a median are many)."""
        low = bisect.bisect_left(self.escalations, threshold)
        high = bisect.bisect_right(self.escalations, threshold)
        return len(self.escalations) - high + 0.5 * (high - low)


class _Estimate(NamedTuple):
    stable: float | None
    canary: float | None
    difference: float | None
    degradation: float | None  # θ̂ on the test scale; None: not testable yet
    margin: float  # δ on the test scale
    variance: float


# the proportions: metric -> the arm's count of runs it counts
_RATES = {"success_rate": "successes", "loop_rate": "loops", "guardrail_rate": "guardrails", "denial_rate": "denials"}


def _estimate(metric: str, s: _Arm, c: _Arm, policy: CanaryPolicy) -> _Estimate:
    """Both arms' values of one metric and, once testable, its degradation estimate and variance.

    Rates compare proportions (success, loops, and the shares of runs where a guardrail acted or
    an approval was denied); cost per success compares log ratios (delta method, which also
    makes "+15%" a fixed distance log 1.15 whatever the price level); tool errors compare
    pooled ratios with run-clustered variances. p95 duration compares shares of slow runs: the
    canary's above (1 + margin) x the stable p95 against the stable's above its own p95. At the
    null's boundary of a pure slowdown (canary durations = stable x (1 + margin)) these two
    shares have the same expectation, so margin 0 on this scale is exactly "canary p95 <=
    (1 + margin) x stable p95". The noise of the estimated stable p95 is carried by the stable
    share's binomial variance: the share of a distribution above its empirical p95 is a Beta
    order-statistic coverage with variance ≈ 0.05 x 0.95 / n_stable. A direct difference of
    p95s would need a density estimate at the tail for its variance, which a few dozen runs do
    not support.

    Escalation steps (how late escalations come) is the p95 test again over the escalated runs'
    steps, at the median: the canary's share above (1 + margin) x the stable median against the
    stable share above its own median (its coverage variance ≈ 1/4 / escalated stable runs), ties
    at a threshold counted half on both sides. The median, not a tail: an arm has a few dozen
    escalations where it has hundreds of runs. Steps are integers, so "+25%" is resolved to a
    step only: a canary taking (1 + margin) x stable's steps, rounded, sits near the null's
    boundary, not on it; one escalating where stable does has θ̂ well below 0 (its share above
    the raised threshold is under 1/2). A stable median of 0 steps leaves no room for a relative
    margin: a canary like that stable is then never shown within it (it only waits for max_runs).
    """
    margin = policy.margins[metric]
    enough = s.n >= policy.min_runs and c.n >= policy.min_runs
    if metric in _RATES:
        xs, xc = getattr(s, _RATES[metric]), getattr(c, _RATES[metric])
        ps, pc = (xs / s.n if s.n else None), (xc / c.n if c.n else None)
        if not enough:
            return _Estimate(ps, pc, None, None, margin, 0.0)
        worse = ps - pc if metric == "success_rate" else pc - ps
        return _Estimate(ps, pc, pc - ps, worse, margin, proportion_variance(xs, s.n) + proportion_variance(xc, c.n))
    if metric == "cost_per_success":
        vs = s.cost / s.successes if s.successes else None
        vc = c.cost / c.successes if c.successes else None
        if not (enough and min(s.successes, c.successes) >= policy.min_successes and vs and vc):
            return _Estimate(vs, vc, vc / vs - 1.0 if vs and vc else None, None, math.log1p(margin), 0.0)
        variance = sum(log_ratio_variance(a.n, a.cost, a.cost_sq, a.successes, a.cost_success, a.successes)
                       for a in (s, c))
        return _Estimate(vs, vc, vc / vs - 1.0, math.log(vc / vs), math.log1p(margin), variance)
    if metric == "tool_error_rate":
        rs = s.errors / s.calls if s.calls else None
        rc = c.errors / c.calls if c.calls else None
        if not (enough and s.calls and c.calls):
            return _Estimate(rs, rc, None, None, margin, 0.0)
        variance = sum(ratio_variance(a.n, a.errors, a.errors_sq, a.calls, a.errors_calls, a.calls_sq)
                       for a in (s, c))
        return _Estimate(rs, rc, rc - rs, rc - rs, margin, variance)
    if metric == "escalation_steps":
        ms, mc = quantile(s.escalations, MEDIAN), quantile(c.escalations, MEDIAN)
        difference = mc / ms - 1.0 if ms and mc is not None else None
        ns, nc = len(s.escalations), len(c.escalations)
        if not (enough and min(ns, nc) >= policy.min_escalations):
            return _Estimate(ms, mc, difference, None, 0.0, 0.0)
        xs, xc = s.escalated_above(ms), c.escalated_above((1.0 + margin) * ms)
        return _Estimate(ms, mc, difference, xc / nc - xs / ns, 0.0,
                         proportion_variance(xs, ns) + proportion_variance(xc, nc))
    # p95_duration
    qs = quantile(s.durations, P95)
    qc = quantile(c.durations, P95)
    difference = qc / qs - 1.0 if qs and qc is not None else None
    if not enough:
        return _Estimate(qs, qc, difference, None, 0.0, 0.0)
    xs, xc = s.above(qs), c.above((1.0 + margin) * qs)
    return _Estimate(qs, qc, difference, xc / c.n - xs / s.n, 0.0,
                     proportion_variance(xs, s.n) + proportion_variance(xc, c.n))


def _show(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if metric == "cost_per_success":
        return f"${value:.4g}"
    if metric == "p95_duration":
        return f"{value:.0f} ms"
    if metric == "escalation_steps":
        return f"{value:.3g} steps"
    return f"{value:.3f}"


class CanaryAnalysis:
    """A canary version against its stable version, re-judged after every batch of runs.

    `add` runs of either arm as they close (any order, redeliveries welcome); `decide` returns
    pending until a metric of `rollback_on` is degraded beyond its margin (rollback), every one
    of them is shown within its margin after `promote_after` canary runs (promote), or the
    canary reaches `max_runs` runs without a rollback (promote). The first rollback or promote
    is final: later calls return that same verdict.
    """

    def __init__(self, policy: CanaryPolicy | None = None) -> None:
        self.policy = policy or CanaryPolicy()
        self.arms_ = {arm: _Arm() for arm in ARMS}
        self.arm_of_: dict[str, str] = {}
        self.p_min_: dict[str, float] = {m: 1.0 for m in METRICS}
        self.verdict_: Verdict | None = None

    def add(self, arm: str, runs: Iterable[Mapping[str, Any]]) -> None:
        """Count closed runs (rows of the runs table) of one arm, "stable" or "canary"; a run_id
        seen before replaces its earlier row, in whichever arm that was."""
        self.add_facts(arm, (_facts(row) for row in runs))

    def add_facts(self, arm: str, runs: Iterable[tuple[str, RunFacts]]) -> None:
        """`add` of runs as (run_id, `run_facts(row)`): what a backlog of recent runs keeps."""
        if arm not in self.arms_:
            raise ValueError(f"arm must be one of {ARMS}, not {arm!r}")
        target = self.arms_[arm]
        for run_id, run in runs:
            previous = self.arm_of_.get(run_id)
            if previous == arm and target.runs[run_id] == run:
                continue  # a redelivery: the sums stay exactly as they are
            if previous is not None:
                self.arms_[previous].remove(run_id)
            target.add(run_id, run)
            self.arm_of_[run_id] = arm

    def decide(self) -> Verdict:
        """The verdict on the runs added so far (sticky once rollback or promote)."""
        if self.verdict_ is not None:
            return self.verdict_
        policy = self.policy
        stable, canary = self.arms_["stable"], self.arms_["canary"]
        level = policy.metric_alpha
        results = []
        for metric in METRICS:
            est, p_value = self._test(metric)
            statistic = upper = None
            if p_value is not None:
                excess = est.degradation - est.margin
                statistic = excess / math.sqrt(est.variance)
                upper = excess + confidence_radius(est.variance, policy.tau[metric] ** 2, level)
            results.append(MetricResult(
                metric, est.stable, est.canary, stable.n, canary.n, est.difference, statistic, p_value, level,
                p_value is not None and p_value <= level, policy.margins[metric], upper))
        verdict = self._verdict(tuple(results))
        if verdict.decision != "pending":
            self.verdict_ = verdict
        return verdict

    def p_values(self) -> dict[str, float | None]:
        """Each metric's always-valid p-value (the running minimum) on the runs added so far, as
        `decide` computes it, without its verdict and bounds: what a replay of the analysis plots."""
        return {metric: self._test(metric)[1] for metric in METRICS}

    def _test(self, metric: str) -> tuple[Any, float | None]:
        """A metric's estimate and its always-valid p-value (None while it cannot be tested); the
        running minimum is kept."""
        est = _estimate(metric, self.arms_["stable"], self.arms_["canary"], self.policy)
        if est.degradation is None or not est.variance > 0.0:
            return est, None
        excess = est.degradation - est.margin
        self.p_min_[metric] = p_value = min(self.p_min_[metric],
                                            mixture_p_value(excess, est.variance, self.policy.tau[metric] ** 2))
        return est, p_value

    def _verdict(self, results: tuple[MetricResult, ...]) -> Verdict:
        policy = self.policy
        n_c, n_s = self.arms_["canary"].n, self.arms_["stable"].n
        gating = [m for m in results if m.metric in policy.rollback_on]

        def verdict(decision: str, reason: str) -> Verdict:
            return Verdict(decision, n_c, n_s, results, reason)

        if n_c < policy.min_runs:
            return verdict("pending", f"{n_c} canary runs, no verdict before {policy.min_runs}")
        worse = sorted((m for m in gating if m.worse), key=lambda m: m.p_value)
        if worse:
            first = worse[0]
            also = f"; also {', '.join(m.metric for m in worse[1:])}" if worse[1:] else ""
            return verdict("rollback", f"{first.metric} {_show(first.metric, first.stable)} -> "
                                       f"{_show(first.metric, first.canary)} (always-valid p={first.p_value:.2g} "
                                       f"< {first.threshold:.2g}) after {n_c} canary runs{also}")
        # too few escalations to test how late they come: nothing to hold a promotion back on
        escalations = {arm: len(self.arms_[arm].escalations) for arm in ARMS}
        untested = ("escalation_steps",) if min(escalations.values()) < policy.min_escalations else ()
        unproven = [m.metric for m in gating
                    if m.metric not in untested and (m.upper_excess is None or m.upper_excess >= 0.0)]
        if n_c >= policy.promote_after and not unproven:
            shown = [m for m in policy.rollback_on if m not in untested]
            skipped = (f"; escalation_steps not tested ({escalations['canary']} canary and {escalations['stable']} "
                       f"stable escalations, min_escalations {policy.min_escalations})"
                       if "escalation_steps" in policy.rollback_on and untested else "")
            return verdict("promote", f"no worse than stable within the margins on {', '.join(shown)} "
                                      f"(level {1 - policy.alpha:.3g}) after {n_c} canary runs{skipped}")
        if n_c >= policy.max_runs:
            return verdict("promote", f"no degradation detected after {n_c} canary runs (max_runs "
                                      f"{policy.max_runs}); not shown within the margin: {', '.join(unproven)}")
        return verdict("pending", f"no degradation detected after {n_c} canary runs; not yet shown within the "
                                  f"margin: {', '.join(unproven)}")
