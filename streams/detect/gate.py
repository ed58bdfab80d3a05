"""Evaluation gates (SPEC §11): a release candidate's runs against its baseline's on the same tasks,
one-sided tests beyond a margin, failed only on evidence; streams/detect/README.md, "Evaluation gates"."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

METRICS = ("success_rate", "cost_per_task", "steps")

# Tolerated degradation: absolute for the success rate (5 points), relative for the cost of a
# task and its steps (+20%). Looser than a canary's: a gate sees one batch of a few dozen tasks,
# and a margin the size of what it can resolve keeps a candidate as good as its baseline from
# being failed by chance (jobs/evaluate_gate.py measures both sides).
DEFAULT_MARGINS: Mapping[str, float] = MappingProxyType({
    "success_rate": 0.05,
    "cost_per_task": 0.20,
    "steps": 0.20,
})

# Floors of the log ratios: a task that cost nothing (no priced call) or took no step would make
# an infinite ratio. Ranks, not sizes, decide the signed-rank test, so a floor only caps the bound.
COST_FLOOR_USD = 1e-6
STEPS_FLOOR = 1.0

# The exact unconditional test maximises over its nuisance parameter on this many grid points;
# beyond EXACT_MAX_PAIRS pairs its normal approximation is used (its tables grow as pairs²).
NUISANCE_GRID = 201
EXACT_MAX_PAIRS = 600
# The signed-rank test's exact null distribution up to this many tasks, then its normal limit.
SIGNED_RANK_EXACT_MAX = 2000


# --- policy ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GatePolicy:
    """How a gate judges a candidate.

    alpha: the level of each metric's one-sided test (SPEC §11): a candidate exactly at a metric's
        margin is failed on it with probability <= alpha; exactly at every margin, with at most
        len(gate_on) x alpha. One as good as its baseline is failed far less often, the margins
        standing between (3 of 300 seeds, 0.26% of 20,000, at 50 tasks x 2 trials:
        jobs/evaluate_gate.py). Not
        split over the metrics like the canary's: a gate sees a few dozen tasks once, and at
        alpha / 3 it would miss most 15-point drops at 50 tasks x 2 trials.
    min_tasks: fewer paired tasks than this is exit 2, whatever the runs say: the tests are exact,
        but so few tasks cannot show a candidate worse beyond a margin and a pass would mean nothing.
    margins: tolerated degradation per metric (see DEFAULT_MARGINS); partial, merged.
    gate_on: the metrics that can fail a gate; the others are reported only.
    """

    alpha: float = 0.05
    min_tasks: int = 20
    margins: Mapping[str, float] = field(default_factory=lambda: DEFAULT_MARGINS)
    gate_on: tuple[str, ...] = METRICS

    def __post_init__(self) -> None:
        if isinstance(self.min_tasks, bool) or not isinstance(self.min_tasks, int) or self.min_tasks < 1:
            raise ValueError(f"min_tasks must be an integer >= 1, not {self.min_tasks!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be a number in (0, 0.5), not {self.alpha!r}")
        if not isinstance(self.margins, Mapping):
            raise ValueError(f"margins must be a mapping of metric to number, not {self.margins!r}")
        unknown = sorted(set(self.margins) - set(METRICS))
        if unknown:
            raise ValueError(f"margins: unknown metrics {unknown} (known: {', '.join(METRICS)})")
        margins = {**DEFAULT_MARGINS, **self.margins}
        for metric, value in margins.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"margins.{metric} must be a number in [0, 1), not {value!r}")
        gate_on = (self.gate_on,) if isinstance(self.gate_on, str) else tuple(self.gate_on)
        if not gate_on or set(gate_on) - set(METRICS):
            raise ValueError(f"gate_on must name one or more of {', '.join(METRICS)}; got {list(gate_on)}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "margins", MappingProxyType({m: float(margins[m]) for m in METRICS}))
        object.__setattr__(self, "gate_on", tuple(m for m in METRICS if m in gate_on))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> GatePolicy:
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown gate policy keys {unknown} (known: {', '.join(known)})")
        return cls(**dict(data))

    @property
    def metric_alpha(self) -> float:
        """The level of each metric's test: alpha itself (see the class)."""
        return self.alpha


