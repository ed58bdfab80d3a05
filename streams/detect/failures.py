"""Failure modes of closed runs across the fleet: masked error signatures, online cosine clustering by
mode key, a per-agent and per-version breakdown, and one `failure_cluster` incident per mode when it
appears or spikes (SPEC §6, tables `failure_clusters` and `failure_cluster_agents`)."""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Collection, Iterable

import numpy as np
import scipy.sparse as sp
from scipy.stats import poisson
from sklearn import config_context
from sklearn.base import BaseEstimator
from sklearn.feature_extraction.text import HashingVectorizer

from streams.contracts.alerts import FIRING, RESOLVED, fingerprint, make_alert, utc_text
from streams.detect.recent import RunMemory, RunSet

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

# How agent frameworks stop a run that goes round in circles: a step or turn budget, an
# iteration or recursion limit (LangGraph's GraphRecursionError, the OpenAI Agents SDK's
# MaxTurnsExceeded, tau-bench's step limit), or Trackside's own loop guard.
_LOOPISH = re.compile(
    r"(?<!event )(?<!event_)\bloop(?:s|ing|_detected)?\b"  # an agent's loop, not asyncio's "event loop"
    r"|step[ _-]?budget|max(?:imum)?[ _-]?(?:steps|turns|iterations)|(?:iteration|recursion|turn|step)s?[ _-]?limit"
    r"|too many (?:steps|iterations|turns)", re.IGNORECASE)
# An exception class at the head of a message: "pydantic_core.ValidationError: ..." -> ValidationError
_CLASS_HEAD = re.compile(r"\s*(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*)\s*:")
_CLASS_SUFFIX = re.compile(r"(?:error|exception)$")

LOOP, TIMEOUT = "loop", "timeout"
# The error class of every exception that says a wait ran out (TimeoutError, ToolTimeout,
# ReadTimeout, asyncio.TimeoutError, tool_timeout, TimedOut): one class, whatever the framework
# calls it; which service timed out is its template's to tell.
TIMEOUT_CLASS = "timeout"


def error_class(error_type: str, message: str) -> str:
    """The error's class, normalised so that spellings of one class meet: the run's error_type,
    else the exception class that heads its message; lower case without separators or a trailing
    "error"/"exception" (RateLimitError, rate_limit and rate_limit_error are all "ratelimit"); a
    class that names a timeout is "timeout" (TimeoutError, ToolTimeout, httpx.ReadTimeout)."""
    name = (error_type or "").strip()
    if not name:
        match = _CLASS_HEAD.match(message or "")
        name = match.group(1) if match else ""
    name = name.rsplit(".", 1)[-1].lower().replace("_", "").replace("-", "").replace(" ", "")
    name = _CLASS_SUFFIX.sub("", name) or name
    return TIMEOUT_CLASS if name.endswith(("timeout", "timedout")) else name


@functools.lru_cache(maxsize=4_096)  # failing runs repeat their errors; each is keyed where it closes and where it is clustered
def mode_key(outcome: str, error_type: str, message: str, loop: bool) -> str:
    """The coarse part of a failure's identity, which every run of one cause shares: "loop" for a
    run stopped for going round in circles (flagged as a loop with no error of its own, or whose
    error says a step budget or iteration limit stopped it), "timeout" for a run that never sent
    run_end, else its outcome and error class ("failure|validation", "escalated|", ...). Runs of
    one key are then clustered by their message's template. The agent, its version and the last
    tool are not in it: they are the evidence of a mode, not its identity.

    Loops, timeouts, escalations and errors never share a key unless their signatures do. The key
    is read from how the run itself ended, never from its tool calls: a tool call's `timeout`
    status is evidence (`tool_errors`), like the last tool. A run that never sent run_end is
    "timeout"; an error it reports whose class names a timeout (TimeoutError, ToolTimeout,
    asyncio.TimeoutError, ReadTimeout, "timeout") is "failure|timeout" (with its outcome: an
    escalation after a timeout is "escalated|timeout"), so the two never meet; and a timeout
    error is never a loop for words in its message ("timed out in the polling loop"): its class
    says what stopped it. A loop flag on a run that has an error of its own (a retried timeout
    the loop detector caught) does not make it a loop either."""
    cls = error_class(error_type, message)
    if _LOOPISH.search(error_type or "") or (cls != TIMEOUT_CLASS and _LOOPISH.search((message or "")[:200])):
        return LOOP
    if loop and not error_type and not message:
        return LOOP
    if outcome == "timeout" and not error_type and not message:
        return TIMEOUT
    return f"{outcome}|{cls}"


def _fields(run: dict) -> tuple[str, str, str, str, str]:
    """(mode key, template, outcome, error type, last tool) of a failed run."""
    error_type, message = run.get("error_type") or "", run.get("error_message") or ""
    path = run.get("tool_path") or []
    outcome = run.get("outcome") or ""
    return (mode_key(outcome, error_type, message, bool(run.get("loop_detected"))), mask(message), outcome,
            error_type, path[-1] if path else "")


def signature(run: dict) -> str:
    """A failed run's signature as one line: its mode key and the template of its error message."""
    key, template, *_ = _fields(run)
    return f"{key} | {template or '-'}"


ID_WORDS = 6  # words of a template a mode's id is made of, at most
_ID_CLAUSE_WORDS = 3  # after this many, the end of a clause ends them (what follows is detail or free text)
_ID_TOKEN = re.compile(r"(?P<stop>[.:;!?](?=\s|$)|\s[-\u2013\u2014]\s)|(?P<word><\w+>|[^\s\[\](){}<>,;:=.!?'\"]+)")
# pydantic's location of an error, in a template: the name after "validation error(s) for Model" or
# after an error's "[type=...]", before its capitalised message ("email Field required")
_PYDANTIC_FIELD = re.compile(r"(validation errors? for \S+|\]) [\w.\[\]-]+ (?=[A-Z][a-z])")
_NOT_A_WORD = re.compile(r"[\d_/\\@#$%&*+|~^`]|[a-z][A-Z]")


