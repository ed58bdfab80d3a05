"""Event-time tumbling windows per agent and version: closed runs -> `agent_metrics` rows.
When a window is final (watermarks, idle upstreams): streams/detect/README.md, "Windows and watermarks"."""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass, field

from streams.detect.estimators import quantile, ratio


@dataclass(slots=True)
class _RunFacts:
    outcome: str
    cost_usd: float
    duration_ms: float
    loop: bool
    tool_calls: int
    tool_errors: int
    input_tokens: int
    output_tokens: int
    version: int


@dataclass(slots=True)
class Window:
    agent_id: str
    agent_version: str
    start: int
    end: int
    # Keyed by run_id: a run re-emitted with more events replaces its earlier facts.
    runs: dict[str, _RunFacts] = field(default_factory=dict)
    # The runs' counts summed and durations sorted as they come, since a window is emitted again
    # with every run it gets: successes, timeouts, loops, tool calls, tool errors, input and output tokens.
    counts: list[int] = field(default_factory=lambda: [0] * 7)
    durations: list[float] = field(default_factory=list)

    def add(self, row: dict) -> bool:
        known = self.runs.get(row["run_id"])
        if known is not None and known.version >= row["version"]:
            return False
        fact = self.runs[row["run_id"]] = _RunFacts(
            row["outcome"], float(row["cost_usd"]), float(row["duration_ms"]), bool(row["loop_detected"]),
            row["tool_calls"], row["tool_errors"], row["input_tokens"], row["output_tokens"], row["version"],
        )
        if known is not None:
            self._count(known, -1)
            del self.durations[bisect_left(self.durations, known.duration_ms)]
        self._count(fact, 1)
        insort(self.durations, fact.duration_ms)
        return True

    def _count(self, fact: _RunFacts, sign: int) -> None:
        counts = self.counts
        counts[0] += sign * (fact.outcome == "success")
        counts[1] += sign * (fact.outcome == "timeout")
        counts[2] += sign * fact.loop
        counts[3] += sign * fact.tool_calls
        counts[4] += sign * fact.tool_errors
        counts[5] += sign * fact.input_tokens
        counts[6] += sign * fact.output_tokens

    def row(self, *, final: bool, version: int, updated_at: int) -> dict:
        runs = len(self.runs)
        successes, timeouts, loops, tool_calls, tool_errors, input_tokens, output_tokens = self.counts
        cost = sum(fact.cost_usd for fact in self.runs.values())  # a float sum: in the runs' order, as always
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
        }


class MetricWindows:
    """The open windows of the agents of one partition."""

    def __init__(self, window_ms: int, idle_timeout_ms: int, upstream_partitions: int, idle_source_ms: int = 60_000) -> None:
        self.window_ms = window_ms
        self.idle_timeout_ms = idle_timeout_ms
        self.upstream_partitions = upstream_partitions
        self.idle_source_ms = idle_source_ms
        self.windows: dict[tuple[str, str, int], Window] = {}
        self.final_before = 0  # windows ending at or before this are final
        self.upstream: dict[int, int] = {}  # upstream partition -> its watermark
        self.heard: dict[int, int] = {}  # upstream partition -> wall time of its last message
        self.late_runs = 0
        self._started = 0
        self._version = 0

    def window_of(self, ts: int) -> int:
        return ts - ts % self.window_ms

    def apply(self, rows: list[dict], upstream_partition: int, upstream_watermark: int, now_ms: int) -> list[dict]:
        """Fold closed runs in; returns the `agent_metrics` rows that changed or became final."""
        dirty = {key for key in map(self._add, rows) if key is not None}
        if upstream_watermark > self.upstream.get(upstream_partition, 0):
            self.upstream[upstream_partition] = upstream_watermark
        self.heard[upstream_partition] = now_ms
        self._started = self._started or now_ms
        return self._emit(dirty, now_ms)

    def restore(self, rows: list[dict], final_before: int) -> None:
        """Put back the runs of open windows and where final windows end, as before a restart."""
        self.final_before = max(self.final_before, final_before)
        for row in rows:
            self._add(row)

    def _add(self, row: dict) -> tuple[str, str, int] | None:
        """Fold one run into its window; the window's key if that changed it."""
        start = self.window_of(row["ended_at"])
        if start + self.window_ms <= self.final_before:
            self.late_runs += 1
            return None
        key = (row["agent_id"], row["agent_version"], start)
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = Window(key[0], key[1], start, start + self.window_ms)
        return key if window.add(row) else None

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
        return rows

    def _version_at(self, now_ms: int) -> int:
        # Newest emission wins in ReplacingMergeTree: wall-clock milliseconds, made strictly
        # increasing within this process.
        self._version = max(self._version, now_ms * 1000)
        self._version += 1
        return self._version
