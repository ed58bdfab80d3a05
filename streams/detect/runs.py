"""Run assembly: agent events of one partition -> run rows, closed on `run_end` or when idle.
Watermark, idle timeout, lateness and idempotence: streams/detect/README.md, "Run assembly"."""

from __future__ import annotations

import bisect
import heapq
import sys
from array import array
from dataclasses import dataclass, field
from typing import Callable

from streams.contracts.alerts import FIRING, RESOLVED, fingerprint, make_alert
from streams.contracts.messages import EVENT_FIELDS, pack
from streams.ingest.pricing import UNKNOWN
from streams.detect.budgets import run_envelope_cleared, run_over_envelope
from streams.detect.loops import COUNT, LoopFinding, LoopPolicy, find_loop
from streams.detect.recent import RunMemory

# An event as the assembler folds it: a packed row (`contracts.messages.pack`, the hand-over's
# form), its fields by position: no dict is made per event.
(EVENT_ID, TS, TYPE, RUN_ID, AGENT_ID, AGENT_VERSION, TASK_ID, SESSION_ID, TENANT, ENVIRONMENT, INPUT_TOKENS,
 OUTPUT_TOKENS, CACHE_READ_INPUT_TOKENS, STATUS, ERROR_TYPE, ERROR_MESSAGE, TOOL, ARGS_HASH, OUTCOME, SCORE, COST_USD,
 COST_SOURCE, POLICY, DECISION, WAIT_MS) = (EVENT_FIELDS.index(name) for name in (
    "event_id", "ts", "type", "run_id", "agent_id", "agent_version", "task_id", "session_id", "tenant", "environment",
    "input_tokens", "output_tokens", "cache_read_input_tokens", "status", "error_type", "error_message", "tool",
    "args_hash", "outcome", "score", "cost_usd", "cost_source", "policy", "decision", "wait_ms"))


def row_version(event_count: int, enriched: bool = False) -> int:
    """A runs row with more events replaces one with fewer; with as many, the enriched one
    (its failure cluster assigned by the metrics stage) replaces the plain one."""
    return 2 * event_count + enriched


APPROVAL_STATUSES = ("requested", "granted", "denied", "expired")
_STEPS = ("run_start", "llm_call", "tool_call", "run_end")  # what makes a run's time span
_FAILED = ("error", "timeout")  # the statuses of a tool call that failed


@dataclass(slots=True)
class Governance:
    """A run's governance signals (SPEC §4), made when its first one comes: guardrail hits by
    "policy:decision", approvals by status with the waits of decided ones, live evaluations."""

    policy_hits: dict[str, int] = field(default_factory=dict)
    approvals: list[int] = field(default_factory=lambda: [0] * len(APPROVAL_STATUSES))
    waits: list[float] = field(default_factory=list)
    feedback_count: int = 0
    feedback_sum: float = 0.0

    def apply(self, kind: str, event: tuple) -> None:
        if kind == "policy_hit":
            key = f"{event[POLICY]}:{event[DECISION]}"
            self.policy_hits[key] = self.policy_hits.get(key, 0) + 1
        elif kind == "approval":
            status = event[STATUS]
            if status in APPROVAL_STATUSES:  # an approval that says no status is stored, not counted
                self.approvals[APPROVAL_STATUSES.index(status)] += 1
                if status != "requested" and event[WAIT_MS] is not None:
                    self.waits.append(float(event[WAIT_MS]))
        elif event[SCORE] is not None:  # feedback: its score is what it says
            self.feedback_count += 1
            self.feedback_sum += event[SCORE]

    def columns(self) -> dict:
        requested, granted, denied, expired = self.approvals
        return {
            "policy_hits": dict(self.policy_hits), "approvals_requested": requested, "approvals_granted": granted,
            "approvals_denied": denied, "approvals_expired": expired, "approval_waits_ms": sorted(self.waits),
            "feedback_count": self.feedback_count,
            "feedback_score": self.feedback_sum / self.feedback_count if self.feedback_count else None,
        }


