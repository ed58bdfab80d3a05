"""Failure clustering of closed runs: masked error signatures, online cosine clustering per agent,
and `failure_cluster` alerts when a cluster appears or spikes (SPEC §6, table `failure_clusters`)."""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import scipy.sparse as sp
from scipy.stats import poisson
from sklearn import config_context
from sklearn.base import BaseEstimator
from sklearn.feature_extraction import FeatureHasher
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.preprocessing import normalize

from streams.contracts.alerts import FIRING, RESOLVED, fingerprint, make_alert, utc_text
from streams.detect.recent import RunMemory

KIND = "failure_cluster"

# --- masking ----------------------------------------------------------------------------------

MAX_MESSAGE_CHARS = 1_000  # a stack trace's head names the failure; its tail only adds noise

_MASKS: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p, re.IGNORECASE), r) for p, r in (
    (r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>()]+", "<url>"),
    (r"\b[\w.+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)+\b", "<email>"),
    # a quote opens only after a non-word character, so "can't" and "don't" stay as they are
    (r"(?<!\w)'[^'\n]*'(?!\w)", "<str>"),
    (r'(?<!\w)"[^"\n]*"(?!\w)', "<str>"),
    (r"\b\d{4}-\d{2}-\d{2}(?:[t ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:z|[+-]\d{2}:?\d{2})?)?\b", "<ts>"),
    (r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", "<id>"),
    (r"\b0x[0-9a-f]+\b", "<hex>"),
    (r"\b(?=[a-f]*\d)(?=\d*[a-f])[0-9a-f]{8,}\b", "<hex>"),
    (r"#\w+", "#<id>"),
))
_PATH = re.compile(r"(?<![\w<>/])[\w.~-]*(?:/[\w.@:-]+)+/?")
_UNIT = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(ms|us|ns|s|m|h|d|kb|mb|gb|tb|b|%|x)\b", re.IGNORECASE)
_ALNUM_ID = re.compile(r"\b(?=[a-z_]*\d)(?=\d*[a-z_])\w*[a-z]\w*\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.<])[-+]?\d+(?:[.,]\d+)*(?![\w>])")
_SPACE = re.compile(r"\s+")


def _path(match: re.Match) -> str:
    text = match.group(0)
    # "and/or" or "tokens/min" is prose; a path has depth or a file name
    return "<path>" if text.count("/") >= 2 or "." in text.rsplit("/", 1)[-1] else text


@functools.lru_cache(maxsize=2_048)  # failing runs repeat their messages (half of them in the bench fleet)
def mask(message: str) -> str:
    """The message's template: variable parts replaced by placeholders, whitespace collapsed."""
    text = (message or "")[:MAX_MESSAGE_CHARS]
    for pattern, placeholder in _MASKS:
        text = pattern.sub(placeholder, text)
    text = _PATH.sub(_path, text)
    text = _UNIT.sub(r"<num>\1", text)
    text = _ALNUM_ID.sub("<id>", text)
    text = _NUMBER.sub("<num>", text)
    return _SPACE.sub(" ", text).strip()


# --- signatures -------------------------------------------------------------------------------


def _fields(run: dict) -> tuple[str, str, str, str, bool]:
    path = run.get("tool_path") or []
    return (run.get("error_type") or "", mask(run.get("error_message") or ""), path[-1] if path else "",
            run.get("outcome") or "", bool(run.get("loop_detected")))


def signature(run: dict) -> str:
    """Error type, masked message, last tool and outcome of a run, as one line of text."""
    return _signature(*_fields(run))


def _signature(error_type: str, template: str, tool: str, outcome: str, loop: bool) -> str:
    text = f"{error_type or '-'} | {template or '-'} | tool:{tool or '-'} | outcome:{outcome}"
    return text + " | loop" if loop else text


def _label(error_type: str, template: str, tool: str, outcome: str, loop: bool) -> str:
    head = f"{error_type}: {template}" if error_type or template else "no error message"
    text = f"{head} ({outcome}{' after ' + tool if tool else ''})"
    return "loop, " + text if loop else text


def is_failed(run: dict) -> bool:
    return run.get("outcome") != "success"


# --- clusters ---------------------------------------------------------------------------------