def id_words(text: str) -> str:
    """What a mode's id is made of besides its key: the first `ID_WORDS` words of a run's text
    (its template without the class at its head, `FailureClusterer._text`), up to the end of its
    first clause once there are three; lower case, leaving out placeholders, single letters and
    what reads as a name or code rather than a word (digits, underscores, inner capitals, all
    capitals: `customer_id`, `CreateOrder`, `gpt-4o`, `BAAEEC`, `HTTP`, paths). Runs of one cause differ in ids, numbers, names, the spelling
    of their class and text appended after the message, so they share these words, and a mode's id
    does not depend on which of its runs came first. A name that is a plain word within the first
    words (other than a pydantic error's field) still gives another id (counted by
    jobs.evaluate_modes)."""
    words: list[str] = []
    for token in _ID_TOKEN.finditer(_PYDANTIC_FIELD.sub(r"\1 <field> ", text)):
        word = token.group("word")
        if word is None:
            if len(words) >= _ID_CLAUSE_WORDS:
                break
        elif (word[0] != "<" and len(word) > 1 and not word.isupper() and not _NOT_A_WORD.search(word)
              and any(c.isalpha() for c in word)):
            words.append(word.lower())
            if len(words) == ID_WORDS:
                break
    return " ".join(words) or text


def mode_id(key: str, text: str) -> str:
    """The id of a mode its run of this key and text opens: `fc-` + a hash of the key and
    `id_words(text)`, what every run of a cause shares, so the id does not depend on which of them
    came first (a second mode of the key with the same words gets `-2`)."""
    return "fc-" + hashlib.sha1(f"{key}|{id_words(text)}".encode()).hexdigest()[:12]


def first_mode_id(run: dict) -> str:
    """The id a failed run would give the mode it opens (`mode_id` of its key and text)."""
    key, template, *_ = _fields(run)
    return mode_id(key, FailureClusterer._text(key, template))


def _label(key: str, template: str, outcome: str, error_type: str) -> str:
    """What a reader sees: the error type and masked template, and the outcome."""
    head = f"{error_type}: {template}" if error_type and not template.startswith(error_type) else template
    head = head or "no error message"
    return f"loop, {head} ({outcome})" if key == LOOP else f"{head} ({outcome})"


def is_failed(run: dict) -> bool:
    return run.get("outcome") != "success"


# --- modes ------------------------------------------------------------------------------------

_MAX_TEMPLATES = 32  # distinct member labels counted per mode, for its label
_REMEMBERED_RUNS = 100_000  # run ids kept (at least) to recognise a redelivered run
_REMEMBERED_VECTORS = 4_096  # template vectors kept: failures repeat a few dozen templates


@dataclass(slots=True)
class Slice:
    """One agent version's part of a mode."""

    runs: int = 0
    first_seen: int = 0
    last_seen: int = 0


@dataclass(slots=True)
class Cluster:
    """A failure mode: every failed run of one root cause, whichever agent, version or tool."""

    cluster_id: str
    key: str  # mode_key of its runs
    seed: str  # the template of its first run, its centroid after a restart (its id: `id_words`)
    row: int  # of its key's centroid matrix
    first_seen: int
    last_seen: int
    size: int = 0
    example_run_ids: list[str] = field(default_factory=list)
    templates: Counter = field(default_factory=Counter)  # labels of its runs
    slices: dict[tuple[str, str], Slice] = field(default_factory=dict)  # (agent, version) -> its part
    windows: dict[int, Counter] = field(default_factory=dict)  # window start -> (agent, version) -> runs
    changed: set[tuple[str, str]] = field(default_factory=set)  # slices changed since the last rows
    new_done: bool = False  # the "new" condition was reached (alerted, or learned silently)
    incident: dict | None = None  # the firing incident alert (new or spike), as last sent
    spike_since: int | None = None  # window start of the spike that is firing

    @property
    def label(self) -> str:
        return self.templates.most_common(1)[0][0] if self.templates else ""

    @property
    def agent_id(self) -> str:
        """The agent that failed first in this mode (the `agent_id` of its row)."""
        return min(self.slices.items(), key=lambda kv: (kv[1].first_seen, kv[0]))[0][0] if self.slices else ""

    def agents(self) -> dict[str, dict[str, int]]:
        """agent -> version -> runs."""
        out: dict[str, dict[str, int]] = {}
        for (agent, version), part in sorted(self.slices.items()):
            out.setdefault(agent, {})[version] = part.runs
        return out

    def count(self, window: int) -> int:
        counts = self.windows.get(window)
        return sum(counts.values()) if counts else 0

    def row_dict(self, updated_at: int) -> dict:
        return {"cluster_id": self.cluster_id, "agent_id": self.agent_id, "label": self.label,
                "size": self.size, "first_seen": self.first_seen, "last_seen": self.last_seen,
                "example_run_ids": list(self.example_run_ids), "updated_at": updated_at,
                "kind": self.key, "seed_signature": self.seed, "agents": sorted({a for a, _ in self.slices})}

    def breakdown_rows(self, updated_at: int, changed_only: bool = True) -> list[dict]:
        keys = sorted(self.changed) if changed_only else sorted(self.slices)
        return [{"cluster_id": self.cluster_id, "agent_id": agent, "agent_version": version,
                 "runs": self.slices[(agent, version)].runs, "first_seen": self.slices[(agent, version)].first_seen,
                 "last_seen": self.slices[(agent, version)].last_seen, "updated_at": updated_at}
                for agent, version in keys]