# --- pairing -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskRuns:
    """One task's runs in both versions, each list in start order: (success, cost USD, steps)."""

    task_id: str
    baseline: tuple[tuple[bool, float, float], ...]
    candidate: tuple[tuple[bool, float, float], ...]


def pair_by_task(baseline: Iterable[Mapping[str, Any]], candidate: Iterable[Mapping[str, Any]]) -> list[TaskRuns]:
    """The tasks run by both versions (rows of `runs`: task_id, outcome, cost_usd, steps,
    started_at), by task_id; runs without a task_id cannot be paired and are left out."""
    arms: dict[str, dict[str, list]] = {"baseline": defaultdict(list), "candidate": defaultdict(list)}
    for name, rows in (("baseline", baseline), ("candidate", candidate)):
        for row in rows:
            if row.get("task_id"):
                arms[name][row["task_id"]].append(
                    (row.get("started_at") or 0, row.get("run_id") or "",
                     (row["outcome"] == "success", float(row["cost_usd"] or 0), float(row["steps"] or 0))))
    shared = sorted(set(arms["baseline"]) & set(arms["candidate"]))
    return [TaskRuns(task, tuple(r[2] for r in sorted(arms["baseline"][task])),
                     tuple(r[2] for r in sorted(arms["candidate"][task]))) for task in shared]


# --- success: the exact unconditional test of paired binary outcomes -------------------------------


def discordant_pairs(tasks: Iterable[TaskRuns]) -> tuple[int, int, int]:
    """(losses, wins, pairs): within each task the j-th run of the candidate is paired with the
    j-th of the baseline (start order); a loss is a pair where only the baseline succeeded, a
    win one where only the candidate did. A task's extra runs in one version are not paired."""
    losses = wins = pairs = 0
    for task in tasks:
        for (b, _, _), (c, _, _) in zip(task.baseline, task.candidate):
            pairs += 1
            losses += b and not c
            wins += c and not b
    return losses, wins, pairs


def _restricted_win_rate(a: np.ndarray, b: np.ndarray, n: int, delta: float) -> np.ndarray:
    """Maximum likelihood of the win probability π_w under π_loss - π_w = delta (Tango 1998):
    the positive root of 2n π² - B π - C = 0, clipped to where every probability is >= 0."""
    c = n - a - b
    big_b = a * (1 - delta) + b * (1 - 3 * delta) - 2 * c * delta
    big_c = b * delta * (1 - delta)
    root = (big_b + np.sqrt(np.maximum(big_b * big_b + 8 * n * big_c, 0.0))) / (4 * n)
    return np.clip(root, max(0.0, -delta), (1 - delta) / 2)