DEFAULT_WEIGHTS = {"message": 1.5, "outcome": 1.0, "error_type": 1.0, "tool": 0.5, "loop": 4.0}
_MAX_TEMPLATES = 32  # distinct member templates counted per cluster, for its label
_REMEMBERED_RUNS = 100_000  # run ids kept (at least) to recognise a redelivered run
_REMEMBERED_VECTORS = 4_096  # signature vectors kept: failures repeat a few dozen signatures


@dataclass(slots=True)
class Cluster:
    cluster_id: str
    agent_id: str
    row: int  # of the agent's centroid matrix
    first_seen: int
    last_seen: int
    size: int = 0
    example_run_ids: list[str] = field(default_factory=list)
    templates: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)
    windows: dict[int, Counter] = field(default_factory=dict)  # window start -> versions -> runs
    new_done: bool = False  # the "new" condition was reached (alerted, or learned silently)
    new_alert: dict | None = None  # the firing "new" alert, until the cluster goes quiet
    spike_since: int | None = None  # window start of the spike that is firing

    @property
    def label(self) -> str:
        return self.templates.most_common(1)[0][0] if self.templates else ""

    def count(self, window: int) -> int:
        counts = self.windows.get(window)
        return sum(counts.values()) if counts else 0

    def row_dict(self, updated_at: int) -> dict:
        return {"cluster_id": self.cluster_id, "agent_id": self.agent_id, "label": self.label,
                "size": self.size, "first_seen": self.first_seen, "last_seen": self.last_seen,
                "example_run_ids": list(self.example_run_ids), "updated_at": updated_at}


def _row(matrix: sp.csr_matrix, i: int) -> tuple[np.ndarray, np.ndarray]:
    # slicing indptr directly: a CSR row as a matrix costs more than the whole placement
    start, end = matrix.indptr[i], matrix.indptr[i + 1]
    return matrix.indices[start:end], matrix.data[start:end]


class _Centroids:
    """Sums of unit vectors per cluster of one agent, dense over the features that agent has used."""

    def __init__(self) -> None:
        self.columns: dict[int, int] = {}  # hashed feature -> column
        self.sums = np.zeros((4, 64))
        self.norms = np.zeros(4)
        self.k = 0
        self.placed: dict[tuple, np.ndarray] = {}  # signature -> the columns of its features, once all have one

    def similarities(self, features: np.ndarray, values: np.ndarray, signature: tuple | None = None) -> np.ndarray:
        """Cosine of a unit vector with each centroid."""
        if self.k == 0:
            return np.zeros(0)
        cols = self.placed.get(signature)
        if cols is not None:
            return self.sums[: self.k, cols] @ values / self.norms[: self.k]
        cols = np.fromiter((self.columns.get(f, -1) for f in features.tolist()), np.int64, len(features))
        known = cols >= 0
        dots = self.sums[: self.k, cols[known]] @ values[known]
        return dots / self.norms[: self.k]

    def add(self, row: int, features: np.ndarray, values: np.ndarray, signature: tuple | None = None) -> None:
        if row == self.k:
            if row == self.sums.shape[0]:
                self.sums = np.vstack([self.sums, np.zeros_like(self.sums)])
                self.norms = np.concatenate([self.norms, np.zeros_like(self.norms)])
            self.k += 1
        cols = self.placed.get(signature)
        if cols is None:
            cols = np.array([self._column(f) for f in features.tolist()], np.int64)
            if signature is not None:
                self.placed[signature] = cols
                if len(self.placed) > _REMEMBERED_VECTORS:
                    del self.placed[next(iter(self.placed))]
        self.sums[row, cols] += values
        self.norms[row] = math.sqrt(float(self.sums[row] @ self.sums[row]))

    def _column(self, feature: int) -> int:
        col = self.columns.get(feature)
        if col is None:
            col = self.columns[feature] = len(self.columns)
            if col == self.sums.shape[1]:
                self.sums = np.hstack([self.sums, np.zeros_like(self.sums)])
        return col