@dataclass
class ModeUpdate:
    """What learning a batch of runs gave."""

    rows: list[dict]  # changed `failure_clusters` rows
    breakdown: list[dict]  # changed `failure_cluster_agents` rows
    alerts: list[dict]
    assigned: dict[str, str]  # run_id -> cluster_id


def _row(matrix: sp.csr_matrix, i: int) -> tuple[np.ndarray, np.ndarray]:
    # slicing indptr directly: a CSR row as a matrix costs more than the whole placement
    start, end = matrix.indptr[i], matrix.indptr[i + 1]
    return matrix.indices[start:end], matrix.data[start:end]


class _Centroids:
    """Sums of unit vectors per mode of one key, dense over the features that key has used."""

    def __init__(self) -> None:
        self.columns: dict[int, int] = {}  # hashed feature -> column
        self.sums = np.zeros((4, 64))
        self.norms = np.zeros(4)
        self.k = 0
        self.placed: dict[str, np.ndarray] = {}  # template -> the columns of its features, once all have one

    def similarities(self, features: np.ndarray, values: np.ndarray, template: str | None = None) -> np.ndarray:
        """Cosine of a unit vector with each centroid."""
        if self.k == 0:
            return np.zeros(0)
        cols = self.placed.get(template)
        if cols is not None:
            return self.sums[: self.k, cols] @ values / self.norms[: self.k]
        cols = np.fromiter((self.columns.get(f, -1) for f in features.tolist()), np.int64, len(features))
        known = cols >= 0
        dots = self.sums[: self.k, cols[known]] @ values[known]
        return dots / self.norms[: self.k]

    def add(self, row: int, features: np.ndarray, values: np.ndarray, template: str | None = None) -> None:
        if row == self.k:
            if row == self.sums.shape[0]:
                self.sums = np.vstack([self.sums, np.zeros_like(self.sums)])
                self.norms = np.concatenate([self.norms, np.zeros_like(self.norms)])
            self.k += 1
        cols = self.placed.get(template)
        if cols is None:
            cols = np.array([self._column(f) for f in features.tolist()], np.int64)
            if template is not None:
                self.placed[template] = cols
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
    """Online clustering of failed runs into failure modes across the fleet, with incident alerts.

    A failed run (outcome != "success") is keyed by `mode_key` (loop, timeout, or its outcome and
    error class) and, among the modes of its key, joins the one whose centroid is most similar to
    its message template (cosine of hashed word 1-2-grams) when that is at least `threshold`,
    else opens a new mode. Loop and timeout keys hold one mode each. Its agent, version and last
    tool are counted in the mode's breakdown, never used to place it. Mode ids are a hash of the
    key and the first member's template, so they never change as modes grow, do not depend on
    which agent failed first, and a replay in the same order gives the same ids; `restore` puts
    stored modes back after a restart. Time is event time (`ended_at`); windows are `window_ms`
    long.

    One incident alert per mode (fingerprint of the mode): when it reaches `min_size` runs
    ("new") or spikes against its own traffic-scaled history ("spike"); sent again with the same
    fingerprint (a new alert id) each time a new agent joins it while it fires; resolved once the
    mode is quiet (no run for `new_quiet_ms` after "new", a window without a spike after "spike").
    """

    def __init__(self, threshold: float = 0.5, window_ms: int = 300_000, min_size: int = 3,
                 history_windows: int = 12, min_history_windows: int = 3, spike_min_count: int = 5,
                 spike_ratio: float = 3.0, spike_p_value: float = 1e-3, spike_floor: float = 0.2,
                 max_examples: int = 5, warmup_ms: int = 0, n_features: int = 2**20,
                 new_quiet_ms: int = 3_600_000) -> None:
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
        self.n_features = n_features
        # a "new mode" incident resolves once the mode has had no run for this long
        self.new_quiet_ms = new_quiet_ms

    # -- vectors --

    def transform(self, runs: list[dict]) -> sp.csr_matrix:
        """Unit-norm template vectors; stateless, so the same run maps to the same vector after a restart."""
        return self._vectorise([self._text(*_fields(run)[:2]) for run in runs])

    @staticmethod
    def _text(key: str, template: str) -> str:
        """What is compared within a key: the template without the exception class at its head (the
        key holds the class, and a long module path would make two causes of one class look alike).
        A loop or a run that never ended is one mode whatever its message; no message is a word of its own."""
        if key in (LOOP, TIMEOUT):
            return f"<{key}>"
        head = _CLASS_HEAD.match(template)
        if head is not None and error_class(head.group(1), "") == key.partition("|")[2]:
            template = template[head.end():]
        return template.strip() or "<empty>"

    def _vectorise(self, texts: list[str]) -> sp.csr_matrix:
        text = HashingVectorizer(n_features=self.n_features, token_pattern=r"<\w+>|\w\w+", ngram_range=(1, 2),
                                 norm="l2", alternate_sign=False)
        # The inputs are ours and finite: sklearn's per-call validation was a third of the cost.
        with config_context(assume_finite=True, skip_parameter_validation=True):
            return text.transform(texts)

    def _vectors(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each text's vector as (features, values): those of `_vectorise`, whose rows do not
        depend on each other, so a text seen before is not vectorised again."""
        known = self.vectors_
        new = [t for t in dict.fromkeys(texts) if t not in known]
        if new:
            matrix = self._vectorise(new)
            for i, t in enumerate(new):
                features, values = _row(matrix, i)
                known[t] = (features.copy(), values.copy())
        vectors = [known[t] for t in texts]
        while len(known) > _REMEMBERED_VECTORS:  # the oldest first
            del known[next(iter(known))]
        return vectors

    # -- learning --

    def partial_fit(self, runs: Iterable[dict], y=None) -> FailureClusterer:
        """Learn from closed runs silently: conditions reached here are known and raise no alert later."""
        self._learn(list(runs), emit=False)
        return self

    def update(self, runs: Iterable[dict], now_ms: int | None = None, traffic: dict | None = None
               ) -> tuple[list[dict], list[dict], dict[str, str]]:
        """Learn from closed runs; returns (changed `failure_clusters` rows, alerts, run_id -> cluster_id)."""
        out = self.update_modes(runs, now_ms, traffic)
        return out.rows, out.alerts, out.assigned

    def update_modes(self, runs: Iterable[dict], now_ms: int | None = None, traffic: dict | None = None,
                     emit: bool = True) -> ModeUpdate:
        """Learn from closed runs: the changed rows of `failure_clusters` and of its breakdown
        `failure_cluster_agents`, alerts, and run_id -> cluster_id.

        `traffic`: agent -> window start -> runs closed in it so far (counts that only grow),
        when the runs given are only the failed ones; without it, the runs given (successes
        too) are the traffic. `now_ms` (wall clock) becomes the rows' `updated_at`; without it,
        the event-time clock. `emit=False` learns silently.
        """
        self._ensure_state()
        if traffic:
            self.count_traffic(traffic)
        touched, alerts, assigned = self._learn(list(runs), emit=emit, count=traffic is None)
        if traffic:
            # Runs closed anywhere in the fleet move event time on, as the successes given without
            # traffic do: a mode that no run fails any more is then quiet, and its incident
            # resolves, even when no failed run comes to this partition again.
            newest = max((int(w) for windows in traffic.values() for w, n in windows.items() if n), default=0)
            if newest:
                alerts += self._tick(newest, {}, emit)
        updated_at = self.clock_ if now_ms is None else now_ms
        rows, breakdown = [], []
        for cid in touched:
            cluster = self.clusters_[cid]
            rows.append(cluster.row_dict(updated_at))
            breakdown += cluster.breakdown_rows(updated_at)
            cluster.changed.clear()
        return ModeUpdate(rows, breakdown, alerts, assigned)

    def count_traffic(self, traffic: dict) -> None:
        """Closed runs per agent and window, as counted where they closed (they only grow)."""
        self._ensure_state()
        for agent, windows in traffic.items():
            mine = self.traffic_.setdefault(agent, {})
            for window, runs in windows.items():
                window = int(window)
                if runs > mine.get(window, 0):
                    mine[window] = runs
            self._forget_old(mine)

    def predict(self, runs: Iterable[dict]) -> list[str]:
        """The mode each run would join now ("" for a success or when none is near enough); learns nothing."""
        runs = list(runs)
        self._ensure_state()
        out = [""] * len(runs)
        failed = [i for i, run in enumerate(runs) if is_failed(run)]
        if not failed:
            return out
        fields = [_fields(runs[i]) for i in failed]
        matrix = self._vectorise([self._text(f[0], f[1]) for f in fields])
        for n, i in enumerate(failed):
            known = self.seen_runs_.get(runs[i]["run_id"])
            if known:
                out[i] = known
                continue
            space = self.centroids_.get(fields[n][0])
            if space is not None and space.k:
                sims = space.similarities(*_row(matrix, n))
                best = int(np.argmax(sims))
                if sims[best] >= self.threshold:
                    out[i] = self.rows_[fields[n][0]][best]
        return out

    def cluster_rows(self, updated_at: int | None = None) -> list[dict]:
        """Every mode's `failure_clusters` row."""
        self._ensure_state()
        stamp = self.clock_ if updated_at is None else updated_at
        return [cluster.row_dict(stamp) for cluster in self.clusters_.values()]

    def breakdown(self, updated_at: int | None = None) -> list[dict]:
        """Every mode's `failure_cluster_agents` rows."""
        self._ensure_state()
        stamp = self.clock_ if updated_at is None else updated_at
        return [row for cluster in self.clusters_.values() for row in cluster.breakdown_rows(stamp, changed_only=False)]

    def restore(self, modes: Iterable[dict], breakdown: Iterable[dict] = ()) -> FailureClusterer:
        """Put back modes as stored (`failure_clusters` rows with `kind` and `seed_signature`, and
        their `failure_cluster_agents` rows), oldest first, before the runs of the history are
        learned again: they keep their ids and lifetime counts, and a run of the history that was
        already in one (its stored `failure_cluster_id`) is not counted twice."""
        self._ensure_state()
        parts: dict[str, list[dict]] = {}
        for row in breakdown:
            parts.setdefault(row["cluster_id"], []).append(row)
        for row in sorted(modes, key=lambda r: (r["first_seen"], r["cluster_id"])):
            cid, key, seed = row["cluster_id"], row.get("kind") or "", row.get("seed_signature") or ""
            if cid in self.clusters_ or not key:
                continue
            space = self._space(key)
            cluster = Cluster(cid, key, seed, space.k, int(row["first_seen"]), int(row["last_seen"]),
                              size=int(row["size"]), example_run_ids=list(row["example_run_ids"])[: self.max_examples])
            cluster.templates[row["label"]] = 1
            cluster.new_done = cluster.size >= self.min_size
            for part in parts.get(cid, ()):
                cluster.slices[(part["agent_id"], part["agent_version"])] = Slice(
                    int(part["runs"]), int(part["first_seen"]), int(part["last_seen"]))
            self.clusters_[cid] = cluster
            self.rows_[key].append(cid)
            features, values = self._vectors([self._text(key, seed)])[0]
            space.add(cluster.row, features, values, self._text(key, seed))
            self.restored_.add(cid)
        return self

    def restore_incidents(self, alerts: Iterable[dict], sent: Collection[str] = ()) -> FailureClusterer:
        """Put back the incidents still open after a restart, from the `failure_cluster` alerts as
        sent (`alerts` rows, evidence as a dict), once the modes are restored and their history
        learnt again. An incident is an episode of a mode's fingerprint (`evidence.episode`: its
        firing, the updates sent as it spread or escalated, and its `resolved` share it); it is open
        when no `resolved` of that episode was sent. The last of its alerts sent (escalated after
        new, more agents after fewer, then later) becomes the mode's firing incident as it was, so
        that a new agent updates it with the same fingerprint, a quiet mode resolves it, and no new
        one is opened. Alerts of modes not held here are ignored.

        `sent`: ids of the alerts already out. A mode of `min_size` runs, stored or made by the
        history just learnt, whose "new" incident is not among them sends it with the next update,
        unless it is quiet already: the partition was rebuilt before that incident went out (its
        failed runs, or its row too, had landed; the silent replay of the history reached the size
        and would otherwise have swallowed the incident for good)."""
        self._ensure_state()
        modes = {fingerprint(KIND, cid): cluster for cid, cluster in self.clusters_.items()}
        episodes: dict[tuple[str, str], list[dict]] = {}
        for alert in alerts:
            episode = (alert.get("evidence") or {}).get("episode")
            if alert.get("kind", KIND) == KIND and alert["fingerprint"] in modes and episode is not None:
                episodes.setdefault((alert["fingerprint"], episode), []).append(alert)

        def sent_after(alert: dict) -> tuple:
            evidence = alert["evidence"]
            return evidence.get("condition") == "spike", len(evidence.get("agents") or ()), int(alert["ts"]), alert["alert_id"]

        last: dict[str, dict] = {}
        for (print_, _), episode in episodes.items():
            if any(alert["status"] == RESOLVED for alert in episode):
                continue
            newest = max(episode, key=sent_after)
            if print_ not in last or sent_after(newest) > sent_after(last[print_]):
                last[print_] = newest
        for print_, alert in last.items():
            cluster = modes[print_]
            cluster.incident = {**alert, "ts": int(alert["ts"])}
            cluster.new_done = True
            if {agent for agent, _ in cluster.slices} - set(alert["evidence"].get("agents") or ()):
                # agents that joined it after its last update went out (their runs were in the
                # history, landed before the restart or read back while the partition was rebuilt)
                self.spread_owed_.append(cluster.cluster_id)
            if alert["evidence"].get("condition") == "spike" and cluster.spike_since is None:
                # tested again with the next update: resolved at once if its window is over and quiet
                cluster.spike_since = int(alert["evidence"].get("window_start", self.window_of(int(alert["ts"]))))
            self.recheck_ = True
        for cid, cluster in self.clusters_.items():
            if cluster.new_done and cluster.incident is None and self._warm(cluster) and \
                    self._new_incident_id(cid) not in sent and self.clock_ - cluster.last_seen < self.new_quiet_ms:
                self.owed_.append(cid)
        return self

    def _ensure_state(self) -> None:
        if hasattr(self, "clusters_"):
            return
        self.clusters_: dict[str, Cluster] = {}
        self.centroids_: dict[str, _Centroids] = {}  # mode key -> its modes' centroids
        self.rows_: dict[str, list[str]] = {}  # mode key -> cluster id per centroid row
        self.restored_: set[str] = set()  # modes put back by `restore`
        self.owed_: list[str] = []  # modes of a rebuild whose "new" incident never went out
        self.recheck_ = False  # restored incidents: test whether they are quiet with the next update
        self.spread_owed_: list[str] = []  # restored incidents whose mode has agents they do not list
        self.clock_ = 0  # newest ended_at seen
        self.started_ = None  # first ended_at seen, for the warm-up
        self.traffic_: dict[str, dict[int, int]] = {}  # agent -> window start -> closed runs
        # run_id -> cluster id ("" for a success), for the last _REMEMBERED_RUNS runs (twice that at most)
        self.seen_runs_: RunMemory[str] = RunMemory(slack=_REMEMBERED_RUNS)
        self.seen_count_ = 0  # runs remembered so far
        self.vectors_: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # text -> vector

    def _space(self, key: str) -> _Centroids:
        space = self.centroids_.get(key)
        if space is None:
            space = self.centroids_[key] = _Centroids()
            self.rows_[key] = []
        return space

    def _learn(self, runs: list[dict], emit: bool, count: bool = True) -> tuple[list[str], list[dict], dict[str, str]]:
        self._ensure_state()
        # event-time order, so a batch gives the same modes however it was cut
        runs = sorted(runs, key=lambda r: (r["ended_at"], r["run_id"]))
        failed = [run for run in runs if is_failed(run)]
        fields = [_fields(run) for run in failed]
        texts = [self._text(f[0], f[1]) for f in fields]
        vectors = self._vectors(texts)
        position = {id(run): i for i, run in enumerate(failed)}
        assigned: dict[str, str] = {}
        touched: dict[str, None] = {}
        alerts: list[dict] = []
        for run in runs:
            run_id, ended = run["run_id"], run["ended_at"]
            known = self.seen_runs_.get(run_id)
            if known is not None:  # redelivered: counted once, keeps its mode
                if known:
                    assigned[run_id] = known
                continue
            # the earliest run seen, whatever the order batches of other partitions came in
            self.started_ = ended if self.started_ is None else min(self.started_, ended)
            alerts += self._tick(ended, touched, emit)
            if count:
                traffic = self.traffic_.setdefault(run["agent_id"], {})
                traffic[self.window_of(ended)] = traffic.get(self.window_of(ended), 0) + 1
                self._forget_old(traffic)
            if id(run) not in position:
                self._remember(run_id, "")
                continue
            i = position[id(run)]
            cluster = self._place(run, fields[i], texts[i], *vectors[i])
            assigned[run_id] = cluster.cluster_id
            self._remember(run_id, cluster.cluster_id)
            touched[cluster.cluster_id] = None
            if not cluster.new_done and cluster.size >= self.min_size:
                cluster.new_done = True
                if emit and self._warm(cluster) and cluster.incident is None:
                    cluster.incident = self._incident(cluster, "new", cluster.cluster_id, {})
                    alerts.append(cluster.incident)
            elif emit and cluster.incident is not None and run["agent_id"] not in cluster.incident["evidence"]["agents"]:
                alerts.append(self._spread(cluster, run["agent_id"], run["ended_at"], run["run_id"]))
        alerts += self._check_spikes(touched, emit)
        if emit and self.spread_owed_:  # restored incidents updated with the agents they do not list
            for cid in self.spread_owed_:
                cluster = self.clusters_[cid]
                if cluster.incident is None:
                    continue
                listed = set(cluster.incident["evidence"]["agents"])
                joined = sorted((part.first_seen, agent) for (agent, _), part in cluster.slices.items()
                                if agent not in listed)
                if joined:
                    alerts.append(self._spread(cluster, joined[0][1], joined[0][0], cluster.incident["run_id"]))
            self.spread_owed_ = []
        if emit and self.recheck_:  # incidents restored after a restart: quiet ones resolve now
            alerts += self._check_quiet(emit)
            self.recheck_ = False
        if emit:
            for cid in self.owed_:
                cluster = self.clusters_[cid]
                if cluster.incident is None:
                    cluster.incident = self._incident(cluster, "new", cid, {})
                    alerts.append(cluster.incident)
            self.owed_ = []
        return list(touched), alerts, assigned

    def _warm(self, cluster: Cluster) -> bool:
        """Whether the mode began after the warm-up (without one, every mode is new: the earliest
        run seen so far may come from a partition whose batch arrived after the mode's first runs)."""
        return self.warmup_ms <= 0 or (self.started_ is not None and cluster.first_seen - self.started_ >= self.warmup_ms)

    def _tick(self, ts: int, touched: dict[str, None], emit: bool) -> list[dict]:
        """Move the event-time clock to `ts`; when that closes a window, judge spikes and quiet
        modes as of then, before `ts` opens the next one."""
        alerts = []
        if self.clock_ and self.window_of(ts) > self.window_of(self.clock_):
            # every window before the one `ts` opens is closed: a mode is quiet as of its start
            # (a batch that moves the clock by an hour at once resolves what that hour made quiet)
            alerts = self._check_spikes(touched, emit) + self._check_quiet(emit, as_of=self.window_of(ts))
        self.clock_ = max(self.clock_, ts)
        return alerts

    def _place(self, run: dict, run_fields: tuple, text: str, features: np.ndarray, values: np.ndarray) -> Cluster:
        key, template, outcome, error_type, _ = run_fields
        space = self._space(key)
        sims = space.similarities(features, values, text)
        best = int(np.argmax(sims)) if len(sims) else -1
        ended = run["ended_at"]
        if best >= 0 and sims[best] >= self.threshold:
            cluster = self.clusters_[self.rows_[key][best]]
        else:
            cluster = Cluster(self._new_id(key, text), key, template, space.k, ended, ended)
            self.clusters_[cluster.cluster_id] = cluster
            self.rows_[key].append(cluster.cluster_id)
        space.add(cluster.row, features, values, text)
        agent, version = run["agent_id"], run.get("agent_version") or ""
        if cluster.cluster_id in self.restored_ and run.get("failure_cluster_id") == cluster.cluster_id:
            # counted in the stored mode already: its centroid and recent windows learn it again
            cluster.windows.setdefault(self.window_of(ended), Counter())[(agent, version)] += 1
            self._forget_old(cluster.windows)
            return cluster
        cluster.size += 1
        cluster.first_seen = min(cluster.first_seen, ended)
        cluster.last_seen = max(cluster.last_seen, ended)
        if len(cluster.example_run_ids) < self.max_examples:
            cluster.example_run_ids.append(run["run_id"])
        label = _label(key, template, outcome, error_type)
        if label in cluster.templates or len(cluster.templates) < _MAX_TEMPLATES:
            cluster.templates[label] += 1
        part = cluster.slices.get((agent, version))
        if part is None:
            part = cluster.slices[(agent, version)] = Slice(0, ended, ended)
        part.runs += 1
        part.first_seen, part.last_seen = min(part.first_seen, ended), max(part.last_seen, ended)
        cluster.changed.add((agent, version))
        cluster.windows.setdefault(self.window_of(ended), Counter())[(agent, version)] += 1
        self._forget_old(cluster.windows)
        return cluster

    def _forget_old(self, windows: dict) -> None:
        # windows older than the history the spike test looks at are not needed again
        oldest = self.window_of(self.clock_) - (self.history_windows + 2) * self.window_ms
        if len(windows) > self.history_windows + 4:
            for start in [w for w in windows if w < oldest]:
                del windows[start]

    def _new_id(self, key: str, text: str) -> str:
        base = mode_id(key, text)
        cid, n = base, 1
        while cid in self.clusters_:  # the same first template twice in one key: keep both ids distinct
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

    def _spike_test(self, cluster: Cluster, window: int, current: bool) -> dict | None:
        """Evidence that `window` holds far more of the mode's runs than its history predicts, or None.

        The expectation is the mode's share of its agents' closed runs over the trailing windows
        times those agents' runs in this window, so a burst of traffic alone is not a spike. The
        window still going on counts its traffic as at least the history's mean: traffic routed
        from other partitions may not all have arrived yet.
        """
        first = self.window_of(cluster.first_seen)
        history = [window - i * self.window_ms for i in range(1, self.history_windows + 1)]
        history = [w for w in history if w >= first]
        if len(history) < self.min_history_windows:
            return None  # too young to have a normal rate; the "new" condition covers it
        count = cluster.count(window)
        if count < self.spike_min_count:
            return None
        agents = {agent for agent, _ in cluster.slices}
        traffic = [self.traffic_.get(agent, {}) for agent in agents]
        history_runs = sum(t.get(w, 0) for t in traffic for w in history)
        runs_now = sum(t.get(window, 0) for t in traffic)
        if current:
            runs_now = max(runs_now, history_runs / len(history))
        runs_now = max(runs_now, count)
        history_count = sum(cluster.count(w) for w in history)
        rate = history_count / history_runs if history_runs else 0.0
        expected = max(rate * runs_now, self.spike_floor)
        if count < self.spike_ratio * expected:
            return None
        p_value = float(poisson.sf(count - 1, expected))
        if p_value > self.spike_p_value:
            return None
        window_versions: dict[str, dict[str, int]] = {}
        for (agent, version), n in sorted(cluster.windows[window].items()):
            window_versions.setdefault(agent, {})[version] = n
        return {"window_start": window, "window_end": window + self.window_ms, "count": count,
                "window_versions": window_versions,
                "runs_in_window": round(runs_now), "expected": expected, "baseline_share": rate,
                "baseline_mean": history_count / len(history), "baseline_windows": len(history),
                "p_value": p_value}

    def _check_spikes(self, touched: dict[str, None], emit: bool) -> list[dict]:
        current = self.window_of(self.clock_)
        alerts = []
        candidates = set(touched) | {cid for cid, c in self.clusters_.items() if c.spike_since is not None}
        for cid in sorted(candidates):
            cluster = self.clusters_[cid]
            # the window just closed counts too, so a spike does not clear the moment a window opens
            evidence = (self._spike_test(cluster, current, True)
                        or self._spike_test(cluster, current - self.window_ms, False))
            if evidence is not None and cluster.spike_since is None:
                cluster.spike_since = evidence["window_start"]
                if emit and cluster.incident is None:
                    cluster.incident = self._incident(cluster, "spike", f"spike:{cluster.spike_since}", evidence)
                    alerts.append(cluster.incident)
                elif emit:  # a new mode that now spikes: its incident again, critical, with the spike's numbers
                    alerts.append(self._escalate(cluster, evidence))
            elif evidence is None and cluster.spike_since is not None:
                cluster.spike_since = None
                firing = cluster.incident
                if firing is not None and firing["evidence"]["condition"] == "spike":
                    cluster.incident = None
                    if emit:
                        alerts.append(self._resolved(cluster, firing, {
                            "window_start": current, "window_end": current + self.window_ms,
                            "count": cluster.count(current)}, "is back to its usual rate"))
        return alerts

    def _check_quiet(self, emit: bool, as_of: int | None = None) -> list[dict]:
        """Resolve the "new mode" incidents of modes with no run for `new_quiet_ms` before `as_of`
        (event time, ms; the clock by default)."""
        as_of = self.clock_ if as_of is None else as_of
        alerts = []
        for cid in sorted(self.clusters_):
            cluster = self.clusters_[cid]
            firing = cluster.incident
            if firing is None or firing["evidence"]["condition"] != "new" or \
                    as_of - cluster.last_seen < self.new_quiet_ms:
                continue
            cluster.incident = None
            if emit:
                alerts.append(self._resolved(cluster, firing, {"last_seen": cluster.last_seen,
                                                               "quiet_ms": self.new_quiet_ms},
                                             f"quiet since {utc_text(cluster.last_seen)}"))
        return alerts

    def _evidence(self, cluster: Cluster) -> dict:
        agents = cluster.agents()
        return {"cluster_id": cluster.cluster_id, "label": cluster.label, "kind": cluster.key, "size": cluster.size,
                "first_seen": cluster.first_seen, "last_seen": cluster.last_seen,
                "agents": sorted(agents), "versions": agents,
                "runs_by_agent": {agent: sum(v.values()) for agent, v in agents.items()},
                "run_ids": list(cluster.example_run_ids)}

    @staticmethod
    def _who(evidence: dict) -> str:
        agents = evidence["agents"]
        return agents[0] if len(agents) == 1 else f"{len(agents)} agents ({', '.join(agents)})"

    @staticmethod
    def _new_incident_id(cluster_id: str) -> str:
        """The alert id of a mode's "new" incident (its episode is the mode)."""
        return make_alert(kind=KIND, severity="warning", status=FIRING, fingerprint=fingerprint(KIND, cluster_id),
                          ts=0, agent_id="", summary="", evidence={}, episode=cluster_id)["alert_id"]

    def _incident(self, cluster: Cluster, condition: str, episode: str, numbers: dict) -> dict:
        """The firing incident of a mode: the agent that failed first in it and its version name the
        alert (they stay the same as it spreads, so an alert receiver sees one alert); the evidence
        lists every agent and version."""
        evidence = {"condition": condition, **self._evidence(cluster), "min_size": self.min_size,
                    "threshold": self.threshold, **numbers, "episode": episode}
        if condition == "spike":
            evidence.update(window_ms=self.window_ms, min_count=self.spike_min_count, ratio=self.spike_ratio,
                            p_value_threshold=self.spike_p_value)
            summary = (f"failure mode \"{cluster.label}\" is spiking in {self._who(evidence)}: "
                       f"{numbers['count']} runs in {self.window_ms // 60_000} min, {numbers['expected']:.1f} expected")
        else:
            summary = (f"new failure mode in {self._who(evidence)}: {cluster.size} runs failing as "
                       f"\"{cluster.label}\" since {utc_text(cluster.first_seen)}")
        agent = cluster.agent_id
        version = min((v for (a, v), part in cluster.slices.items() if a == agent),
                      key=lambda v: cluster.slices[(agent, v)].first_seen, default="")
        return make_alert(
            kind=KIND, severity="critical" if condition == "spike" else "warning", status=FIRING,
            fingerprint=fingerprint(KIND, cluster.cluster_id), ts=self.clock_ if condition == "spike" else cluster.last_seen,
            agent_id=agent, agent_version=version, run_id=cluster.example_run_ids[-1], summary=summary,
            evidence=evidence, episode=episode)

    def _spread(self, cluster: Cluster, agent: str, at: int, run_id: str) -> dict:
        """The incident again, same fingerprint, when a new agent fails in the mode while it fires
        (`agent`'s run `run_id` ended `at`): a new alert id (the episode and the number of agents),
        the evidence with every agent."""
        firing = cluster.incident
        evidence = {**firing["evidence"], **self._evidence(cluster), "spread_to": agent, "spread_at": at}
        episode = f"{evidence['episode']}+{len(evidence['agents'])}"
        summary = (f"failure mode \"{cluster.label}\" spread to {agent}: "
                   f"{cluster.size} runs in {self._who(evidence)}")
        cluster.incident = make_alert(
            kind=KIND, severity=firing["severity"], status=FIRING, fingerprint=firing["fingerprint"], ts=at,
            agent_id=firing["agent_id"], agent_version=firing["agent_version"], run_id=run_id, summary=summary,
            evidence=evidence, episode=episode)
        return cluster.incident

    def _escalate(self, cluster: Cluster, numbers: dict) -> dict:
        """The incident of a new mode again, same fingerprint, when the mode spikes while it fires:
        critical from then on, and it resolves when the spike is over."""
        firing = cluster.incident
        evidence = {**firing["evidence"], **self._evidence(cluster), **numbers, "condition": "spike",
                    "window_ms": self.window_ms, "min_count": self.spike_min_count, "ratio": self.spike_ratio,
                    "p_value_threshold": self.spike_p_value}
        summary = (f"failure mode \"{cluster.label}\" is spiking in {self._who(evidence)}: "
                   f"{numbers['count']} runs in {self.window_ms // 60_000} min, {numbers['expected']:.1f} expected")
        cluster.incident = make_alert(
            kind=KIND, severity="critical", status=FIRING, fingerprint=firing["fingerprint"], ts=self.clock_,
            agent_id=firing["agent_id"], agent_version=firing["agent_version"], run_id=cluster.example_run_ids[-1],
            summary=summary, evidence=evidence, episode=f"{evidence['episode']}:spike:{numbers['window_start']}")
        return cluster.incident

    def _resolved(self, cluster: Cluster, firing: dict, numbers: dict, why: str) -> dict:
        evidence = {**firing["evidence"], **self._evidence(cluster), **numbers}
        return make_alert(
            kind=KIND, severity=firing["severity"], status=RESOLVED, fingerprint=firing["fingerprint"], ts=self.clock_,
            agent_id=firing["agent_id"], agent_version=firing["agent_version"], run_id=firing["run_id"],
            summary=f"failure mode \"{cluster.label}\" {why} ({cluster.size} runs in {self._who(evidence)})",
            evidence=evidence, episode=firing["evidence"]["episode"])


class TrafficCounts:
    """Closed runs per agent and window where they close (a metrics partition), each run once, for
    the spike tests of the failure modes, which live in other partitions: `counts` are totals that
    only grow, so a count sent twice or late does no harm."""

    def __init__(self, window_ms: int, keep_windows: int = 16) -> None:
        self.window_ms = window_ms
        self.keep_windows = keep_windows
        self.runs: dict[tuple[str, int], RunSet] = {}  # (agent, window start) -> its runs
        self.newest = 0

    def window_of(self, ts: int) -> int:
        return ts - ts % self.window_ms

    def add(self, runs: Iterable[dict]) -> set[tuple[str, int]]:
        """Count closed runs; the (agent, window) pairs they fell in."""
        touched = set()
        newest = self.newest
        for row in runs:
            key = (row["agent_id"], self.window_of(row["ended_at"]))
            counted = self.runs.get(key)
            if counted is None:
                counted = self.runs[key] = RunSet()
            counted.add(row["run_id"])
            touched.add(key)
            self.newest = max(self.newest, key[1])
        if self.newest > newest:  # a window is over: its runs go compact
            for key, counted in self.runs.items():
                if key[1] < self.newest:
                    counted.seal()
        oldest = self.newest - self.keep_windows * self.window_ms
        if len(self.runs) > 4 * len(touched) + 64:
            for key in [k for k in self.runs if k[1] < oldest]:
                del self.runs[key]
        return touched

    def counts(self, pairs: Iterable[tuple[str, int]]) -> dict[str, dict[str, int]]:
        """agent -> window start (text, as JSON keys are) -> runs, for the pairs still held."""
        out: dict[str, dict[str, int]] = {}
        for agent, window in pairs:
            runs = self.runs.get((agent, window))
            if runs:
                out.setdefault(agent, {})[str(window)] = len(runs)
        return out
