"""Event-time tumbling windows per agent and version: closed runs -> `agent_metrics` rows.
When a window is final (watermarks, idle upstreams): streams/detect/README.md, "Windows and watermarks"."""

from __future__ import annotations

from array import array
from bisect import bisect_left, insort
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import orjson

from streams.detect.estimators import quantile, ratio
from streams.detect.governance import guardrail_acted


_COUNTS = 7  # what a run adds to a window's counts: success, timeout, loop, tool calls, tool errors, input and output tokens


@dataclass(slots=True, frozen=True)
class RunGovernance:
    """What a run adds to its window's governance columns; only runs that have any keep one."""

    policy_hits: dict[str, int]
    guardrail: bool  # a guardrail acted: a hit warned, redacted or blocked
    approvals: tuple[int, int, int, int]  # requested, granted, denied, expired
    waits: tuple[float, ...]
    feedback_count: int
    feedback_sum: float
    escalation: tuple[int, float] | None  # (steps, seconds) before it, if the run ended escalated

    def packed(self) -> bytes:
        """The facts as ~60 bytes of JSON (`unpack` gives them back, floats exactly)."""
        return orjson.dumps((self.policy_hits, self.guardrail, self.approvals, self.waits, self.feedback_count,
                             self.feedback_sum, self.escalation))

    @classmethod
    def unpack(cls, data: bytes) -> RunGovernance:
        hits, guardrail, approvals, waits, count, total, escalation = orjson.loads(data)
        return cls(hits, guardrail, tuple(approvals), tuple(waits), count, total,
                   tuple(escalation) if escalation is not None else None)

    @classmethod
    def of(cls, row: dict) -> RunGovernance | None:
        hits = row.get("policy_hits") or {}
        approvals = tuple(int(row.get(f"approvals_{status}") or 0) for status in ("requested", "granted", "denied", "expired"))
        feedback = int(row.get("feedback_count") or 0)
        escalated = row["outcome"] == "escalated"
        if not (hits or any(approvals) or feedback or escalated):
            return None
        return cls(
            dict(hits), guardrail_acted(row), approvals,
            tuple(row.get("approval_waits_ms") or ()), feedback, feedback * float(row.get("feedback_score") or 0.0),
            (int(row["steps"]), float(row["duration_ms"]) / 1000) if escalated else None)


@dataclass(slots=True)
class GovernanceTotals:
    """The governance facts of many runs added up: what a window keeps of its sealed runs."""

    hits: dict[str, int] = field(default_factory=dict)
    guardrail_runs: int = 0
    approvals: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    waits: list[float] = field(default_factory=list)
    feedback_count: int = 0
    feedback_sum: float = 0.0
    steps: list[float] = field(default_factory=list)  # of the escalated runs
    seconds: list[float] = field(default_factory=list)

    def add(self, fact: RunGovernance) -> None:
        for key, count in fact.policy_hits.items():
            self.hits[key] = self.hits.get(key, 0) + count
        self.guardrail_runs += fact.guardrail
        for i, count in enumerate(fact.approvals):
            self.approvals[i] += count
        self.waits += fact.waits
        self.feedback_count += fact.feedback_count
        self.feedback_sum += fact.feedback_sum
        if fact.escalation is not None:
            self.steps.append(fact.escalation[0])
            self.seconds.append(fact.escalation[1])

    def remove(self, fact: RunGovernance) -> None:
        """Take back what `add` added of `fact`."""
        for key, count in fact.policy_hits.items():
            left = self.hits[key] - count
            if left:
                self.hits[key] = left
            else:
                del self.hits[key]
        self.guardrail_runs -= fact.guardrail
        for i, count in enumerate(fact.approvals):
            self.approvals[i] -= count
        for wait in fact.waits:
            self.waits.remove(wait)
        self.feedback_count -= fact.feedback_count
        self.feedback_sum -= fact.feedback_sum
        if fact.escalation is not None:
            self.steps.remove(fact.escalation[0])
            self.seconds.remove(fact.escalation[1])

    def copy(self) -> GovernanceTotals:
        return GovernanceTotals(dict(self.hits), self.guardrail_runs, list(self.approvals), list(self.waits),
                                self.feedback_count, self.feedback_sum, list(self.steps), list(self.seconds))

    def columns(self, runs: int) -> dict:
        """The governance columns of a window of `runs` runs."""
        waits, steps, seconds = sorted(self.waits), sorted(self.steps), sorted(self.seconds)
        requested, granted, denied, expired = self.approvals
        return {
            "policy_hits": sum(self.hits.values()),
            "policy_hits_by": self.hits,
            "guardrail_runs": self.guardrail_runs,
            "guardrail_rate": ratio(self.guardrail_runs, runs),
            "approvals_requested": requested,
            "approvals_granted": granted,
            "approvals_denied": denied,
            "approvals_expired": expired,
            "approval_wait_p50_ms": quantile(waits, 0.50),
            "approval_wait_p95_ms": quantile(waits, 0.95),
            "escalations": len(steps),
            "escalation_rate": ratio(len(steps), runs),
            "escalation_steps_p50": quantile(steps, 0.50),
            "escalation_seconds_p50": quantile(seconds, 0.50),
            "feedback_count": self.feedback_count,
            "feedback_score": ratio(self.feedback_sum, self.feedback_count),
        }


