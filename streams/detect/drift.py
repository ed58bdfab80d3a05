"""Distribution drift of closed runs per agent version: two-sample tests over event-time windows
against the version's own trailing reference (or its stable version's), alerting on persistent shifts."""

from __future__ import annotations

import math
import struct
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Mapping

import numpy as np
from scipy import special, stats
from scipy.spatial.distance import jensenshannon

from streams.contracts.alerts import fingerprint, make_alert
from streams.detect.governance import NONE, guardrail

try:  # the exact two-sample KS distribution of ks_2samp (private; ks falls back to ks_2samp without it)
    from scipy.stats._stats_py import _attempt_exact_2kssamp as _exact_2samp
except ImportError:  # pragma: no cover
    _exact_2samp = None

# Per-run numeric features. The runs table carries no tool latency, so the tool feature is the
# run's tool error rate (tool_errors / tool_calls, 0 for a run without tool calls).
NUMERIC = ("cost_usd", "total_tokens", "steps", "duration_ms", "tool_error_rate")
# Categorical features: tool_mix counts every tool call of every run's tool_path; outcome and
# error_type count runs ("" error_type is reported as "none"); success is outcome folded to
# success / not, whose 1-df test is far more powerful for a success-rate drop than outcome's;
# guardrail counts runs by the most severe decision of their policy hits (blocked > redacted >
# warned > allowed, or "none"; streams.detect.governance).
CATEGORICAL = ("tool_mix", "outcome", "error_type", "success", "guardrail")
# Features only some agents report: tested only where a run of the pool or its reference has one
# (a category other than "none"), so an agent without guardrails adds no tests, no rows and no
# share of the FDR.
OPTIONAL = {"guardrail": NONE}


# --- two-sample statistics ------------------------------------------------------------------------