class FailureClusterer(BaseEstimator):
    """Online clustering of failed runs per agent, with `failure_cluster` alerts.

    A failed run (outcome != "success") joins the most similar cluster of its agent when the
    cosine of its signature vector with the cluster centroid is at least `threshold`, else it
    opens a new cluster. Cluster ids are a hash of the agent and the first member's signature,
    so they never change as clusters grow and replaying the same runs in the same order gives
    the same ids. Time is event time (`ended_at`); windows are `window_ms` long.
    """

    def __init__(self, threshold: float = 0.7, window_ms: int = 300_000, min_size: int = 3,
                 history_windows: int = 12, min_history_windows: int = 3, spike_min_count: int = 5,
                 spike_ratio: float = 3.0, spike_p_value: float = 1e-3, spike_floor: float = 0.2,
                 max_examples: int = 5, warmup_ms: int = 0, weights: dict | None = None,
                 n_features: int = 2**20, new_quiet_ms: int = 3_600_000) -> None:
        self.threshold = threshold
        self.window_ms = window_ms
        self.min_size = min_size
        self.history_windows = history_windows
        self.min_history_windows = min_history_windows
        self.spike_min_count = spike_min_count
        self.spike_ratio = spike_ratio
        self.spike_p_value = spike_p_value
        self.spike_floor = spike_floor
        self.max_examples = max_examples
        self.warmup_ms = warmup_ms
        # a "new cluster" alert resolves once the cluster has had no run for this long
        self.new_quiet_ms = new_quiet_ms
        self.weights = weights
        self.n_features = n_features

    # -- vectors --

    def transform(self, runs: list[dict]) -> sp.csr_matrix:
        """Unit-norm signature vectors; stateless, so the same run maps to the same vector after a restart."""
        return self._vectorise([_fields(run) for run in runs])

    def _vectorise(self, runs_fields: list[tuple[str, str, str, str, bool]]) -> sp.csr_matrix:
        weights = {**DEFAULT_WEIGHTS, **(self.weights or {})}
        text = HashingVectorizer(n_features=self.n_features, token_pattern=r"<\w+>|\w\w+", ngram_range=(1, 2),
                                 norm="l2", alternate_sign=False)
        hasher = FeatureHasher(n_features=self.n_features, input_type="dict", alternate_sign=False)
        messages, fields = [], []
        for error_type, template, tool, outcome, loop in runs_fields:
            messages.append(template)
            # categorical fields as weighted one-hot features; the message block has norm `message`
            doc = {f"outcome={outcome}": weights["outcome"], f"type={error_type}": weights["error_type"]}
            if tool:
                doc[f"tool={tool}"] = weights["tool"]
            if loop:
                doc["loop"] = weights["loop"]
            fields.append(doc)
        # The inputs are ours and finite: sklearn's per-call validation was a third of the cost.
        with config_context(assume_finite=True, skip_parameter_validation=True):
            matrix = sp.hstack([text.transform(messages) * weights["message"], hasher.transform(fields)], format="csr")
            return normalize(matrix)

    def _vectors(self, runs_fields: list[tuple]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each signature's vector as (features, values): those of `_vectorise`, whose rows do not
        depend on each other, so a signature seen before is not vectorised again."""
        known = self.vectors_
        new = [f for f in dict.fromkeys(runs_fields) if f not in known]
        if new:
            matrix = self._vectorise(new)
            for i, f in enumerate(new):
                features, values = _row(matrix, i)
                known[f] = (features.copy(), values.copy())
        vectors = [known[f] for f in runs_fields]
        while len(known) > _REMEMBERED_VECTORS:  # the oldest first
            del known[next(iter(known))]
        return vectors

    # -- learning --

    def partial_fit(self, runs: Iterable[dict], y=None) -> FailureClusterer:
        """Learn from closed runs silently: conditions reached here are known and raise no alert later."""
        self._learn(list(runs), emit=False)
        return self

    def update(self, runs: Iterable[dict], now_ms: int | None = None) -> tuple[list[dict], list[dict], dict[str, str]]:
        """Learn from closed runs; returns (changed `failure_clusters` rows, alerts, run_id -> cluster_id).

        `now_ms` (wall clock) becomes the rows' `updated_at`; without it, the event-time clock.
        """
        touched, alerts, assigned = self._learn(list(runs), emit=True)
        updated_at = self.clock_ if now_ms is None else now_ms
        rows = [self.clusters_[cid].row_dict(updated_at) for cid in touched]
        return rows, alerts, assigned

    def predict(self, runs: Iterable[dict]) -> list[str]:
        """The cluster each run would join now ("" for a success or when none is near enough); learns nothing."""
        runs = list(runs)
        self._ensure_state()
        out = [""] * len(runs)
        failed = [i for i, run in enumerate(runs) if is_failed(run)]
        if not failed:
            return out
        matrix = self.transform([runs[i] for i in failed])
        for n, i in enumerate(failed):
            known = self.seen_runs_.get(runs[i]["run_id"])
            if known:
                out[i] = known
                continue
            space = self.centroids_.get(runs[i]["agent_id"])
            if space is not None and space.k:
                sims = space.similarities(*_row(matrix, n))
                best = int(np.argmax(sims))
                if sims[best] >= self.threshold:
                    out[i] = self.rows_[runs[i]["agent_id"]][best]
        return out

    def cluster_rows(self, updated_at: int | None = None) -> list[dict]:
        """Every cluster's `failure_clusters` row."""
        self._ensure_state()
        stamp = self.clock_ if updated_at is None else updated_at
        return [cluster.row_dict(stamp) for cluster in self.clusters_.values()]

    def _ensure_state(self) -> None:
        if hasattr(self, "clusters_"):
            return
        self.clusters_: dict[str, Cluster] = {}
        self.centroids_: dict[str, _Centroids] = {}
        self.rows_: dict[str, list[str]] = {}  # agent -> cluster id per centroid row
        self.clock_ = 0  # newest ended_at seen
        self.started_ = None  # first ended_at seen, for the warm-up
        self.traffic_: dict[str, dict[int, int]] = {}  # agent -> window start -> closed runs
        # run_id -> cluster id ("" for a success), for the last _REMEMBERED_RUNS runs (twice that at most)
        self.seen_runs_: RunMemory[str] = RunMemory(slack=_REMEMBERED_RUNS)
        self.seen_count_ = 0  # runs remembered so far
        self.new_firing_: set[str] = set()  # clusters whose "new" alert fires
        self.vectors_: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # signature fields -> vector

    def _learn(self, runs: list[dict], emit: bool) -> tuple[list[str], list[dict], dict[str, str]]:
        self._ensure_state()
        # event-time order, so a batch gives the same clusters however it was cut
        runs = sorted(runs, key=lambda r: (r["ended_at"], r["run_id"]))
        failed = [run for run in runs if is_failed(run)]
        fields = [_fields(run) for run in failed]
        vectors = self._vectors(fields)
        position = {id(run): i for i, run in enumerate(failed)}
        assigned: dict[str, str] = {}
        touched: dict[str, None] = {}
        alerts: list[dict] = []
        for run in runs:
            run_id, ended = run["run_id"], run["ended_at"]
            known = self.seen_runs_.get(run_id)
            if known is not None:  # redelivered: counted once, keeps its cluster
                if known:
                    assigned[run_id] = known
                continue
            if self.started_ is None:
                self.started_ = ended
            if self.clock_ and self.window_of(ended) > self.window_of(self.clock_):
                # a window closed: judge spikes as of then, before this run opens the next one
                alerts += self._check_spikes(touched, emit) + self._check_quiet(emit)
            self.clock_ = max(self.clock_, ended)
            traffic = self.traffic_.setdefault(run["agent_id"], {})
            traffic[self.window_of(ended)] = traffic.get(self.window_of(ended), 0) + 1
            self._forget_old(traffic)
            if id(run) not in position:
                self._remember(run_id, "")
                continue
            i = position[id(run)]
            cluster = self._place(run, fields[i], *vectors[i])
            assigned[run_id] = cluster.cluster_id
            self._remember(run_id, cluster.cluster_id)
            touched[cluster.cluster_id] = None
            if not cluster.new_done and cluster.size >= self.min_size:
                cluster.new_done = True
                if emit and cluster.first_seen - self.started_ >= self.warmup_ms:
                    cluster.new_alert = self._new_alert(cluster)
                    self.new_firing_.add(cluster.cluster_id)
                    alerts.append(cluster.new_alert)
        alerts += self._check_spikes(touched, emit)
        return list(touched), alerts, assigned

    def _place(self, run: dict, run_fields: tuple, features: np.ndarray, values: np.ndarray) -> Cluster:
        agent = run["agent_id"]
        space = self.centroids_.get(agent)
        if space is None:
            space = self.centroids_[agent] = _Centroids()
            self.rows_[agent] = []
        sims = space.similarities(features, values, run_fields)
        best = int(np.argmax(sims)) if len(sims) else -1
        ended = run["ended_at"]
        if best >= 0 and sims[best] >= self.threshold:
            cluster = self.clusters_[self.rows_[agent][best]]
        else:
            cluster = Cluster(self._new_id(agent, _signature(*run_fields)), agent, space.k, ended, ended)
            self.clusters_[cluster.cluster_id] = cluster
            self.rows_[agent].append(cluster.cluster_id)
        space.add(cluster.row, features, values, run_fields)
        cluster.size += 1
        cluster.first_seen = min(cluster.first_seen, ended)
        cluster.last_seen = max(cluster.last_seen, ended)
        if len(cluster.example_run_ids) < self.max_examples:
            cluster.example_run_ids.append(run["run_id"])
        label = _label(*run_fields)
        if label in cluster.templates or len(cluster.templates) < _MAX_TEMPLATES:
            cluster.templates[label] += 1
        version = run.get("agent_version") or ""
        cluster.versions[version] += 1
        cluster.windows.setdefault(self.window_of(ended), Counter())[version] += 1
        self._forget_old(cluster.windows)
        return cluster

    def _forget_old(self, windows: dict) -> None:
        # windows older than the history the spike test looks at are not needed again
        oldest = self.window_of(self.clock_) - (self.history_windows + 2) * self.window_ms
        for start in [w for w in windows if w < oldest]:
            del windows[start]

    def _new_id(self, agent: str, sig: str) -> str:
        base = "fc-" + hashlib.sha1(f"{agent}|{sig}".encode()).hexdigest()[:12]
        cid, n = base, 1
        while cid in self.clusters_:  # the same first signature twice in one agent: keep both ids distinct
            n += 1
            cid = f"{base}-{n}"
        return cid

    def _remember(self, run_id: str, cluster_id: str) -> None:
        self.seen_count_ += 1
        self.seen_runs_.put(run_id, self.seen_count_ + _REMEMBERED_RUNS, cluster_id)
        self.seen_runs_.expire(self.seen_count_)

    def window_of(self, ts: int) -> int:
        return ts - ts % self.window_ms

    # -- alerts --

    def _spike_test(self, cluster: Cluster, window: int) -> dict | None:
        """Evidence that `window` holds far more of the cluster's runs than its history predicts, or None.

        The expectation is the cluster's share of the agent's closed runs over the trailing windows
        times the agent's runs in this window, so a burst of traffic alone is not a spike.
        """
        first = self.window_of(cluster.first_seen)
        history = [window - i * self.window_ms for i in range(1, self.history_windows + 1)]
        history = [w for w in history if w >= first]
        if len(history) < self.min_history_windows:
            return None  # too young to have a normal rate; the "new" alert covers it
        count = cluster.count(window)
        if count < self.spike_min_count:
            return None
        traffic = self.traffic_.get(cluster.agent_id, {})
        runs_now = max(traffic.get(window, 0), count)
        history_runs = sum(traffic.get(w, 0) for w in history)
        history_count = sum(cluster.count(w) for w in history)
        rate = history_count / history_runs if history_runs else 0.0
        expected = max(rate * runs_now, self.spike_floor)
        if count < self.spike_ratio * expected:
            return None
        p_value = float(poisson.sf(count - 1, expected))
        if p_value > self.spike_p_value:
            return None
        return {"window_start": window, "window_end": window + self.window_ms, "count": count,
                "runs_in_window": runs_now, "expected": expected, "baseline_share": rate,
                "baseline_mean": history_count / len(history), "baseline_windows": len(history),
                "p_value": p_value}

    def _check_spikes(self, touched: dict[str, None], emit: bool) -> list[dict]:
        current = self.window_of(self.clock_)
        alerts = []
        candidates = set(touched) | {cid for cid, c in self.clusters_.items() if c.spike_since is not None}
        for cid in sorted(candidates):
            cluster = self.clusters_[cid]
            # the window just closed counts too, so a spike does not clear the moment a window opens
            evidence = self._spike_test(cluster, current) or self._spike_test(cluster, current - self.window_ms)
            if evidence is not None and cluster.spike_since is None:
                cluster.spike_since = evidence["window_start"]
                if emit:
                    alerts.append(self._spike_alert(cluster, FIRING, evidence))
            elif evidence is None and cluster.spike_since is not None:
                if emit:
                    alerts.append(self._spike_alert(cluster, RESOLVED, {
                        "window_start": current, "window_end": current + self.window_ms,
                        "count": cluster.count(current)}))
                cluster.spike_since = None
        return alerts

    def _check_quiet(self, emit: bool) -> list[dict]:
        """Resolve the "new cluster" alerts of clusters with no run for `new_quiet_ms`."""
        alerts = []
        for cid in sorted(self.new_firing_):
            cluster = self.clusters_[cid]
            if self.clock_ - cluster.last_seen < self.new_quiet_ms:
                continue
            self.new_firing_.discard(cid)
            firing, cluster.new_alert = cluster.new_alert, None
            if emit:
                alerts.append(make_alert(
                    kind=KIND, severity=firing["severity"], status=RESOLVED, fingerprint=firing["fingerprint"],
                    ts=self.clock_, agent_id=cluster.agent_id, agent_version=firing["agent_version"],
                    run_id=firing["run_id"], episode=cluster.cluster_id,
                    summary=f"failure cluster of {cluster.agent_id} quiet since {utc_text(cluster.last_seen)}: "
                            f"\"{cluster.label}\" ({cluster.size} runs)",
                    evidence={**firing["evidence"], "size": cluster.size, "last_seen": cluster.last_seen,
                              "quiet_ms": self.new_quiet_ms}))
        return alerts

    def _new_alert(self, cluster: Cluster) -> dict:
        version = cluster.versions.most_common(1)[0][0]
        evidence = {"condition": "new", "cluster_id": cluster.cluster_id, "label": cluster.label, "size": cluster.size,
                    "min_size": self.min_size, "first_seen": cluster.first_seen, "last_seen": cluster.last_seen,
                    "versions": dict(cluster.versions), "run_ids": list(cluster.example_run_ids),
                    "threshold": self.threshold}
        return make_alert(
            kind=KIND, severity="warning", status=FIRING, fingerprint=fingerprint(KIND, "new", cluster.cluster_id),
            ts=cluster.last_seen, agent_id=cluster.agent_id, agent_version=version,
            run_id=cluster.example_run_ids[-1],
            summary=f"new failure cluster for {cluster.agent_id}: {cluster.size} runs failing as "
                    f"\"{cluster.label}\" since {utc_text(cluster.first_seen)}",
            evidence=evidence, episode=cluster.cluster_id)

    def _spike_alert(self, cluster: Cluster, status: str, numbers: dict) -> dict:
        window_versions = cluster.windows.get(numbers["window_start"]) or Counter()
        version = (window_versions or cluster.versions).most_common(1)[0][0]
        evidence = {"condition": "spike", "cluster_id": cluster.cluster_id, "label": cluster.label, **numbers,
                    "window_ms": self.window_ms, "min_count": self.spike_min_count, "ratio": self.spike_ratio,
                    "p_value_threshold": self.spike_p_value, "versions": dict(window_versions)}
        if status == FIRING:
            summary = (f"failure cluster \"{cluster.label}\" of {cluster.agent_id} is spiking: "
                       f"{numbers['count']} of {numbers['runs_in_window']} runs in {self.window_ms // 60_000} min, "
                       f"{numbers['expected']:.1f} expected")
        else:
            summary = f"failure cluster \"{cluster.label}\" of {cluster.agent_id} is back to normal"
        return make_alert(
            kind=KIND, severity="critical", status=status, fingerprint=fingerprint(KIND, "spike", cluster.cluster_id),
            ts=self.clock_, agent_id=cluster.agent_id, agent_version=version, run_id=cluster.example_run_ids[-1],
            summary=summary, evidence=evidence, episode=str(cluster.spike_since))