def tango_z(a: np.ndarray | int, b: np.ndarray | int, n: int, delta: float) -> np.ndarray:
    """Tango's score statistic of H0 π_loss - π_win <= delta, for a losses and b wins in n pairs."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    win = _restricted_win_rate(a, b, n, delta)
    variance = n * (2 * win + delta - delta * delta)
    excess = a - b - n * delta
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(variance > 1e-12, excess / np.sqrt(np.maximum(variance, 1e-300)), np.sign(excess) * np.inf)
    return np.where(np.abs(excess) < 1e-9, np.where(variance > 1e-12, z, 0.0), z)


@functools.lru_cache(maxsize=64)
def _cells(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from scipy.special import gammaln

    a, b = (m.ravel() for m in np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij"))
    keep = a + b <= n
    a, b = a[keep].astype(float), b[keep].astype(float)
    return a, b, gammaln(n + 1) - gammaln(a + 1) - gammaln(b + 1) - gammaln(n - a - b + 1)


def _null_tail(n: int, delta: float, cut: np.ndarray) -> np.ndarray:
    """For each cut z: sup over the nuisance π_win of P(Z >= z) under π_loss - π_win = delta."""
    from scipy.special import xlogy

    a, b, log_coef = _cells(n)
    z = tango_z(a, b, n, delta)
    order = np.argsort(-z, kind="stable")
    z, a, b, log_coef = z[order], a[order], b[order], log_coef[order]
    # a cut z includes every cell with Z >= z (ties included): the count of cells at or above it
    upto = np.searchsorted(-z, -np.asarray(cut, float) + 1e-9, side="right")
    grid = np.linspace(max(0.0, -delta), (1 - delta) / 2, NUISANCE_GRID)
    best = np.zeros(len(upto))
    for chunk in np.array_split(grid, max(1, len(a) * len(grid) // 2_000_000)):
        wins, losses = chunk[None, :], chunk[None, :] + delta
        ties = np.clip(1 - 2 * chunk - delta, 0.0, 1.0)[None, :]
        log_p = log_coef[:, None] + xlogy(a[:, None], losses) + xlogy(b[:, None], wins) + xlogy(
            (n - a - b)[:, None], ties)
        tail = np.vstack([np.zeros((1, len(chunk))), np.cumsum(np.exp(log_p), axis=0)])
        best = np.maximum(best, tail[upto].max(axis=1))
    return np.minimum(best, 1.0)


def paired_binary_p_value(losses: int, wins: int, pairs: int, delta: float) -> float:
    """One-sided p-value of H0 "the candidate's success rate is at most `delta` below the
    baseline's" (π_loss - π_win <= delta) from the pairs' losses and wins: exact unconditional
    (Berger and Boos' maximisation over the nuisance, on Tango's score statistic), so valid at
    any number of pairs; its normal approximation beyond EXACT_MAX_PAIRS pairs."""
    if pairs == 0:
        return 1.0
    z = float(tango_z(losses, wins, pairs, delta))
    if pairs > EXACT_MAX_PAIRS:
        from scipy.special import ndtr

        return float(ndtr(-z))
    return float(_null_tail(pairs, delta, np.array([z]))[0])


def paired_binary_p_values(losses: np.ndarray, wins: np.ndarray, pairs: int, delta: float) -> np.ndarray:
    """paired_binary_p_value for many outcomes of the same number of pairs at once (evaluations)."""
    z = tango_z(np.asarray(losses), np.asarray(wins), pairs, delta)
    if pairs > EXACT_MAX_PAIRS:
        from scipy.special import ndtr

        return ndtr(-z)
    return _null_tail(pairs, delta, z)


def paired_binary_upper_bound(losses: int, wins: int, pairs: int, alpha: float) -> float:
    """Upper confidence bound (level 1 - alpha) of π_loss - π_win, the candidate's success-rate
    deficit: the smallest u that the mirrored exact test rejects (H0 deficit >= u), by bisection."""
    if pairs == 0:
        return 1.0
    low, high = -1.0, 1.0
    for _ in range(30):
        u = (low + high) / 2
        if paired_binary_p_value(wins, losses, pairs, -u) <= alpha:
            high = u
        else:
            low = u
        if high - low < 5e-4:
            break
    return high


# --- cost and steps: the signed-rank test of per-task log ratios -----------------------------------------


@functools.lru_cache(maxsize=64)
def _signed_rank_cdf(n: int) -> np.ndarray:
    """P(T <= t), t = 0..n(n+1)/2, of the Wilcoxon signed-rank statistic T of n differences under
    symmetry about 0 (exact, by recursion over the ranks)."""
    pmf = np.zeros(n * (n + 1) // 2 + 1)
    pmf[0] = 1.0
    top = 0
    for rank in range(1, n + 1):
        shifted = np.zeros_like(pmf)
        shifted[rank:top + rank + 1] = pmf[:top + 1]
        pmf = (pmf + shifted) / 2
        top += rank
    return np.cumsum(pmf)


def _critical_count(n: int, alpha: float) -> int:
    """How many values t of the signed-rank statistic have P(T <= t) <= alpha: a one-sided
    bound at level 1 - alpha leaves out that many Walsh averages."""
    if n > SIGNED_RANK_EXACT_MAX:
        from scipy.special import ndtri

        mean, sd = n * (n + 1) / 4, math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
        return max(0, int(math.floor(mean + ndtri(alpha) * sd)) + 1)
    return int(np.searchsorted(_signed_rank_cdf(n), alpha, side="right"))


@dataclass(frozen=True)
class SignedRank:
    p_value: float
    statistic: float  # T+ of the differences beyond the margin
    estimate: float  # Hodges-Lehmann pseudo-median of the log ratios
    upper: float  # upper confidence bound of the pseudo-median (level 1 - alpha)
    lower: float


def signed_rank_test(x: np.ndarray, shift: float, alpha: float) -> SignedRank:
    """One-sided Wilcoxon signed-rank test of H0 "the log ratios are centred at most at `shift`"
    (symmetric about their pseudo-median), exact for tasks without ties, with the Hodges-Lehmann
    estimate and its exact Walsh-average confidence bounds at level 1 - alpha."""
    from scipy.stats import rankdata

    x = np.asarray(x, float)
    d = x - shift
    d = d[np.abs(d) > 1e-12]  # a task exactly at the boundary tells nothing either way
    m = len(d)
    if m == 0:
        p, t_plus = 1.0, 0.0
    else:
        ranks = rankdata(np.abs(d))
        t_plus = float(ranks[d > 0].sum())
        if m > SIGNED_RANK_EXACT_MAX:
            from scipy.special import ndtr

            mean, sd = m * (m + 1) / 4, math.sqrt(m * (m + 1) * (2 * m + 1) / 24)
            p = float(ndtr(-(t_plus - mean - 0.5) / sd))
        else:
            cdf = _signed_rank_cdf(m)
            at_least = math.ceil(t_plus - 1e-9)  # ties make half ranks: the next integer, conservatively
            p = 1.0 if at_least <= 0 else float(1.0 - cdf[at_least - 1])
    walsh = np.sort((x[:, None] + x[None, :])[np.triu_indices(len(x))] / 2) if len(x) else np.zeros(0)
    if len(walsh) == 0:
        return SignedRank(p, t_plus, 0.0, math.inf, -math.inf)
    k = _critical_count(len(x), alpha)
    upper = float(walsh[len(walsh) - k]) if 1 <= k <= len(walsh) else math.inf
    lower = float(walsh[k - 1]) if 1 <= k <= len(walsh) else -math.inf
    return SignedRank(min(p, 1.0), t_plus, float(np.median(walsh)), upper, lower)


# --- the gate ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateMetric:
    """One metric of both versions and its test. baseline, candidate: the success rate of the
    paired runs, or the mean over paired tasks of each task's mean cost (USD) or steps.
    difference: candidate - baseline, absolute for the success rate, relative for cost and steps
    (Hodges-Lehmann estimate of the per-task ratio, minus 1). p_value: of H0 "no worse than the
    margin". worse_up_to: the upper confidence bound (level 1 - threshold) of the degradation,
    on the margin's scale: the candidate could be this much worse and the data would not show
    otherwise. worse: p_value <= threshold, the candidate is shown worse beyond the margin."""

    metric: str
    test: str
    baseline: float
    candidate: float
    difference: float
    margin: float
    statistic: float
    p_value: float
    threshold: float
    worse_up_to: float
    worse: bool
    gating: bool
    n: int

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class GateResult:
    verdict: str  # pass | fail | insufficient
    exit_code: int
    tasks: int
    pairs: int
    reason: str
    metrics: tuple[GateMetric, ...]
    policy: GatePolicy

    def evidence(self) -> dict:
        return {"tasks": self.tasks, "run_pairs": self.pairs, "min_tasks": self.policy.min_tasks,
                "alpha": self.policy.alpha, "metric_alpha": self.policy.metric_alpha,
                "gate_on": list(self.policy.gate_on), "metrics": [m.as_dict() for m in self.metrics]}


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def judge(tasks: list[TaskRuns], policy: GatePolicy | None = None) -> GateResult:
    """The gate's verdict on paired tasks: insufficient (exit 2) below `min_tasks`, fail (exit 1)
    when a metric of `gate_on` is shown worse beyond its margin at alpha / k, else pass (0)."""
    policy = policy or GatePolicy()
    level = policy.metric_alpha
    metrics = []
    losses, wins, pairs = discordant_pairs(tasks)
    if pairs:
        paired = [(b[0], c[0]) for t in tasks for b, c in zip(t.baseline, t.candidate)]
        margin = policy.margins["success_rate"]
        p = paired_binary_p_value(losses, wins, pairs, margin)
        bound = paired_binary_upper_bound(losses, wins, pairs, level)
        sb, sc = _mean(b for b, _ in paired), _mean(c for _, c in paired)
        metrics.append(GateMetric(
            "success_rate", "exact unconditional paired (Tango score, Berger-Boos)", sb, sc, sc - sb, margin,
            float(tango_z(losses, wins, pairs, margin)), p, level, bound, p <= level,
            "success_rate" in policy.gate_on, pairs))
    for metric, index, floor in (("cost_per_task", 1, COST_FLOOR_USD), ("steps", 2, STEPS_FLOOR)):
        if not tasks:
            break
        base = np.array([_mean(r[index] for r in t.baseline) for t in tasks])
        cand = np.array([_mean(r[index] for r in t.candidate) for t in tasks])
        ratios = np.log(np.maximum(cand, floor) / np.maximum(base, floor))
        margin = policy.margins[metric]
        test = signed_rank_test(ratios, math.log1p(margin), level)
        metrics.append(GateMetric(
            metric, "Wilcoxon signed-rank of per-task log ratios", float(base.mean()), float(cand.mean()),
            math.expm1(test.estimate), margin, test.statistic, test.p_value, level, math.expm1(test.upper),
            test.p_value <= level, metric in policy.gate_on, len(tasks)))
    metrics = tuple(metrics)
    n = len(tasks)
    if n < policy.min_tasks:
        return GateResult("insufficient", 2, n, pairs,
                          f"{n} paired tasks, fewer than the policy's minimum of {policy.min_tasks}",
                          metrics, policy)
    worse = [m for m in metrics if m.gating and m.worse]
    if worse:
        said = "; ".join(f"{m.metric} {_show(m.metric, m.baseline)} -> {_show(m.metric, m.candidate)} "
                         f"(p={m.p_value:.2g} <= {m.threshold:.2g}, margin {_margin(m)})" for m in worse)
        return GateResult("fail", 1, n, pairs, f"shown worse than the baseline beyond the margin on {n} tasks: {said}",
                          metrics, policy)
    bounds = ", ".join(f"{m.metric} {_worse(m)}" for m in metrics if m.gating)
    return GateResult("pass", 0, n, pairs, f"not shown worse beyond the margins on {n} tasks; could be worse by up to: "
                                           f"{bounds}", metrics, policy)


def _show(metric: str, value: float) -> str:
    if metric == "success_rate":
        return f"{value:.1%}"
    if metric == "cost_per_task":
        return f"${value:.4g}"
    return f"{value:.3g}"


def _margin(m: GateMetric) -> str:
    return f"{m.margin * 100:.3g} points" if m.metric == "success_rate" else f"+{m.margin:.0%}"


def _worse(m: GateMetric) -> str:
    """The bound on how much worse, in words: points of success, or percent more."""
    if not math.isfinite(m.worse_up_to):
        return "unbounded"
    if m.metric == "success_rate":
        return f"{m.worse_up_to * 100:.1f} points"
    return f"{m.worse_up_to:+.0%}"


def worse_in_words(m: GateMetric) -> str:
    return _worse(m)


def margin_in_words(m: GateMetric) -> str:
    return _margin(m)


def show(metric: str, value: float) -> str:
    return _show(metric, value)