def ks(reference: np.ndarray, current: np.ndarray, side: str | None = None) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov: (D, p-value); `side` "greater" tests only for a current
    sample shifted upwards (its CDF below the reference's), "less" only downwards."""
    return ks_sorted(np.sort(reference), np.sort(current), side)


def ks_sorted(reference: np.ndarray, current: np.ndarray, side: str | None = None) -> tuple[float, float]:
    """`ks` of sorted samples: scipy.stats.ks_2samp(method="auto")'s numbers, step for step,
    without its per-call wrappers (see README)."""
    return _ks_emd(reference, current, side)[:2]


def _ks_emd(reference: np.ndarray, current: np.ndarray, side: str | None) -> tuple[float, float, float]:
    """`ks_sorted` and `_emd_sorted` of the same sorted samples, which share their CDFs: (D, p, EMD)."""
    alternative = side or "two-sided"
    n1, n2 = len(reference), len(current)
    if _exact_2samp is None or not n1 or not n2 or np.isnan(reference[-1]) or np.isnan(current[-1]):
        res = stats.ks_2samp(reference, current, alternative=alternative)  # NaN and empty as scipy has them
        return float(res.statistic), float(res.pvalue), _emd_sorted(reference, current)
    # the CDFs' difference at every value of either sample: ks_2samp's (in another order) and
    # _emd_sorted's (all but the last value)
    values = np.concatenate((reference, current))
    values.sort(kind="mergesort")
    diffs = np.searchsorted(reference, values, side="right") / n1 - np.searchsorted(current, values, side="right") / n2
    emd = float(np.sum(np.abs(diffs[:-1]) * np.diff(values)))
    min_s, max_s = np.clip(-diffs.min(), 0, 1), diffs.max()
    d = min_s if alternative == "less" or (alternative == "two-sided" and min_s > max_s) else max_s
    exact = False
    if max(n1, n2) <= 10_000:  # scipy's MAX_AUTO_N
        exact, d, p = _exact_ks(n1, n2, math.gcd(n1, n2), d, alternative)
    if not exact:  # asymptotic, as scipy falls back to it
        m, n = sorted([float(n1), float(n2)], reverse=True)
        en = m * n / (m + n)
        if alternative == "two-sided":
            p = stats.kstwo.sf(d, np.round(en))
        else:
            z = np.sqrt(en) * d
            p = np.exp(-2 * z ** 2 - 2 * z * (m + 2 * n) / np.sqrt(m * n * (m + n)) / 3.0)
    return float(d), float(np.clip(p, 0, 1)), emd


def _exact_ks(n1: int, n2: int, g: int, d: float, alternative: str) -> tuple[bool, float, float]:
    """scipy's `_attempt_exact_2kssamp`, the same (exact, d, p) bit for bit, faster one-sided
    for samples of unequal sizes (where scipy counts lattice paths in a Python double loop,
    5-35 ms a test at a few hundred runs): the loop in numpy (`_count_paths_outside`), and no
    count at all where scipy would throw it away because C(n1 + n2, n1) overflows."""
    if alternative == "two-sided" or n1 == n2:
        return _exact_2samp(n1, n2, g, d, alternative)
    lcm = (n1 // g) * n2
    h = int(np.round(d * lcm))
    d = h * 1.0 / lcm
    if h == 0:
        return True, d, 1.0
    paths = special.binom(n1 + n2, n1)
    if np.isinf(paths):
        return False, d, np.nan
    try:
        with np.errstate(invalid="raise", over="raise"):
            outside = _count_paths_outside(n1, n2, g, h)
            if outside > paths:
                return False, d, np.nan
            p = outside / paths
    except (FloatingPointError, OverflowError):
        return False, d, np.nan
    return (True, d, p) if 0 <= p <= 1 else (False, d, p)


def _count_paths_outside(m: int, n: int, g: int, h: int) -> float:
    """scipy's `_count_paths_outside_method` (Hodges 1958): its inner loop in numpy, every
    floating point operation in the same order, so the same number."""
    if m < n:
        m, n = n, m
    mg, ng = m // g, n // g
    lxj = n + (mg - h) // mg
    if lxj == 0:
        return special.binom(m + n, n)
    xj = np.array([(h + mg * j + ng - 1) // ng for j in range(lxj)], dtype=np.int64)
    B = np.zeros(lxj)
    B[0] = 1
    row = np.empty(lxj)
    for j in range(1, lxj):
        back = j - np.arange(j)
        row[0] = special.binom(xj[j] + j, j)
        np.multiply(special.binom(xj[j] - xj[:j] + back, back), B[:j], out=row[1:j + 1])
        B[j] = np.subtract.reduce(row[:j + 1])  # ((row0 - row1) - row2) - ...: scipy's order
    js = np.arange(lxj)
    terms = B * special.binom((m - xj) + (n - js), n - js)
    return np.subtract.reduce(np.concatenate(([0.0], -terms)))  # 0 + term0 + term1 + ...: scipy's order


def fisher_success(reference: Mapping[str, int], current: Mapping[str, int], fell: bool) -> tuple[float, float]:
    """One-sided Fisher exact test that the current success share fell (`fell`) or rose against the
    reference's: (odds ratio of not succeeding, current vs reference; p-value). Exact, so right
    at the handful of runs a window holds, where the chi-square approximation is not."""
    table = [[current.get("not", 0), current.get("success", 0)], [reference.get("not", 0), reference.get("success", 0)]]
    res = stats.fisher_exact(table, alternative="greater" if fell else "less")
    return float(res.statistic), float(res.pvalue)


def _scale(reference: np.ndarray) -> float:
    # IQR is robust to the heavy tails of cost and duration; features that are mostly one value
    # (tool error rate) have IQR 0 and fall back to the std, then to the magnitude, then to 1.
    q25, q75 = np.percentile(reference, (25, 75))
    for s in (q75 - q25, float(np.std(reference)), abs(float(np.median(reference)))):
        if s > 0:
            return float(s)
    return 1.0


def wasserstein(reference: np.ndarray, current: np.ndarray) -> float:
    """Earth mover's distance in units of the reference's IQR (std when the IQR is 0)."""
    return _emd(reference, current) / _scale(reference)


def _emd(u: np.ndarray, v: np.ndarray) -> float:
    """1-D Wasserstein-1 distance: the area between the two empirical CDFs (what
    scipy.stats.wasserstein_distance computes, without its per-call argument machinery)."""
    return _emd_sorted(np.sort(u), np.sort(v))


def _emd_sorted(u: np.ndarray, v: np.ndarray) -> float:
    values = np.concatenate((u, v))
    values.sort(kind="mergesort")
    deltas = np.diff(values)
    u_cdf = np.searchsorted(u, values[:-1], side="right") / len(u)
    v_cdf = np.searchsorted(v, values[:-1], side="right") / len(v)
    return float(np.sum(np.abs(u_cdf - v_cdf) * deltas))


PSI_EPS = 1e-4  # a bin's smallest share in psi


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10, eps: float = PSI_EPS) -> float:
    """Population stability index over quantile bins of the reference (ties merge bins)."""
    return _psi(*_psi_bins(reference, bins, eps), current, eps)


def _psi_bins(reference: np.ndarray, bins: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The reference's side of `psi`: (bin edges, share of the reference in each bin)."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    ref = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1) / len(reference)
    return edges, np.maximum(ref, eps)


def _psi(edges: np.ndarray, ref: np.ndarray, current: np.ndarray, eps: float) -> float:
    cur = np.bincount(np.searchsorted(edges, current, side="right"), minlength=len(edges) + 1) / len(current)
    cur = np.maximum(cur, eps)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def _aligned(reference: Mapping[str, float], current: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    cats = sorted(set(reference) | set(current))
    table = np.array([[reference.get(c, 0) for c in cats], [current.get(c, 0) for c in cats]], dtype=float)
    return cats, table


def chi2(reference: Mapping[str, int], current: Mapping[str, int], *, design_effect: float = 1.0,
         min_expected: float = 5.0, mc_draws: int = 20_000, mc_below: float = 0.01,
         rng: np.random.Generator | None = None) -> tuple[float, float]:
    """Chi-square test of homogeneity of two category count tables: (statistic, p-value).

    Categories seen on one side only are counted as 0 on the other. Categories whose expected
    count in `current` is below `min_expected` are pooled into one "other" cell, so rare ones do
    not each add a df of noise while a new category still shows (it pools into a cell expected
    near 0). If a cell is still expected below `min_expected` the chi-square approximation is too
    liberal there, so a p-value under `mc_below` is recomputed as a Monte Carlo exact-conditional
    one (multivariate hypergeometric draws of the current row given the column totals; floor
    1/(mc_draws+1)). `design_effect` > 1 deflates counts of clustered observations.
    """
    _, table = _aligned(reference, current)
    table = table / design_effect
    table = table[:, table.sum(axis=0) > 0]
    n = table.sum(axis=1)
    if table.shape[1] < 2 or n.min() <= 0:
        return 0.0, 1.0
    rare = table.sum(axis=0) * n[1] / n.sum() < min_expected
    if rare.sum() > 1:
        table = np.column_stack([table[:, ~rare], table[:, rare].sum(axis=1)])
    if table.shape[1] < 2:
        return 0.0, 1.0
    stat, p, expected = _chi2_homogeneity(table)
    if expected.min() >= min_expected or p >= mc_below or rng is None or mc_draws <= 0:
        return float(stat), float(p)
    table = np.rint(table)
    colors = table.sum(axis=0).astype(np.int64)
    nsample = int(table[1].sum())
    if nsample <= 0 or nsample >= colors.sum():
        return float(stat), float(p)
    exp_cur = colors * nsample / colors.sum()
    exp_ref = colors - exp_cur

    def statistic(cur: np.ndarray) -> np.ndarray:
        return ((cur - exp_cur) ** 2 / exp_cur).sum(axis=-1) + ((colors - cur - exp_ref) ** 2 / exp_ref).sum(axis=-1)

    draws = rng.multivariate_hypergeometric(colors, nsample, size=mc_draws, method="marginals")
    at_least = _count_at_least(statistic, draws, colors, statistic(table[1]) - 1e-9)
    return float(stat), float((1 + at_least) / (mc_draws + 1))


def _count_at_least(statistic: Callable[[np.ndarray], np.ndarray], draws: np.ndarray, colors: np.ndarray,
                    bar: float) -> int:
    """np.count_nonzero(statistic(draws) >= bar), the statistic of each distinct draw computed
    once: the draws (rows, at most `colors` each) repeat a few hundred tables many times."""
    if float(np.prod(colors + 1.0)) >= 2.0 ** 62:  # too many tables for one int64 code each
        return int(np.count_nonzero(statistic(draws) >= bar))
    radix = np.cumprod(np.concatenate(([1], colors[:-1] + 1)))
    codes, counts = np.unique(draws @ radix, return_counts=True)
    distinct = codes[:, None] // radix % (colors + 1)  # the draws again, one row per code
    return int(counts[statistic(distinct) >= bar].sum())


def _chi2_homogeneity(table: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Pearson's chi-square of a 2 x k table, no continuity correction: (statistic, p, expected);
    the same numbers as scipy.stats.chi2_contingency(correction=False), at a fraction of its cost."""
    rows, cols = table.sum(axis=1), table.sum(axis=0)
    expected = np.outer(rows, cols) / table.sum()
    stat = float(np.sum((table - expected) ** 2 / expected))
    return stat, float(special.chdtrc(table.shape[1] - 1, stat)), expected


def design_effect(per_run_counts: np.ndarray) -> float:
    """Rao-Scott first-order design effect of category counts clustered in runs (rows), >= 1.

    Tool calls of one run are not independent draws, so a chi-square over calls would be too
    liberal; dividing the counts by this mean design effect corrects it to first order.
    """
    y = np.asarray(per_run_counts, dtype=float)
    n, k = y.shape
    m = y.sum(axis=1)
    total = m.sum()
    if n < 2 or k < 2 or total <= 0:
        return 1.0
    p = y.sum(axis=0) / total
    # variance of each category's ratio estimator under cluster sampling, vs multinomial sampling
    v_cluster = n / (n - 1) * ((y - np.outer(m, p)) ** 2).sum(axis=0) / total ** 2
    v_srs = p * (1 - p) / total
    ok = v_srs > 0
    if ok.sum() < 2:
        return 1.0
    d = v_cluster[ok] / v_srs[ok]
    return max(1.0, float(np.sum((1 - p[ok]) * d) / (ok.sum() - 1)))


def js(reference: Mapping[str, float], current: Mapping[str, float]) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between the two category distributions."""
    _, table = _aligned(reference, current)
    if table[0].sum() <= 0 or table[1].sum() <= 0:
        return 0.0
    return float(jensenshannon(table[0], table[1], base=2))


def benjamini_hochberg(p_values: Iterable[float], q: float) -> tuple[np.ndarray, float]:
    """BH step-up at FDR q: (rejected mask, the p-value cut-off: rank k* of m gives k* q / m)."""
    p = np.asarray(list(p_values), dtype=float)
    m = len(p)
    if m == 0:
        return np.zeros(0, dtype=bool), q
    order = np.sort(p)
    passing = np.nonzero(order <= q * np.arange(1, m + 1) / m)[0]
    k = int(passing[-1]) + 1 if len(passing) else 0
    cutoff = q * max(k, 1) / m
    return (p <= cutoff) if k else np.zeros(m, dtype=bool), cutoff


# --- per-run features -------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class RunFeatures:
    """What a window keeps of a run until it is tested (minutes of event time): small, since a
    fleet's runs of those minutes are all held. Strings and tool paths are shared copies."""

    version: int
    numeric: bytes  # the NUMERIC features, packed (PACKED): 73 bytes, not a tuple of 5 floats' 200
    tools: tuple[str, ...]
    outcome: str
    error_type: str
    guardrail: str = NONE


PACKED = struct.Struct(f"<{len(NUMERIC)}d")
_PATHS: dict[tuple[str, ...], tuple[str, ...]] = {}  # tool path -> its one copy
_MAX_PATHS = 10_000  # distinct paths kept; past it the cache starts again (paths are few, runs many)


def run_features(run: Mapping) -> RunFeatures:
    """The features of one closed run (a `runs` row); `version` orders re-emissions of a run."""
    tool_calls = int(run.get("tool_calls") or 0)
    numeric = (
        float(run.get("cost_usd") or 0.0),
        float((run.get("input_tokens") or 0) + (run.get("output_tokens") or 0)),
        float(run.get("steps") or 0),
        float(run.get("duration_ms") or 0),
        (run.get("tool_errors") or 0) / tool_calls if tool_calls else 0.0,
    )
    # Names many runs share, one copy of each: a window holds its runs until it is tested.
    return RunFeatures(int(run.get("version") or 0), PACKED.pack(*numeric), _tool_path(run.get("tool_path") or ()),
                       _one_copy(run.get("outcome") or ""), _one_copy(run.get("error_type") or "none"),
                       guardrail(run))  # one of governance's constants: shared already


def _tool_path(tools: Iterable[str]) -> tuple[str, ...]:
    path = tuple(tools)
    shared = _PATHS.get(path)
    if shared is None:
        if len(_PATHS) >= _MAX_PATHS:
            _PATHS.clear()
        shared = _PATHS[path] = tuple(map(_one_copy, path))
    return shared


def _one_copy(name: str) -> str:
    # sys.intern takes exact str only; an interned string still goes when nothing holds it
    return sys.intern(name) if type(name) is str else name


@dataclass(slots=True)
class _Window:
    start: int
    runs: dict[int, RunFeatures] = field(default_factory=dict)  # by hash(run_id)
    tested: bool = False
    drifted: bool = False  # in a pool that tested significant: kept out of later references
    _summary: tuple | None = None
    _compacted: int = -1  # once tested, the window keeps its summary and how many runs it had

    @property
    def size(self) -> int:
        return len(self.runs) if self._compacted < 0 else self._compacted

    def compact(self) -> None:
        """Keep the summary (~100 bytes a run), drop the runs (~1 KB each): a tested window takes
        no more runs."""
        if self._compacted < 0:
            self.summary()
            self._compacted, self.runs = len(self.runs), {}

    def add(self, run_id: str, run: RunFeatures) -> None:
        key = hash(run_id)
        known = self.runs.get(key)
        if known is None or known.version <= run.version:
            self.runs[key] = run
            self._summary = None

    def summary(self) -> tuple:
        """(numeric array, tool_mix, outcome, error_type, success and guardrail counters, tool calls)."""
        if self._summary is None:
            runs = self.runs.values()
            self._summary = (
                np.frombuffer(b"".join(r.numeric for r in runs), dtype="<f8").reshape(-1, len(NUMERIC)),
                Counter(t for r in runs for t in r.tools),
                Counter(r.outcome for r in runs),
                Counter(r.error_type for r in runs),
                Counter("success" if r.outcome == "success" else "not" for r in runs),
                Counter(r.guardrail for r in runs),
                _ToolCalls.of(runs),
            )
        return self._summary


@dataclass(slots=True, frozen=True)
class _ToolCalls:
    """The tool calls of a window's runs, for the design effect: the window's tools, each call
    as its tool's index among them, and each run's number of calls."""

    tools: tuple[str, ...]
    codes: np.ndarray
    calls: np.ndarray

    @classmethod
    def of(cls, runs: Iterable[RunFeatures]) -> _ToolCalls:
        index: dict[str, int] = {}
        codes = [index.setdefault(t, len(index)) for r in runs for t in r.tools]
        calls = [len(r.tools) for r in runs]
        # the smallest integers that hold them (a byte a call, mostly): a tested window is kept for
        # the reference's age, three hours
        return cls(tuple(index), np.array(codes, dtype=np.min_scalar_type(len(index))),
                   np.array(calls, dtype=np.min_scalar_type(max(calls, default=0))))


def _pool(windows: list[_Window]) -> tuple[np.ndarray, list[Counter]]:
    parts = [w.summary() for w in windows]
    numeric = np.concatenate([p[0] for p in parts])
    cats = [sum((p[i] for p in parts), Counter()) for i in range(1, 1 + len(CATEGORICAL))]
    return numeric, cats


@dataclass(slots=True)
class _Reference:
    """The windows a pool is tested against, pooled; what the tests compute of each numeric
    feature's reference side is kept, since one reference serves every scale and half."""

    windows: list[_Window]
    numeric: np.ndarray
    cats: list[Counter]
    columns: dict[int, tuple] = field(default_factory=dict)

    @classmethod
    def of(cls, windows: list[_Window]) -> _Reference:
        return cls(windows, *_pool(windows))

    def column(self, j: int, psi_bins: int) -> tuple[np.ndarray, float, np.ndarray, np.ndarray, float]:
        """Feature j's reference: (sorted values, Wasserstein scale, PSI edges and shares, mean)."""
        found = self.columns.get(j)
        if found is None:
            values = self.numeric[:, j]
            found = self.columns[j] = (np.sort(values), _scale(values), *_psi_bins(values, psi_bins, PSI_EPS),
                                       float(values.mean()))
        return found


@dataclass(slots=True)
class _Series:
    windows: dict[int, _Window] = field(default_factory=dict)
    firing: bool = False
    severity: str = "warning"
    clear_streak: int = 0
    episode: int = 0  # window of the firing alert, shared by its resolution


# --- detector --------------------------------------------------------------------------------------

# a test's (scale, feature, (statistic name, value), p-value, [(effect, value, floor)], change)
Test = tuple[str, str, tuple[str, float], float, list[tuple[str, float, float]], dict]


class DriftDetector:
    """Event-time drift of each (agent_id, agent_version)'s runs against a reference.

    Runs fall in tumbling windows of `window_ms` by `ended_at`. A window is tested once the
    watermark (newest ended_at seen - `lateness_ms`) passes its end, or on `flush()`; a run
    arriving for a tested window is counted in `late_runs` and dropped, on both sides, so a
    reference never holds runs a tested window could not see. `lateness_ms` must cover the run
    assembler's idle timeout for timed-out runs to be seen at all, at the price of that delay.

    Each window is tested at three scales, each a pool of the windows ending with it: `short`,
    the last `short_pool_windows` windows; `mid`, the last `mid_pool_windows` (both need
    `min_short_samples` runs); and `long`, back (at most `max_pool_windows`) until
    `min_samples` runs, so low traffic still gets tested. A pool equal to a shorter scale's is
    tested once. Scanning several lengths finds a shift that began a few windows ago with most
    of its runs and little of the time before it. The reference is the most recent
    `reference_windows` windows before the widest pool that were not part of a drifted pool,
    within `max_reference_age_ms`; for a version other than `baseline_version[agent_id]` (or,
    when `baseline_version` is a function of (agent, version), the version it names: the
    rollout's stable one for a canary) it is the stable version's windows up to the tested one.
    Nothing is tested before the reference holds `min_reference` runs: every later test reuses
    it, so an odd small reference would bias them all alike. When fewer clean reference runs
    remain (a shift that outlived the age limit), the recent windows become the reference: the
    new normal.

    Per window, one p-value per feature and scale (KS for numeric, chi-square for categorical)
    goes through Benjamini-Hochberg at FDR `alpha`; rows in `drift` are named `feature@short`,
    `feature@mid` and `feature` (long). A feature has drifted when its test is rejected and its
    effect size reaches a floor (scaled Wasserstein or PSI; Jensen-Shannon distance), so huge
    samples do not alert on negligible shifts.

    Persistence: an alert fires when a feature drifted in a pool of at least `persistence`
    windows and the shift shows in both halves of that pool on their own: split in two runs of
    consecutive windows with about as many runs each, each half tested for that feature alone,
    one-sided in the pool's direction where the test has a side, at `consistency_alpha`, and
    moved the same way (rows `feature@scale.early` / `.late`). The halves share no run, so a
    single bad window, however bad, leaves one half clean; the strict bar is paid once, on the
    whole pool, where all of a real shift's runs are. Critical when a drifted feature's
    Wasserstein or JS distance is `critical_factor` times its floor. The alert resolves after
    `persistence` consecutive clean windows: no feature drifted and none below `alpha` even
    before the multiple-testing correction (so an alert on a shift that persists does not
    resolve while the evidence only wavers); windows without enough runs count for neither.
    """

    def __init__(self, window_ms: int = 300_000, lateness_ms: int = 120_000, min_samples: int = 30,
                 min_reference: int = 100, max_pool_windows: int = 6, short_pool_windows: int = 2,
                 mid_pool_windows: int = 4, min_short_samples: int = 10, reference_windows: int = 24,
                 max_reference_age_ms: int = 3 * 3_600_000, alpha: float = 0.0002, persistence: int = 2,
                 consistency_alpha: float = 0.01, homogeneity_alpha: float = 0.001,
                 wasserstein_floor: float = 0.1, psi_floor: float = 0.1, js_floor: float = 0.05,
                 critical_factor: float = 4.0, psi_bins: int = 10, mc_draws: int | None = None,
                 baseline_version: Mapping[str, str] | Callable[[str, str], str | None] | None = None,
                 random_state: int = 0) -> None:
        self.window_ms = window_ms
        self.lateness_ms = lateness_ms
        self.min_samples = min_samples
        self.min_reference = min_reference
        self.max_pool_windows = max_pool_windows
        self.short_pool_windows = short_pool_windows
        self.mid_pool_windows = mid_pool_windows
        self.min_short_samples = min_short_samples
        self.reference_windows = reference_windows
        self.max_reference_age_ms = max_reference_age_ms
        self.alpha = alpha
        self.persistence = persistence
        self.consistency_alpha = consistency_alpha
        self.homogeneity_alpha = homogeneity_alpha
        self.wasserstein_floor = wasserstein_floor
        self.psi_floor = psi_floor
        self.js_floor = js_floor
        self.critical_factor = critical_factor
        self.psi_bins = psi_bins
        self.mc_draws = mc_draws
        self.baseline_version = baseline_version
        self.random_state = random_state

    # state is created lazily, so __init__ stays a pure parameter holder
    def _state(self) -> None:
        if not hasattr(self, "series_"):
            self.series_: dict[tuple[str, str], _Series] = {}
            self.watermark_ = -(2 ** 62)
            self.late_runs_ = 0
            self.rng_ = np.random.default_rng(self.random_state)

    def update(self, runs: Iterable[Mapping], watermark: int | None = None) -> tuple[list[dict], list[dict]]:
        """Fold closed runs in; test the windows they complete. Returns (drift_rows, alerts).

        Without `watermark` the detector's own (newest ended_at seen - lateness) is used; a
        caller fed by several upstream partitions passes the slowest one's instead, so runs
        of a partition that is behind are not late here.
        """
        self._state()
        newest = None
        for run in runs:
            ended = int(run["ended_at"])
            newest = ended if newest is None or ended > newest else newest
            start = ended - ended % self.window_ms
            key = (run["agent_id"], run["agent_version"])
            series = self.series_.get(key)
            if series is None:
                series = self.series_[key] = _Series()
            window = series.windows.get(start)
            if window is None:
                if start + self.window_ms <= self.watermark_:
                    self.late_runs_ += 1
                    continue
                window = series.windows[start] = _Window(start)
            elif window.tested:
                self.late_runs_ += 1
                continue
            window.add(run["run_id"], run_features(run))
        if watermark is not None:
            self.watermark_ = max(self.watermark_, watermark)
        elif newest is not None:
            self.watermark_ = max(self.watermark_, newest - self.lateness_ms)
        return self._test_until(self.watermark_)

    def flush(self) -> tuple[list[dict], list[dict]]:
        """Test every pending window, complete or not (end of a replay)."""
        self._state()
        return self._test_until(None)

    # --- internals -------------------------------------------------------------------------

    def _stable_key(self, key: tuple[str, str]) -> tuple[str, str] | None:
        if callable(self.baseline_version):
            stable = self.baseline_version(*key)
        else:
            stable = (self.baseline_version or {}).get(key[0])
        return None if stable is None or stable == key[1] else (key[0], stable)

    def _test_until(self, watermark: int | None) -> tuple[list[dict], list[dict]]:
        due = []
        for key, series in self.series_.items():
            canary = self._stable_key(key) is not None
            for start, window in series.windows.items():
                if not window.tested and (watermark is None or start + self.window_ms <= watermark):
                    # a canary's reference is its stable version's same windows: test those first
                    due.append((start, canary, key))
        due.sort()
        rows: list[dict] = []
        alerts: list[dict] = []
        for start, _, key in due:
            r, a = self._test(key, start)
            rows.extend(r)
            alerts.extend(a)
        for start, _, key in due:
            self.series_[key].windows[start].compact()
        self._forget(watermark)
        return rows, alerts

    def _forget(self, watermark: int | None) -> None:
        if watermark is None:
            return
        horizon = watermark - self.max_reference_age_ms - self.max_pool_windows * self.window_ms
        for series in self.series_.values():
            for start in [s for s, w in series.windows.items() if w.tested and s < horizon]:
                del series.windows[start]

    def _reference(self, key: tuple[str, str], pool_start: int, start: int) -> tuple[list[_Window], str]:
        stable = self._stable_key(key)
        source = self.series_.get(stable or key)
        if source is None:
            return [], ""
        # own history stops before the pool; a stable version's runs are contemporaneous
        last = start if stable else pool_start - self.window_ms
        oldest = last - self.max_reference_age_ms
        recent = sorted((w for s, w in source.windows.items() if oldest <= s <= last and w.tested and w.size),
                        key=lambda w: -w.start)
        clean = [w for w in recent if not w.drifted][: self.reference_windows]
        how = "stable" if stable else "trailing"
        if sum(w.size for w in clean) < self.min_reference:
            clean, how = recent[: self.reference_windows], how + " rebaselined"
        n = sum(w.size for w in clean)
        version = (stable or key)[1]
        return clean, f"{version} {how} {len(clean)} windows, n={n}"

    def _test(self, key: tuple[str, str], start: int) -> tuple[list[dict], list[dict]]:
        series = self.series_[key]
        window = series.windows[start]
        window.tested = True
        if not window.size:
            return [], []
        pools: dict[str, list[_Window]] = {}
        for scale, pool in (("short", self._last(series, start, self.short_pool_windows)),
                            ("mid", self._last(series, start, self.mid_pool_windows)),
                            ("long", self._pool_back(series, start))):
            if pool is not None and all(len(pool) != len(p) for p in pools.values()):  # same windows: tested once
                pools[scale] = pool
        if not pools:
            return [], []
        widest = max(pools.values(), key=len)
        reference, baseline = self._reference(key, widest[-1].start, start)
        n_ref = sum(w.size for w in reference)
        if n_ref < self.min_reference:
            return [], []
        ref = _Reference.of(reference)
        absent = {name for name in OPTIONAL if not _reported(reference + widest, name)}
        only = set(NUMERIC + CATEGORICAL) - absent if absent else None
        n_tests = len(pools) * (len(NUMERIC) + len(CATEGORICAL) - len(absent))
        tests: list[Test] = []
        for scale, pool in pools.items():
            tests += self._feature_tests(scale, pool, ref, self.alpha / n_tests, only)

        rejected, cutoff = benjamini_hochberg([t[3] for t in tests], self.alpha)
        rows, moved, persistent = [], {}, {}
        base = {"agent_id": key[0], "agent_version": key[1], "window": start, "baseline": baseline}
        for test, rej in zip(tests, rejected):
            scale, name, _, p, effects, change = test
            rows += _rows(base, _feature_name(name, scale), test, cutoff, rej)
            if not (rej and any(v >= floor for _, v, floor in effects)):
                continue
            pool = pools[scale]
            for w in pool:
                w.drifted = True  # kept out of later references
            finding = _finding(test, cutoff, sum(w.size for w in pool))
            if name not in moved or _feature_p(finding) < _feature_p(moved[name]):
                moved[name] = finding
            if len(pool) >= self.persistence and (name not in persistent or len(pool) > persistent[name]["windows"]):
                check, half_rows = self._halves(pool, test, ref, base)
                rows += half_rows
                if check.pop("persists"):
                    persistent[name] = {**finding, "windows": len(pool), **check}

        evidence = {"window": start, "window_ms": self.window_ms, "pool_windows": [w.start for w in widest],
                    "n_current": sum(w.size for w in widest), "n_reference": n_ref, "reference": baseline,
                    "features": sorted(moved.values(), key=_feature_p), "min_p_value": min(t[3] for t in tests)}
        return rows, self._advance(key, series, evidence, sorted(persistent.values(), key=_feature_p))

    def _last(self, series: _Series, start: int, windows: int) -> list[_Window] | None:
        """The windows with runs among the last `windows` of event time up to `start`, newest first,
        if they hold `min_short_samples` runs."""
        pool = [w for s in range(start, start - windows * self.window_ms, -self.window_ms)
                if (w := series.windows.get(s)) is not None and w.size]
        return pool if sum(w.size for w in pool) >= self.min_short_samples else None

    def _pool_back(self, series: _Series, start: int) -> list[_Window] | None:
        """The window at `start` and those just before it, at most `max_pool_windows` of event time,
        until they hold `min_samples` runs; None if they never do."""
        pool, n = [], 0
        for s in range(start, start - self.max_pool_windows * self.window_ms, -self.window_ms):
            w = series.windows.get(s)
            if w is not None and w.size:
                pool.append(w)
                n += w.size
                if n >= self.min_samples:
                    return pool
        return None

    def _halves(self, pool: list[_Window], test: Test, ref: _Reference, base: dict) -> tuple[dict, list[dict]]:
        """The drifted feature of `test` in each half of `pool` (consecutive windows, split where
        the run counts are most even) against the reference, one-sided in the pool's direction,
        and the halves against each other: ({persists, halves, halves_differ}, drift rows)."""
        scale, name, _, _, _, change = test
        windows = sorted(pool, key=lambda w: w.start)
        sizes = np.cumsum([w.size for w in windows])
        cut = 1 + int(np.argmin(np.abs(sizes[:-1] - sizes[-1] / 2)))
        early, late = windows[:cut], windows[cut:]
        direction = _direction(change)
        (between,) = self._feature_tests(scale, late, _Reference.of(early), self.homogeneity_alpha, {name})
        alike = between[3] > self.homogeneity_alpha
        rows = _rows(base, f"{name}@{scale}.between", between, self.homogeneity_alpha, not alike)
        halves = []
        for part, half in (("early", early), ("late", late)):
            (h,) = self._feature_tests(scale, half, ref, self.consistency_alpha, {name}, {name: direction})
            shifted = h[3] <= self.consistency_alpha and _direction(h[5]) == direction
            rows += _rows(base, f"{name}@{scale}.{part}", h, self.consistency_alpha, shifted)
            halves.append({"windows": [w.start for w in half], "n_current": int(sum(w.size for w in half)),
                           h[2][0]: {"value": h[2][1], "p_value": h[3], "threshold": self.consistency_alpha},
                           "change": h[5], "shifted": shifted})
        return {"persists": alike and all(h["shifted"] for h in halves), "halves": halves,
                "halves_differ": {between[2][0]: {"value": between[2][1], "p_value": between[3],
                                                  "threshold": self.homogeneity_alpha}}}, rows

    def _feature_tests(self, scale: str, pool: list[_Window], ref: _Reference, bar: float,
                       only: Collection[str] | None = None, directions: Mapping[str, tuple] | None = None
                       ) -> list[Test]:
        """One test per feature (or per feature in `only`) of `pool` against the reference `ref`;
        one-sided for the features in `directions`
        (feature -> the way it moved, see _direction) where the test has a side: KS for numeric
        features, Fisher's exact test for the success rate. `bar` is the smallest p-value that
        matters: a Monte Carlo p-value gets 2 / bar draws, so it can fall below it (its floor is
        1 / (draws + 1)); more only sharpen p-values far past any bar, and cost: 20 / bar took
        seconds per test at the smallest rank of an FDR of 0.0002 over 27 tests."""
        cur_num, cur_cat = _pool(pool)
        tests = []
        for j, name in enumerate(NUMERIC):
            if only is not None and name not in only:
                continue
            # ks, wasserstein and psi of the feature, the reference's side computed once
            r_sorted, r_scale, edges, r_bins, r_mean = ref.column(j, self.psi_bins)
            c = cur_num[:, j]
            c_sorted = np.sort(c)
            side = ("greater" if directions[name][0] else "less") if directions and name in directions else None
            d, p, emd = _ks_emd(r_sorted, c_sorted, side)
            effects = [("wasserstein", emd / r_scale, self.wasserstein_floor),
                       ("psi", _psi(edges, r_bins, c_sorted, PSI_EPS), self.psi_floor)]
            tests.append((scale, name, ("ks", d), p, effects, _relative_change(r_mean, float(c.mean()))))
        reference = ref.windows
        for name, r, c in zip(CATEGORICAL, ref.cats, cur_cat):
            if only is not None and name not in only:
                continue
            if name == "success" and directions and name in directions:
                stat = ("fisher", *fisher_success(r, c, fell=not directions[name][1]))
            else:
                deff = _tool_design_effect(reference + pool, sorted(set(r) | set(c))) if name == "tool_mix" else 1.0
                stat = ("chi2", *chi2(r, c, design_effect=deff, mc_draws=self.mc_draws or int(2 / bar),
                                      mc_below=max(0.01, 2 * bar), rng=self.rng_))
            move = _share(r, c, "success") if name == "success" else _largest_move(r, c)
            tests.append((scale, name, stat[:2], stat[2], [("js", js(r, c), self.js_floor)], move))
        return tests

    def _advance(self, key: tuple[str, str], series: _Series, evidence: dict, persistent: list[dict]) -> list[dict]:
        if evidence["features"]:
            series.clear_streak = 0
        elif evidence["min_p_value"] >= self.alpha:
            # clean: not even one feature below alpha before the multiple-testing correction
            # (a firing alert does not resolve on windows that only narrowly miss the bar)
            series.clear_streak += 1
        if persistent and not series.firing:
            series.firing = True
            series.episode = evidence["window"]
            critical = any(m["effect_ratio"] >= self.critical_factor for m in persistent)
            series.severity = "critical" if critical else "warning"
            moved = {m["feature"]: m for m in persistent}
            # the success rate repeats outcome's line when that line is already about success
            if moved.get("outcome", {}).get("change", {}).get("category") == "success":
                moved.pop("success", None)
            windows = max(m["windows"] for m in persistent)
            summary = (f"{key[0]} {key[1]} drifted over the last {windows} windows vs "
                       f"{evidence['reference']}: " + ", ".join(_describe(m) for m in moved.values()))
            return [self._alert(key, series, "firing", summary, {**evidence, "persistent": persistent})]
        if series.firing and series.clear_streak >= self.persistence:
            series.firing = False
            summary = (f"{key[0]} {key[1]} back in line with {evidence['reference']} "
                       f"for {series.clear_streak} windows")
            return [self._alert(key, series, "resolved", summary, evidence)]
        return []

    def _alert(self, key: tuple[str, str], series: _Series, status: str, summary: str, evidence: dict) -> dict:
        evidence = {**evidence, "episode": series.episode}
        return make_alert(
            kind="drift", severity=series.severity, status=status, fingerprint=fingerprint("drift", *key),
            ts=evidence["window"] + self.window_ms, agent_id=key[0], agent_version=key[1],
            summary=summary, evidence=evidence, episode=str(series.episode),
        )


def _reported(windows: list[_Window], name: str) -> bool:
    """Whether a run of the windows has the optional categorical feature `name` (a category other
    than its absent one)."""
    i, absent = 1 + CATEGORICAL.index(name), OPTIONAL[name]
    return any(category != absent for w in windows for category in w.summary()[i])


def _feature_name(name: str, scale: str) -> str:
    return name if scale == "long" else f"{name}@{scale}"


def _rows(base: dict, feature: str, test: Test, threshold: float, rejected: bool) -> list[dict]:
    """The `drift` rows of one test: its statistic and p-value, then each effect size."""
    _, _, (stat_name, stat_value), p, effects, _ = test
    big = any(v >= floor for _, v, floor in effects)
    return [{**base, "feature": feature, "statistic": stat_name, "value": stat_value, "p_value": p,
             "threshold": threshold, "significant": bool(rejected and big)}] + [
        {**base, "feature": feature, "statistic": e, "value": v, "p_value": None, "threshold": floor,
         "significant": bool(rejected and v >= floor)} for e, v, floor in effects]


def _finding(test: Test, threshold: float, n_current: int) -> dict:
    scale, name, (stat_name, stat_value), p, effects, change = test
    return {"feature": name, "scale": scale, "n_current": n_current, "change": change,
            stat_name: {"value": stat_value, "p_value": p, "threshold": threshold},
            **{e: {"value": v, "p_value": None, "threshold": f} for e, v, f in effects},
            # PSI is biased upwards at small n, so severity reads the other effect sizes
            "effect_ratio": max(v / f for e, v, f in effects if e != "psi")}


def _tool_design_effect(windows: list[_Window], tools: list[str]) -> float:
    """design_effect of the windows' runs (rows, in order) x `tools` (columns) call counts."""
    return design_effect(_tool_counts(windows, tools))


def _tool_counts(windows: list[_Window], tools: list[str]) -> np.ndarray:
    index = {t: i for i, t in enumerate(tools)}
    rows, cols, n = [], [], 0
    for w in windows:
        calls = w.summary()[-1]
        cols.append(np.array([index[t] for t in calls.tools], dtype=np.int64)[calls.codes])
        rows.append(np.repeat(np.arange(n, n + len(calls.calls)), calls.calls))
        n += len(calls.calls)
    k = len(tools)
    cells = np.concatenate(rows) * k + np.concatenate(cols) if windows else np.zeros(0, dtype=np.int64)
    return np.bincount(cells, minlength=n * k).reshape(n, k).astype(float)


def _relative_change(ref_mean: float, cur_mean: float) -> dict:
    rel = (cur_mean - ref_mean) / abs(ref_mean) if ref_mean else None
    return {"reference_mean": ref_mean, "current_mean": cur_mean, "relative": rel}


def _share(ref: Counter, cur: Counter, category: str) -> dict:
    nr, nc = sum(ref.values()) or 1, sum(cur.values()) or 1
    return {"category": category, "reference_share": ref.get(category, 0) / nr,
            "current_share": cur.get(category, 0) / nc}


def _largest_move(ref: Counter, cur: Counter) -> dict:
    nr, nc = sum(ref.values()) or 1, sum(cur.values()) or 1
    cats = sorted(set(ref) | set(cur))
    cat = max(cats, key=lambda c: abs(cur.get(c, 0) / nc - ref.get(c, 0) / nr)) if cats else ""
    return _share(ref, cur, cat)


def _direction(change: dict) -> tuple:
    """Which way a feature moved: the mean's sign for numeric features, the category and its
    share's sign for categorical ones."""
    if "category" in change:
        return change["category"], bool(change["current_share"] > change["reference_share"])
    return (bool(change["current_mean"] > change["reference_mean"]),)


def _feature_p(moved: dict) -> float:
    return (moved.get("ks") or moved.get("chi2") or moved["fisher"])["p_value"]


def _describe(moved: dict) -> str:
    change = moved["change"]
    if "ks" in moved:
        rel = change["relative"]
        how = f"{rel:+.0%}" if rel is not None else f"{change['reference_mean']:.3g}->{change['current_mean']:.3g}"
        return f"{moved['feature']} {how} (KS p={moved['ks']['p_value']:.0e})"
    what = "rate" if moved["feature"] == "success" else change["category"]
    test = "chi2" if "chi2" in moved else "fisher"
    return (f"{moved['feature']} {what} {change['reference_share']:.0%}->"
            f"{change['current_share']:.0%} ({test} p={moved[test]['p_value']:.0e})")