def governance_columns(runs: int, facts: Iterable[RunGovernance], sealed: GovernanceTotals | None = None) -> dict:
    """The governance columns of a window of `runs` runs: the totals of its sealed runs, if any,
    and the facts of the others that have any."""
    totals = sealed.copy() if sealed is not None else GovernanceTotals()
    for fact in facts:
        totals.add(fact)
    return totals.columns(runs)


def _among(ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Which of `keys` are in the sorted `ids`."""
    if not len(ids):
        return np.zeros(len(keys), bool)
    return ids[np.minimum(ids.searchsorted(keys), len(ids) - 1)] == keys


@dataclass(slots=True)
class Window:
    agent_id: str
    agent_version: str
    start: int
    end: int
    # A run re-emitted with more events replaces its earlier facts, so each run's are kept, in
    # columns, while it can be re-emitted (~190 bytes a run): hash(run_id) -> its position. Then
    # it is sealed (`seal`): its facts stay only in the sums, and its hash and version in sorted
    # arrays (16 bytes), so that a redelivery is still counted once.
    positions: dict[int, int] = field(default_factory=dict)
    versions: array = field(default_factory=lambda: array("q"))
    costs: array = field(default_factory=lambda: array("d"))
    run_durations: array = field(default_factory=lambda: array("d"))
    run_counts: array = field(default_factory=lambda: array("q"))  # _COUNTS a run
    # The runs' counts summed and durations sorted as they come, since a window is emitted again
    # with every run it gets; both hold the sealed runs too.
    counts: list[int] = field(default_factory=lambda: [0] * _COUNTS)
    durations: array = field(default_factory=lambda: array("d"))
    # position -> the governance facts of a run that has any (most have none)
    governance: dict[int, RunGovernance] = field(default_factory=dict)
    sealed_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # sorted
    sealed_versions: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # of each id
    sealed_cost: float = 0.0  # the sealed and restored runs' costs summed in their order, as `row` goes on summing
    sealed_governance: GovernanceTotals = field(default_factory=GovernanceTotals)
    taken: int = 0  # runs taken one by one and sealed since (`appended`)
    # Runs a restart put back (`restore`): in the sums at once, like sealed ones, but their facts
    # kept in arrays (~130 bytes a run, no object a run) while a newer version may still come,
    # which replaces them (`add`); `seal_restored` then forgets the facts. By hash, sorted;
    # version -1 once replaced. Governance facts, for the runs that have any, packed one after
    # the other in `restored_packed` (offset and length a run; length 0: none).
    restored_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    restored_versions: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    restored_counts: np.ndarray = field(default_factory=lambda: np.empty((0, _COUNTS), np.int64))
    restored_cost_duration: np.ndarray = field(default_factory=lambda: np.empty((0, 2), np.float64))
    restored_governance: np.ndarray = field(default_factory=lambda: np.empty((0, 2), np.int64))
    restored_packed: bytes = b""
    restored_live: int = 0  # restored runs not replaced

    @property
    def appended(self) -> int:
        """Runs this window took one by one (sealed since or not): where the next new run goes."""
        return self.taken + len(self.versions)

    @staticmethod
    def _counts_of(row: dict) -> tuple:
        return (row["outcome"] == "success", row["outcome"] == "timeout", bool(row["loop_detected"]),
                row["tool_calls"], row["tool_errors"], row["input_tokens"], row["output_tokens"])

    def restore(self, rows: list[dict]) -> None:
        """Put back runs of this window as a restart reads them: in the sums at once, their facts
        in arrays until `seal_restored`. A run already held goes through `add`."""
        keys = np.fromiter((hash(row["run_id"]) for row in rows), np.int64, len(rows))
        known = (_among(self.restored_ids, keys) | _among(self.sealed_ids, keys)
                 | np.fromiter((int(key) in self.positions for key in keys), bool, len(rows)))
        _, first = np.unique(keys, return_index=True)
        fresh = np.zeros(len(rows), bool)
        fresh[first] = True
        fresh &= ~known
        new = [row for row, take in zip(rows, fresh) if take]
        counts = np.array([self._counts_of(row) for row in new], np.int64).reshape(-1, _COUNTS)
        cost_duration = np.array([(float(row["cost_usd"]), float(row["duration_ms"])) for row in new],
                                 np.float64).reshape(-1, 2)
        for i, total in enumerate(counts.sum(axis=0).tolist()):
            self.counts[i] += total
        for cost in cost_duration[:, 0].tolist():
            self.sealed_cost += cost
        merged = np.concatenate((np.frombuffer(self.durations, np.float64), cost_duration[:, 1]))
        merged.sort()
        self.durations = array("d", merged.tobytes())
        packed = []
        for row in new:
            facts = RunGovernance.of(row)
            if facts is not None:
                self.sealed_governance.add(facts)
                packed.append(facts.packed())
            else:
                packed.append(b"")
        lengths = np.fromiter(map(len, packed), np.int64, len(packed))
        governance = np.stack((len(self.restored_packed) + np.cumsum(lengths) - lengths, lengths), axis=1)
        self.restored_packed += b"".join(packed)
        ids = np.concatenate((self.restored_ids, keys[fresh]))
        order = ids.argsort(kind="stable")
        self.restored_ids = ids[order]
        self.restored_versions = np.concatenate((
            self.restored_versions, np.fromiter((row["version"] for row in new), np.int64, len(new))))[order]
        self.restored_counts = np.concatenate((self.restored_counts, counts))[order]
        self.restored_cost_duration = np.concatenate((self.restored_cost_duration, cost_duration))[order]
        self.restored_governance = np.concatenate((self.restored_governance, governance))[order]
        self.restored_live += len(new)
        for row, take in zip(rows, fresh):
            if not take:
                self.add(row)

    def _replace_restored(self, key: int, version: int) -> bool | None:
        """A run that came again with `version`: None if it is not a restored one; False if that
        is not newer; else its restored facts leave the sums (True), and it is taken as new."""
        found = int(self.restored_ids.searchsorted(key))
        if found == len(self.restored_ids) or self.restored_ids[found] != key or self.restored_versions[found] < 0:
            return None
        if self.restored_versions[found] >= version:
            return False
        for i, count in enumerate(self.restored_counts[found].tolist()):
            self.counts[i] -= count
        cost, duration = self.restored_cost_duration[found].tolist()
        self.sealed_cost -= cost  # the one place a cost leaves a sum: a rounding error apart
        del self.durations[bisect_left(self.durations, duration)]
        offset, length = self.restored_governance[found].tolist()
        if length:
            self.sealed_governance.remove(RunGovernance.unpack(self.restored_packed[offset:offset + length]))
        self.restored_versions[found] = -1
        self.restored_live -= 1
        return True

    def seal_restored(self) -> None:
        """The restored runs can no longer be re-emitted: keep their ids and versions only."""
        live = self.restored_versions >= 0
        self._sealed(self.restored_ids[live], self.restored_versions[live])
        self.restored_governance, self.restored_packed = np.empty((0, 2), np.int64), b""
        self.restored_ids, self.restored_versions = np.empty(0, np.int64), np.empty(0, np.int64)
        self.restored_counts = np.empty((0, _COUNTS), np.int64)
        self.restored_cost_duration = np.empty((0, 2), np.float64)
        self.restored_live = 0

    def _sealed(self, ids: np.ndarray, versions: np.ndarray) -> None:
        """Runs' ids and versions into the sorted arrays of the sealed ones."""
        ids = np.concatenate((self.sealed_ids, ids))
        order = ids.argsort(kind="stable")
        self.sealed_ids, self.sealed_versions = ids[order], np.concatenate((self.sealed_versions, versions))[order]

    def add(self, row: dict) -> bool:
        key = hash(row["run_id"])
        at = self.positions.get(key)
        if at is not None and self.versions[at] >= row["version"]:
            return False
        if at is None and len(self.sealed_ids):
            found = int(self.sealed_ids.searchsorted(key))
            if found < len(self.sealed_ids) and self.sealed_ids[found] == key:
                # a redelivery (the same version), or by construction nothing newer: the run
                # could no longer be re-emitted when it was sealed
                return False
        if at is None and self.restored_live and self._replace_restored(key, row["version"]) is False:
            return False
        cost, duration = float(row["cost_usd"]), float(row["duration_ms"])
        counts = self._counts_of(row)
        if at is None:
            self.positions[key] = len(self.versions)
            self.versions.append(row["version"])
            self.costs.append(cost)
            self.run_durations.append(duration)
            self.run_counts.extend(counts)
        else:
            first = at * _COUNTS
            for i in range(_COUNTS):
                self.counts[i] -= self.run_counts[first + i]
                self.run_counts[first + i] = counts[i]
            del self.durations[bisect_left(self.durations, self.run_durations[at])]
            self.versions[at], self.costs[at], self.run_durations[at] = row["version"], cost, duration
        for i in range(_COUNTS):
            self.counts[i] += counts[i]
        insort(self.durations, duration)
        facts = RunGovernance.of(row)
        position = self.positions[key]
        if facts is not None:
            self.governance[position] = facts
        else:
            self.governance.pop(position, None)
        return True

    def seal(self, upto: int) -> None:
        """Seal the runs this window took before its `upto`th (`appended` then): none of them can
        be re-emitted any more. Their facts stay only in the sums; the row does not change."""
        k = min(upto - self.taken, len(self.versions))
        if k <= 0:
            return
        self.taken += k
        items = list(self.positions.items())  # in position order: a run keeps the place it came in
        self._sealed(np.fromiter((key for key, _ in items[:k]), np.int64, k), np.array(self.versions[:k], np.int64))
        for cost in self.costs[:k]:
            self.sealed_cost += cost
        for position in range(k):
            fact = self.governance.pop(position, None)
            if fact is not None:
                self.sealed_governance.add(fact)
        self.positions = {key: position - k for key, position in items[k:]}
        self.governance = {position - k: fact for position, fact in self.governance.items()}
        del self.versions[:k], self.costs[:k], self.run_durations[:k], self.run_counts[:k * _COUNTS]

    def row(self, *, final: bool, version: int, updated_at: int) -> dict:
        runs = len(self.sealed_ids) + len(self.positions) + self.restored_live
        successes, timeouts, loops, tool_calls, tool_errors, input_tokens, output_tokens = self.counts
        cost = sum(self.costs, self.sealed_cost)  # a float sum: in the runs' order, as always
        durations = self.durations
        return {
            "agent_id": self.agent_id,
            "agent_version": self.agent_version,
            "window_start": self.start,
            "window_end": self.end,
            "runs": runs,
            "successes": successes,
            "failures": runs - successes,
            "timeouts": timeouts,
            "cost_usd": cost,
            "cost_per_success": ratio(cost, successes),
            # a window holds one run at least: these are never None
            "success_rate": ratio(successes, runs),
            "p50_duration_ms": quantile(durations, 0.50),
            "p95_duration_ms": quantile(durations, 0.95),
            "loop_rate": ratio(loops, runs),
            "tool_calls": tool_calls,
            "tool_errors": tool_errors,
            "tool_error_rate": ratio(tool_errors, tool_calls) or 0.0,  # a column, not nullable: no calls, no errors
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "is_final": final,
            "version": version,
            "updated_at": updated_at,
            **governance_columns(runs, self.governance.values(), self.sealed_governance),
        }


EVERY_PARTITION = -1  # a seal that waits for every upstream partition
RESTORED = -1  # a seal of the runs a restart put back


class MetricWindows:
    """The open windows of the agents of one partition. `reemit_ms`: how far past the watermark
    of the message that brought a run its upstream partition may still re-emit it; once that
    partition's watermark is past it, the run is sealed (None: never)."""

    def __init__(self, window_ms: int, idle_timeout_ms: int, upstream_partitions: int, idle_source_ms: int = 60_000,
                 reemit_ms: int | None = None) -> None:
        self.window_ms = window_ms
        self.idle_timeout_ms = idle_timeout_ms
        self.upstream_partitions = upstream_partitions
        self.idle_source_ms = idle_source_ms
        self.reemit_ms = reemit_ms
        self.windows: dict[tuple[str, str, int], Window] = {}
        self.final_before = 0  # windows ending at or before this are final
        self.upstream: dict[int, int] = {}  # upstream partition -> its watermark
        self.heard: dict[int, int] = {}  # upstream partition -> wall time of its last message
        # window -> (upstream partition, its watermark that seals them, runs appended by then), oldest first
        self.unsealed: dict[tuple[str, str, int], deque[tuple[int, int, int]]] = {}
        self.late_runs = 0
        self._restoring = False  # restored runs not queued for sealing yet
        self._emitted_by: int | None = None  # no restored run was emitted past this upstream watermark
        self._started = 0
        self._version = 0

    def window_of(self, ts: int) -> int:
        return ts - ts % self.window_ms

    def apply(self, rows: list[dict], upstream_partition: int, upstream_watermark: int, now_ms: int) -> list[dict]:
        """Fold closed runs in; returns the `agent_metrics` rows that changed or became final."""
        if self._restoring:
            self._restored()
        dirty = {key for key in map(self._add, rows) if key is not None}
        if upstream_watermark > self.upstream.get(upstream_partition, 0):
            self.upstream[upstream_partition] = upstream_watermark
        self.heard[upstream_partition] = now_ms
        self._started = self._started or now_ms
        if self.reemit_ms is not None:
            sealed_at = upstream_watermark + self.reemit_ms
            for key in dirty:
                self.unsealed.setdefault(key, deque()).append(
                    (upstream_partition, sealed_at, self.windows[key].appended))
            self._seal()
        return self._emit(dirty, now_ms)

    def _passed(self, partition: int, watermark: int) -> bool:
        if partition == EVERY_PARTITION:
            return all(self.upstream.get(p, 0) >= watermark for p in range(self.upstream_partitions))
        return self.upstream.get(partition, 0) >= watermark

    def _seal(self) -> None:
        """Seal the runs no upstream partition can re-emit any more."""
        for key in list(self.unsealed):
            pending = self.unsealed[key]
            upto = 0
            while pending and self._passed(*pending[0][:2]):
                taken = pending.popleft()[2]
                if taken == RESTORED:
                    self.windows[key].seal_restored()
                upto = max(upto, taken)
            if upto:
                self.windows[key].seal(upto)
            if not pending:
                del self.unsealed[key]

    def restore(self, final_before: int, pages: Iterable[list[dict]], emitted_by: int | None = None) -> None:
        """Put back where final windows end and the runs of open windows (pages of rows, as they
        are read), as before a restart; may be called again with more pages before the first
        `apply`. `emitted_by`: an upstream watermark no restored run was emitted after (the
        newest an upstream partition had landed), if known."""
        self.final_before = max(self.final_before, final_before)
        if emitted_by is not None:
            self._emitted_by = max(self._emitted_by or emitted_by, emitted_by)
        for rows in pages:
            by_window: dict[tuple[str, str, int], list[dict]] = {}
            for row in rows:
                key = self.key_of(row)
                if key[2] + self.window_ms <= self.final_before:
                    self.late_runs += 1
                else:
                    by_window.setdefault(key, []).append(row)
            for key, runs in by_window.items():
                self._window(key).restore(runs)
        self._restoring = True

    def key_of(self, row: dict) -> tuple[str, str, int]:
        """The window a run belongs to."""
        return row["agent_id"], row["agent_version"], self.window_of(row["ended_at"])

    def _restored(self) -> None:
        """What was restored waits to be sealed (at the first `apply` after `restore`)."""
        self._restoring = False
        if self.reemit_ms is not None and self.windows:
            # Sealed once every upstream partition is past where they were emitted by `reemit_ms`:
            # the assemblers rebuild only runs without a row, but a newer version may be on its
            # way. Without that watermark, past the newest window's end (a run closed after it
            # by its idle timeout, and not re-emitted since, is sealed a little early).
            emitted_by = self._emitted_by
            if emitted_by is None:
                emitted_by = max(key[2] for key in self.windows) + self.window_ms
            sealed_at = emitted_by + self.reemit_ms
            for key, window in self.windows.items():
                pending = self.unsealed.setdefault(key, deque())
                pending.append((EVERY_PARTITION, sealed_at, RESTORED))
                if window.versions:  # restored again, or twice: taken one by one
                    pending.append((EVERY_PARTITION, sealed_at, window.appended))

    def _add(self, row: dict) -> tuple[str, str, int] | None:
        """Fold one run into its window; the window's key if that changed it."""
        key = self.key_of(row)
        if key[2] + self.window_ms <= self.final_before:
            self.late_runs += 1
            return None
        return key if self._window(key).add(row) else None

    def _window(self, key: tuple[str, str, int]) -> Window:
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = Window(key[0], key[1], key[2], key[2] + self.window_ms)
        return window

    def slowest_watermark(self, now_ms: int) -> int | None:
        """Event time every live upstream partition has passed (None before any reported):
        what a downstream test of windows may wait for so that no partition's runs are late."""
        return self._min_watermark(now_ms)

    def _min_watermark(self, now_ms: int) -> int | None:
        """The slowest upstream partition's watermark, leaving out partitions silent for long."""
        live = [
            self.upstream.get(partition, 0) for partition in range(self.upstream_partitions)
            if now_ms - self.heard.get(partition, self._started) < self.idle_source_ms
        ]
        return min(live) if live else None

    def _emit(self, dirty: set[tuple[str, str, int]], now_ms: int) -> list[dict]:
        # A partition that has not reported yet may hold runs of any window: wait for it,
        # but not forever (an unused partition never reports).
        slowest = self._min_watermark(now_ms)
        if slowest is not None:
            self.final_before = max(self.final_before, slowest - self.idle_timeout_ms)
        final = [key for key, window in self.windows.items() if window.end <= self.final_before]
        rows = []
        for key in dirty | set(final):
            is_final = key in final
            rows.append(self.windows[key].row(final=is_final, version=self._version_at(now_ms), updated_at=now_ms))
        for key in final:
            del self.windows[key]
            self.unsealed.pop(key, None)
        return rows

    def _version_at(self, now_ms: int) -> int:
        # Newest emission wins in ReplacingMergeTree: wall-clock milliseconds, made strictly
        # increasing within this process.
        self._version = max(self._version, now_ms * 1000)
        self._version += 1
        return self._version