NO_GOVERNANCE = Governance().columns()


@dataclass(slots=True)
class RunState:
    run_id: str
    agent_id: str
    agent_version: str
    task_id: str = ""
    session_id: str = ""
    tenant: str = ""
    environment: str = ""
    started_at: int = 0
    last_ts: int = 0
    last_step_ts: int = 0  # of its newest event but approvals, policy hits and feedback (its end, for a timeout)
    end_ts: int | None = None
    outcome: str = ""
    score: float | None = None
    error_type: str = ""
    error_message: str = ""
    llm_calls: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    llm_errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0
    cost_sources: set[str] = field(default_factory=set)
    unpriced_calls: int = 0
    # (ts, arrival order, tool, args_hash, status, decision): sorted by time when the row is
    # made, because events of a run may arrive out of order. `decision` is, for a call whose
    # arguments are unknown, the model call that preceded it (see `decision` below), else None.
    tool_steps: list[tuple[int, int, str, str, str, tuple | None]] = field(default_factory=list)
    # (ts, input tokens, output tokens) of the newest successful model call: the call that
    # decided the next tool call, whose tokens are loop evidence when arguments are unknown
    decision: tuple[int, int, int] | None = None
    # hash() of each event_id (an int takes a third of the id's bytes; two ids of one run that
    # hash alike, a chance of 2**-64, would count as one event)
    event_ids: set[int] = field(default_factory=set)
    closed_by: str = ""
    timer: int = 0  # the assembler's timer bucket of an open run
    frozen: bool = False  # made small (`freeze`) while it is quiet or closed
    loop: LoopFinding | None = None
    loop_alerted: bool = False
    budget_alert: dict | None = None  # the firing alert when the run went over its cost envelope
    governance: Governance | None = None  # its approvals, guardrail hits and feedback, if any

    def apply(self, event: tuple, policy: LoopPolicy | None = None) -> bool:
        """Fold one event (a packed row) in, thawing a frozen run; False if this event_id was
        already applied. A redelivery (after every restart, many) leaves a frozen run frozen:
        thawed, a closed run would stay large until forgotten, since no row is made of it."""
        event_id = hash(event[EVENT_ID])
        if event_id in self.event_ids:
            return False
        if self.frozen:
            self.thaw()
        self.event_ids.add(event_id)
        ts = event[TS]
        if not self.started_at or ts < self.started_at:
            self.started_at = ts
        if ts > self.last_ts:
            self.last_ts = ts
        # the first event that names them (spelled out: getattr/setattr cost more per event)
        if not self.task_id and event[TASK_ID]:
            self.task_id = event[TASK_ID]
        if not self.session_id and event[SESSION_ID]:
            self.session_id = event[SESSION_ID]
        if not self.tenant and event[TENANT]:
            self.tenant = event[TENANT]
        if not self.environment and event[ENVIRONMENT]:
            self.environment = event[ENVIRONMENT]
        kind = event[TYPE]
        if kind in _STEPS and ts > self.last_step_ts:
            self.last_step_ts = ts
        if kind == "run_start":
            # The run's own start names its agent; events that came first (OTLP child spans
            # travel before their invoke_agent span) may have carried a fallback identity.
            self.agent_id, self.agent_version = event[AGENT_ID], event[AGENT_VERSION]
        if kind == "llm_call":
            self.llm_calls += 1
            self.llm_errors += event[STATUS] == "error"
            self.input_tokens += event[INPUT_TOKENS]
            self.output_tokens += event[OUTPUT_TOKENS]
            self.cache_read_input_tokens += event[CACHE_READ_INPUT_TOKENS]
            if event[STATUS] == "ok" and (self.decision is None or ts >= self.decision[0]):
                self.decision = (ts, event[INPUT_TOKENS], event[OUTPUT_TOKENS])
            self._add_cost(event)
            self._look_for_loop(policy, tools_changed=False)
        elif kind == "tool_call":
            self.tool_calls += 1
            self.tool_errors += event[STATUS] in _FAILED
            # Kept in event-time order as calls arrive: loops are found on the tail.
            args = event[ARGS_HASH]
            decision = self.decision  # of a call whose arguments are unknown, if its model call reported usage
            if args or decision is None or decision[0] > ts or not decision[2]:
                decision = None
            bisect.insort(self.tool_steps, (ts, len(self.event_ids), event[TOOL], args, event[STATUS], decision))
            self._add_cost(event)
            self._look_for_loop(policy, tools_changed=True)
        elif kind == "run_end":
            # The first run_end (in event time) decides; a second one is a client bug.
            if self.end_ts is None or ts < self.end_ts:
                self.end_ts = ts
                self.outcome = event[OUTCOME]
                self.score = event[SCORE]
                self.error_type = event[ERROR_TYPE]
                self.error_message = event[ERROR_MESSAGE]
        elif kind != "run_start":  # approval, policy_hit, feedback
            if self.governance is None:
                self.governance = Governance()
            self.governance.apply(kind, event)
        return True

    def freeze(self) -> None:
        """Make a closed or quiet run small (~2 KB instead of ~5): what it holds in containers
        that grow with its events goes into compact ones, and strings many runs share into one
        copy. `thaw` undoes it for the next event. A frozen run is left as it is."""
        if self.frozen:
            return
        self.frozen = True
        self.event_ids = array("q", self.event_ids)
        self.cost_sources = _shared(frozenset(self.cost_sources))
        self.tool_steps = tuple((ts, order, sys.intern(tool), args_hash, sys.intern(status), decision)
                                for ts, order, tool, args_hash, status, decision in self.tool_steps)
        for name in ("agent_id", "agent_version", "tenant", "environment", "outcome", "error_type"):
            setattr(self, name, sys.intern(getattr(self, name)))

    def thaw(self) -> None:
        self.frozen = False
        self.event_ids, self.cost_sources, self.tool_steps = set(self.event_ids), set(self.cost_sources), list(self.tool_steps)

    def _look_for_loop(self, policy: LoopPolicy | None, tools_changed: bool) -> None:
        if policy is None or self.loop is not None:
            return
        steps, budget = self.llm_calls + self.tool_calls, policy.budget(self.agent_id)
        # find_loop only when it can find something: the step budget is crossed, or the tool
        # calls changed and their newest may close a repeat or a cycle (an unchanged tail was
        # looked at when it last changed).
        if steps > budget or (tools_changed and self._newest_call_recurs(policy)):
            recent = self.tool_steps[-max(policy.repeats * policy.max_period, policy.count_repeats):]
            self.loop = find_loop([(step[2], step[3], step[5]) for step in recent], steps, budget, policy)

    def _newest_call_recurs(self, policy: LoopPolicy) -> bool:
        """Whether the newest tool call equals one of the `max_period` calls before it: what
        every repeat and cycle of find_loop (two turns at least) needs."""
        if policy.repeats < 2:
            return True
        calls = self.tool_steps
        newest = calls[-1]
        for period in range(1, min(policy.max_period, len(calls) - 1) + 1):
            earlier = calls[-1 - period]
            if earlier[2] == newest[2] and earlier[3] == newest[3]:
                return True
        return False

    def loop_alert(self, status: str, ts: int, now_ms: int, stop_on_count: bool = False) -> dict:
        """The `loop` alert of this run: firing when found, resolved when the run closes. A
        suspected loop (the count of calls alone) is a warning, with `stop_run` only when
        `stop_on_count` (the policy) asks for it."""
        evidence = {**self.loop.evidence(), "run_id": self.run_id, "steps": self.llm_calls + self.tool_calls,
                    "detected_at": now_ms}
        if status == RESOLVED:
            evidence["outcome"] = "timeout" if self.end_ts is None else self.outcome
        suspected = self.loop.basis == COUNT
        stop = status == FIRING and (not suspected or stop_on_count)
        return make_alert(
            kind="loop", severity="warning" if suspected else "critical", status=status,
            fingerprint=fingerprint("loop", self.agent_id, self.run_id), ts=ts,
            agent_id=self.agent_id, agent_version=self.agent_version, run_id=self.run_id,
            summary=f"run {self.run_id} of {self.agent_id} {self.agent_version} "
                    f"{'may be' if suspected else 'is'} looping: {self.loop.summary}"
            if status == FIRING else f"run {self.run_id} of {self.agent_id} ended after looping",
            evidence=evidence, action="stop_run" if stop else "",
        )

    def _add_cost(self, event: tuple) -> None:
        source = event[COST_SOURCE]
        if source == UNKNOWN:
            self.unpriced_calls += 1
        if event[COST_USD] is not None:
            self.cost_usd += event[COST_USD]
        if source:
            self.cost_sources.add(source)

    @property
    def cost_source(self) -> str:
        if not self.cost_sources:
            return "none"
        if len(self.cost_sources) == 1:
            return next(iter(self.cost_sources))
        return UNKNOWN if UNKNOWN in self.cost_sources else "mixed"

    def row(self, updated_at: int) -> dict:
        """The `runs` row of this run as it stands."""
        # Its end: run_end's time, or its last step's when that came later (events are stamped by
        # different clocks); feedback given after the end does not make a run longer.
        timed_out = self.end_ts is None
        last = self.last_step_ts or self.last_ts
        ended_at = last if timed_out else max(self.end_ts, last)
        steps = sorted(self.tool_steps)
        return {
            "run_id": self.run_id,
            "agent_id": self.agent_id,
            "agent_version": self.agent_version,
            "task_id": self.task_id,
            "session_id": self.session_id,
            "tenant": self.tenant,
            "environment": self.environment,
            "started_at": self.started_at,
            "ended_at": ended_at,
            "outcome": "timeout" if timed_out else self.outcome,
            "score": self.score,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "steps": self.llm_calls + self.tool_calls,
            "llm_calls": self.llm_calls,
            "tool_calls": self.tool_calls,
            "tool_errors": self.tool_errors,
            "llm_errors": self.llm_errors,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "cost_usd": self.cost_usd,
            "cost_source": self.cost_source,
            "unpriced_calls": self.unpriced_calls,
            "duration_ms": ended_at - self.started_at,
            "tool_path": [step[2] for step in steps],
            "tool_retries": [call[2] for before, call in zip(steps, steps[1:]) if call[2] == before[2] and before[4] in _FAILED],
            "loop_detected": self.loop is not None,
            "failure_cluster_id": "",
            "event_count": len(self.event_ids),
            "closed_by": "idle_timeout" if timed_out else "run_end",
            "version": row_version(len(self.event_ids)),
            "updated_at": updated_at,
            **(NO_GOVERNANCE if self.governance is None else self.governance.columns()),
        }


CLOSED_KEPT_MIN_MS = 60_000


def reemitted_within_ms(allowed_lateness_ms: int) -> int:
    """How far past the watermark of the batch that closed a run `RunAssembler` may still emit its
    row again (a late event updates it): its last event is at most the lateness ahead of that
    watermark, and a closed run is kept for `closed_kept_ms` after it; one timer's width more."""
    return allowed_lateness_ms + max(allowed_lateness_ms, CLOSED_KEPT_MIN_MS) + RunAssembler.TIMER_MS

_SHARED: dict[frozenset, frozenset] = {}


def _shared(value: frozenset) -> frozenset:
    """One copy of each of the few sets of cost sources a run can have."""
    return _SHARED.setdefault(value, value)


class RunAssembler:
    """Open and recently closed runs of one partition, driven by event time.

    The watermark is the newest event time seen minus the allowed lateness. A run with no
    `run_end` closes as `timeout` once the watermark passes its last event + idle timeout.
    A closed run is kept (frozen small) for the allowed lateness of event time (a minute at
    least: redeliveries and a run's own stragglers across batches), so that late events update
    its row; then only its id is kept (a tombstone) until another idle timeout has passed, so
    that its stragglers are counted as late instead of starting a phantom run; then it is
    forgotten, and an event that would start a run already idle by the watermark is counted as
    late and not assembled. An open run quiet for as long is frozen too.
    """

    TIMER_MS = 1000  # the width of a timer bucket (event time)

    def __init__(self, idle_timeout_ms: int, allowed_lateness_ms: int = 0, loop_policy: LoopPolicy | None = None,
                 run_budget: Callable[[str], float] | None = None) -> None:
        self.idle_timeout_ms = idle_timeout_ms
        self.allowed_lateness_ms = allowed_lateness_ms
        self.loop_policy = loop_policy or LoopPolicy()
        # An agent's cost envelope per run in USD (0: none); crossing it raises a `budget` alert.
        self.run_budget = run_budget
        self._run_limits: dict[str, float] = {}  # run_budget per agent, asked once
        # Alerts raised since the caller last took them (`take_alerts`).
        self.alerts: list[dict] = []
        self.open: dict[str, RunState] = {}
        self.closed: dict[str, RunState] = {}
        # closed runs whose late events are no longer assembled, for another idle timeout
        self.tombstones: RunMemory[bool] = RunMemory(slack=60_000)  # sealed a minute past due
        self.closed_kept_ms = max(allowed_lateness_ms, CLOSED_KEPT_MIN_MS)
        self._compactions: list[tuple[int, str]] = []  # (event time, run_id) to make a tombstone of
        self.max_ts = 0
        self.duplicates = 0
        self.late_events = 0
        # The open runs by when to look at them again: once quiet for as long as a closed run is
        # kept (to freeze it), then idle (to close it), from their last event: bucket (event
        # time // TIMER_MS) -> run ids, and a heap of the buckets. A run leaves its bucket when it
        # closes, so a batch's cost does not grow with the open runs and the timers hold nothing
        # of the runs that ended.
        self._timers: dict[int, set[str]] = {}
        self._buckets: list[int] = []

    @property
    def watermark(self) -> int:
        return self.max_ts - self.allowed_lateness_ms if self.max_ts else 0

    def apply(self, events: list[dict], now_ms: int, *, replay: bool = False) -> list[dict]:
        """Fold a batch of normalised events (dicts with every field of `EVENT_FIELDS`) in;
        returns the rows of runs that closed or changed after closing.

        `replay`: stored events that rebuild the state after a restart. They do not move the
        watermark, which follows the stream: the store may hold events newer than the stream's
        position, and older events still to come from the stream must not count as late.
        """
        return self.apply_packed([pack(event) for event in events], now_ms, replay=replay)

    def apply_packed(self, events: list, now_ms: int, *, replay: bool = False) -> list[dict]:
        """`apply` of packed rows (`EventBatch.events`), as the hand-over carries them."""
        touched: dict[str, RunState] = {}
        for event in events:
            run_id = event[RUN_ID]
            run = self.open.get(run_id) or self.closed.get(run_id)
            if run is None:
                if event[TS] + self.idle_timeout_ms <= self.watermark or run_id in self.tombstones:
                    # Too late to start a run: it would be idle at once. It is a redelivery of
                    # a run closed and forgotten, or a straggler past the lateness; it is in
                    # `events`, but a run made of it alone would be a phantom in the metrics.
                    self.late_events += 1
                    continue
                run = self.open[run_id] = RunState(run_id, event[AGENT_ID], event[AGENT_VERSION])
                self._arm(run, event[TS] + self.closed_kept_ms)
            if event[TS] > self.max_ts and not replay:
                self.max_ts = event[TS]  # a duplicate too: the stream has come this far
            if not run.apply(event, self.loop_policy):
                self.duplicates += 1
                continue
            if run.loop is not None and not run.loop_alerted:
                # At once, while the run goes on: the alert says stop it.
                run.loop_alerted = True
                self.alerts.append(run.loop_alert(FIRING, event[TS], now_ms, self.loop_policy.stop_on_count))
            if run.budget_alert is None and self.run_budget is not None and run.cost_usd > 0:
                self._check_budget(run, event[TS])
            touched[run_id] = run
        rows = []
        for run in touched.values():
            if not run.closed_by and run.end_ts is not None:
                self._close(run, "run_end", now_ms)
            if run.closed_by:
                rows.append(run.row(now_ms))
                run.freeze()
        return rows + self.advance(now_ms)

    def _arm(self, run: RunState, deadline: int) -> None:
        bucket = run.timer = deadline // self.TIMER_MS
        runs = self._timers.get(bucket)
        if runs is None:
            runs = self._timers[bucket] = set()
            heapq.heappush(self._buckets, bucket)
        runs.add(run.run_id)

    def _close(self, run: RunState, closed_by: str, now_ms: int) -> None:
        run.closed_by = closed_by
        self.closed[run.run_id] = self.open.pop(run.run_id)
        runs = self._timers.get(run.timer)
        if runs is not None:
            runs.discard(run.run_id)
            if not runs:
                del self._timers[run.timer]  # its heap entry goes when due
        # from its last event or its close, whichever is later in event time (a replayed run
        # closes before the stream's watermark has come back to it)
        heapq.heappush(self._compactions, (max(self.watermark, run.last_ts) + self.closed_kept_ms, run.run_id))
        if run.loop_alerted:
            self.alerts.append(run.loop_alert(RESOLVED, max(run.last_ts, run.end_ts or 0), now_ms))
        if run.budget_alert is not None:
            self.alerts.append(run_envelope_cleared(run.budget_alert, run.cost_usd, max(run.last_ts, run.end_ts or 0)))

    def _check_budget(self, run: RunState, ts: int) -> None:
        # At once, while the run goes on, like a loop: the alert says stop it.
        limit = self._run_limits.get(run.agent_id)
        if limit is None:
            limit = self._run_limits[run.agent_id] = self.run_budget(run.agent_id)
        if limit <= 0 or run.cost_usd <= limit:
            return
        run.budget_alert = run_over_envelope(run.run_id, run.agent_id, run.agent_version, run.cost_usd,
                                             run.llm_calls + run.tool_calls, limit, ts)
        if run.budget_alert is not None:
            self.alerts.append(run.budget_alert)

    def take_alerts(self) -> list[dict]:
        alerts, self.alerts = self.alerts, []
        return alerts

    def advance(self, now_ms: int) -> list[dict]:
        """Close runs idle past the watermark and forget old closed ones; returns closed rows."""
        watermark = self.watermark
        while self._compactions and self._compactions[0][0] <= watermark:
            due, run_id = heapq.heappop(self._compactions)
            forget = due - self.closed_kept_ms + self.idle_timeout_ms  # another idle timeout after it closed
            if self.closed.pop(run_id, None) is not None and forget > watermark:
                self.tombstones.put(run_id, forget)
        self.tombstones.expire(watermark)
        idle = []
        while self._buckets and self._buckets[0] * self.TIMER_MS <= watermark:
            bucket = self._buckets[0]
            runs = self._timers.get(bucket, ())
            for run_id in list(runs):
                run = self.open[run_id]
                deadline = run.last_ts + self.idle_timeout_ms
                if deadline <= watermark:
                    runs.discard(run_id)
                    idle.append((deadline, run_id))
                    continue
                look = deadline
                if not run.frozen:
                    look = run.last_ts + self.closed_kept_ms
                    if look <= watermark:  # quiet as long as a closed run is kept: make it small
                        run.freeze()
                        look = deadline
                if look // self.TIMER_MS != bucket:  # look again then
                    runs.discard(run_id)
                    self._arm(run, look)
            if runs:
                break  # the rest of this bucket is not due yet, nor any later bucket
            heapq.heappop(self._buckets)
            self._timers.pop(bucket, None)
        rows = []
        for _, run_id in sorted(idle):
            run = self.open[run_id]
            self._close(run, "idle_timeout", now_ms)
            rows.append(run.row(now_ms))
            run.freeze()
        return rows
