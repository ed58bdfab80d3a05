"""Rebuilding a partition's state from the store when a worker (re)starts or takes it over.
What is read and how it is bounded in event time: streams/processors/README.md, "Restarts"."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import orjson

from streams.contracts import topics
from streams.contracts.alerts import fingerprint
from streams.contracts.messages import EVENT_FIELDS
from streams.contracts.tables import RUNS
from streams.contracts.topics import agent_partition, mode_partition_key, tenant_partition_key
from streams.detect.failures import KIND, mode_key
from streams.detect.policy import Policy
from streams.detect.runs import RUN_ID
from streams.processors.assembler import AssemblerPartition
from streams.processors.metrics import MetricsPartition, MetricsState
from streams.settings import Settings
from streams.store.clickhouse import query_store

log = logging.getLogger(__name__)

_EVENT_COLUMNS = ", ".join(
    {
        "ts": "toUnixTimestamp64Milli(ts) AS ts",
        "cost_usd": "toFloat64(cost_usd) AS cost_usd",
    }.get(name, name)
    for name in EVENT_FIELDS
)



def _run_columns(names: tuple[str, ...]) -> str:
    """Columns of `runs`, times as epoch milliseconds and money as a float, as the processors hold them."""
    return ", ".join(
        f"toUnixTimestamp64Milli({name}) AS {name}" if name in ("started_at", "ended_at", "updated_at")
        else "toFloat64(cost_usd) AS cost_usd" if name == "cost_usd" else name
        for name in names
    )


_RUN_COLUMNS = _run_columns(RUNS.names)
# What a window of `agent_metrics` takes of a run (`streams.detect.metrics.Window`).
_WINDOW_COLUMNS = _run_columns((
    "run_id", "agent_id", "agent_version", "ended_at", "outcome", "cost_usd", "duration_ms", "loop_detected",
    "tool_calls", "tool_errors", "input_tokens", "output_tokens", "version", "steps", "policy_hits",
    "approvals_requested", "approvals_granted", "approvals_denied", "approvals_expired", "approval_waits_ms",
    "feedback_count", "feedback_score"))
# Runs read a query at a time while a partition is rebuilt (`RunPages`): ~10 MB of JSON. Fewer
# make the rebuild slower: each page's query scans `runs` (1,000: 60 -> 158 s, jobs/README.md).
PAGE_RUNS = 5_000
# Runs of a page parsed and folded in at a time. A page's 5,000 rows as dicts at once (twice,
# with the page read ahead) left a rebuilt worker's heaps holding 27 MB of pymalloc gaps and
# 15 MB of free C heap among what it kept; 250 at a time, 10 and 4 (offline, the 4 partitions
# of a 20-minute soak's store, the worker's malloc settings).
CHUNK_RUNS = 250
# Open runs whose events an assembler partition's rebuild replays at a time: ~12,000 events,
# parsed as lists (not dicts) from the one response as they are replayed. All of them as dicts
# at once (100,000 events, 5 minutes of a soak's partition) left the worker's heaps holding
# ~50 MB of gaps among what it kept.
OPEN_RUNS_PER_READ = 1_000
# Tenant budgets are daily: their sums need the runs of the last two days.
TENANT_HISTORY_MS = 2 * 24 * 3_600_000

# The events of one assembler partition: from its agent.events partition, and the events of
# OTLP spans, which went to the assembler of CRC32(run_id) (streams.contracts.topics.run_partition).
_PARTITION_EVENTS = ("(source LIKE {source:String} OR (startsWith(source, {otlp:String}) "
                     "AND CRC32(run_id) % {partitions:UInt32} = {partition:UInt32}))")
_SINCE = "fromUnixTimestamp64Milli({since:Int64}, 'UTC')"


def assembler_progress(store) -> dict[int, int]:  # noqa: ANN001 (a Store or a RemoteStore)
    """How far each assembler partition had come in event time: its last watermark landed in
    `stage_progress` (the sink lands it from the closed-runs messages)."""
    return {int(row["partition"]): int(row["watermark"]) for row in store.query_json(
        "SELECT partition, toUnixTimestamp64Milli(max(watermark)) AS watermark FROM stage_progress "
        "WHERE stage = 'assemble_runs' GROUP BY partition")}


def rebuild_assembler(settings: Settings, policy: Policy, partition: int, horizon_ms: int,
                      now_ms: int) -> AssemblerPartition:
    """An assembler partition as it was: its open runs replayed from the store, a few runs'
    events at a time (blocking: run it off the event loop)."""
    events, sent = read_open_runs(query_store(settings, may_open=False), settings.partitions, partition, horizon_ms)
    return AssemblerPartition(partition, settings, policy, events, sent, now_ms)


def read_open_runs(store, partitions: int, partition: int, horizon_ms: int,  # noqa: ANN001
                   runs_per_read: int = OPEN_RUNS_PER_READ) -> tuple[Iterator[list[list]], set[str]]:
    """Every landed event of the partition's runs still open (with an event in the last
    `horizon_ms` of event time the processors had reached, and no `runs` row), packed
    (`EVENT_FIELDS` in order), `runs_per_read` runs at a time, each run's events together and
    oldest first (one read of the store, its rows parsed as they are taken); and the ids of
    the alerts already sent about the partition's runs of that time: a replayed or
    redelivered event raises them again. A run older than the horizon comes back whole (by
    its run_id). The horizon counts back from the partition's own progress, not from the
    newest stored event: the store holds events the assembler had not reached, and they come
    again from the stream. A partition with no progress yet is read whole."""
    reached = assembler_progress(store).get(partition)
    params = {"source": f"{topics.AGENT_EVENTS.name}:{partition}:%", "otlp": f"{topics.OTLP_SPANS.name}:",
              "partitions": partitions, "partition": partition, "since": reached - horizon_ms if reached else 0}
    recent = f"SELECT DISTINCT run_id FROM events WHERE ts >= {_SINCE} AND {_PARTITION_EVENTS}"
    open_ids = [row["run_id"] for row in store.query_json(
        f"{recent} AND run_id NOT IN (SELECT run_id FROM runs WHERE ended_at >= {_SINCE})", params)]
    sent = store.query_json(
        f"SELECT alert_id FROM alerts WHERE ts >= {_SINCE} AND run_id != '' AND run_id IN ({recent})", params)
    # one read of the events, a run's together, taken from the response a few runs at a time
    rows = store.query_lists(
        f"SELECT {_EVENT_COLUMNS} FROM events WHERE run_id IN {{ids:Array(String)}} AND {_PARTITION_EVENTS} "
        "ORDER BY run_id, ts", {**params, "ids": open_ids}) if open_ids else iter(())

    def reads() -> Iterator[list[list]]:
        read, runs, run, events = [], 0, None, 0
        for row in rows:
            if row[RUN_ID] != run:
                if runs == runs_per_read:
                    yield read
                    read, runs = [], 0
                run, runs = row[RUN_ID], runs + 1
            read.append(row)
            events += 1
        if read:
            yield read
        if events:
            log.info("partition %d: rebuilt %d open runs from %d stored events", partition, len(open_ids), events)

    return reads(), {row["alert_id"] for row in sent}


def rebuild_metrics(settings: Settings, policy: Policy, partition: int, horizon_ms: int, now_ms: int) -> MetricsPartition:
    """A metrics partition as it was, its runs read from the store a page at a time as they are
    folded in (blocking: run it off the event loop)."""
    state = read_metrics_state(query_store(settings, may_open=False), settings.partitions, partition,
                               settings.window_seconds * 1000, horizon_ms, policy.tenant_budgets)
    return MetricsPartition(partition, settings, policy, state, now_ms)


def read_metrics_state(store, partitions: int, partition: int, window_ms: int, horizon_ms: int,  # noqa: ANN001
                       tenant_budgets: bool) -> MetricsState:
    """What a metrics partition starts from: the runs of its agents' windows not final yet,
    the runs of the last `horizon_ms` of event time (the drift tests, failure clusters and
    canary analyses learn them again), its agents' deployments, versions and canary analyses,
    its tenants' runs of the last two days (with tenant budgets on), and the ids of the
    alerts and rollbacks already sent about them. Event time
    counts back from the slowest assembler partition's progress (a window is final only once
    every one has passed it)."""
    progress = assembler_progress(store)
    newest = min(progress.values()) if progress else None

    def mine(key: str) -> bool:
        return agent_partition(key, partitions) == partition

    state = MetricsState(watermark=newest)
    since = {"since": newest - horizon_ms if newest is not None else 0}
    agents = [row["agent_id"] for row in store.query_json(
        f"SELECT DISTINCT agent_id FROM runs WHERE ended_at >= {_SINCE}", since) if mine(row["agent_id"])]
    if agents:
        state.open_windows, state.window_runs, state.final_before = _open_windows(
            store, agents, window_ms, since["since"])
        history = RunPages(store, "agent_id IN {agents:Array(String)}", {"agents": agents}, since["since"])
        state.history = _then_progress(store, history, state)
        # rollouts: a canary is a version first seen after the stable one, however long ago
        state.versions = store.query_json(
            "SELECT agent_id, agent_version, toUnixTimestamp64Milli(min(first_started_at)) AS first_started_at "
            "FROM agent_versions WHERE agent_id IN {agents:Array(String)} GROUP BY agent_id, agent_version",
            {"agents": agents})
        state.canaries = store.query_json(
            "SELECT agent_id, version, stable_version, toUnixTimestamp64Milli(since) AS since, inferred, decision, "
            "toUnixTimestamp64Milli(decided_at) AS decided_at, toUnixTimestamp64Milli(updated_at) AS updated_at, role "
            "FROM canaries WHERE agent_id IN {agents:Array(String)}", {"agents": agents})
        # every alert about these agents: drift, failure clusters, canary metrics, hourly budgets
        state.sent = {row["alert_id"] for row in store.query_json(
            "SELECT alert_id FROM alerts WHERE agent_id IN {agents:Array(String)}", {"agents": agents})}
        log.info("partition %d: rebuilding %d agents, %d open windows, from %d recent runs (and %d older runs "
                 "of open windows)", partition, len(agents), len(state.open_windows), history.total,
                 getattr(state.window_runs, "total", 0))
    _failure_modes(store, state, lambda key: mine(mode_partition_key(key)), window_ms, since["since"])
    state.deployments = [row for row in store.query_json(
        "SELECT agent_id, version, role, traffic_pct, toUnixTimestamp64Milli(ts) AS ts FROM deployments ORDER BY ts")
        if mine(row["agent_id"])]
    state.sent |= {row["rollback_id"] for row in store.query_json("SELECT rollback_id, agent_id FROM rollbacks")
                   if mine(row["agent_id"])}
    if tenant_budgets:
        state.tenant_runs = [row for row in store.query_json(
            # the inner query filters on the column (the outer one's alias would hide it from the index)
            "SELECT run_id, agent_id, tenant, toUnixTimestamp64Milli(ended_at) AS ended_at, toFloat64(cost_usd) AS cost_usd "
            f"FROM (SELECT * FROM runs WHERE tenant != '' AND ended_at >= {_SINCE})",
            {"since": newest - TENANT_HISTORY_MS if newest is not None else 0})
            if mine(tenant_partition_key(row["tenant"]))]
        state.sent |= {row["alert_id"] for row in store.query_json(
            "SELECT alert_id FROM alerts WHERE kind = 'budget' AND agent_id = '' AND run_id = ''")}
    return state


def _then_progress(store, pages: RunPages, state: MetricsState) -> Iterator[list[dict]]:  # noqa: ANN001
    """The pages, then the newest watermark an assembler partition has landed by now into
    `state`: no run read was emitted past it (the sink lands a run with its message's watermark)."""
    yield from pages
    progress = assembler_progress(store)
    state.landed_watermark = max(progress.values()) if progress else None


def _failure_modes(store, state: MetricsState, mine, window_ms: int, since: int) -> None:  # noqa: ANN001
    """The failure modes of the partition's mode keys as stored (ids, lifetime counts, breakdown),
    the failed runs of every agent with those keys since `since` (pages, read lazily), the closed
    runs per agent and window of that time, and the ids of the incidents already sent."""
    keyed = store.query_json(
        "SELECT cluster_id, agent_id, label, size, toUnixTimestamp64Milli(first_seen) AS first_seen, "
        "toUnixTimestamp64Milli(last_seen) AS last_seen, example_run_ids, kind, seed_signature "
        "FROM failure_clusters FINAL WHERE kind != ''")
    state.modes = [row for row in keyed if mine(row["kind"])]
    # A run already in a mode of another partition's key is that partition's to learn: not read
    # here (most failed runs of the history are; the others are told apart by their key below).
    theirs = [row["cluster_id"] for row in keyed if not mine(row["kind"])]
    if state.modes:
        state.mode_agents = store.query_json(
            "SELECT cluster_id, agent_id, agent_version, runs, toUnixTimestamp64Milli(first_seen) AS first_seen, "
            "toUnixTimestamp64Milli(last_seen) AS last_seen FROM failure_cluster_agents FINAL "
            "WHERE cluster_id IN {ids:Array(String)}", {"ids": [row["cluster_id"] for row in state.modes]})
    pages = RunPages(store, "outcome != 'success' AND failure_cluster_id NOT IN {theirs:Array(String)}",
                     {"theirs": theirs}, since)
    if pages.total:
        state.mode_history = (
            [row for row in page if mine(mode_key(row["outcome"], row["error_type"], row["error_message"],
                                                  bool(row["loop_detected"])))] for page in pages)
        state.mode_traffic = {}
        for row in store.query_json(
                "SELECT agent_id, intDiv(toUnixTimestamp64Milli(ended_at), {window:Int64}) * {window:Int64} AS window, "
                f"uniqExact(run_id) AS runs FROM runs WHERE ended_at >= {_SINCE} GROUP BY agent_id, window",
                {"window": window_ms, "since": since}):
            state.mode_traffic.setdefault(row["agent_id"], {})[int(row["window"])] = int(row["runs"])
    state.sent |= {row["alert_id"] for row in store.query_json(
        "SELECT alert_id FROM alerts WHERE kind = 'failure_cluster'")}
    if state.modes:
        # the alerts of incidents still open: firing, of an episode no `resolved` alert ended
        mine_ids = {fingerprint(KIND, row["cluster_id"]) for row in state.modes}
        state.mode_incidents = [{**row, "evidence": orjson.loads(row["evidence"])} for row in store.query_json(
            "SELECT alert_id, toUnixTimestamp64Milli(ts) AS ts, kind, severity, status, fingerprint, agent_id, "
            "agent_version, run_id, summary, evidence FROM alerts FINAL "
            "WHERE kind = 'failure_cluster' AND status = 'firing' "
            "AND (fingerprint, JSONExtractString(evidence, 'episode')) NOT IN "
            "(SELECT fingerprint, JSONExtractString(evidence, 'episode') FROM alerts "
            " WHERE kind = 'failure_cluster' AND status = 'resolved')") if row["fingerprint"] in mine_ids]


def _open_windows(store, agents: list[str], window_ms: int, history_since: int,  # noqa: ANN001
                  ) -> tuple[set[tuple[str, str, int]], RunPages | tuple, int]:
    """The agents' windows that are not final yet, the runs of those that ended before
    `history_since` (the history read holds the others), and where final windows end.

    A window emitted as final must stay as it is, and a window still open must be restored
    whole: re-emitted with part of its runs, it would replace the complete row.
    """
    params = {"agents": agents, "window": window_ms}
    (bounds,) = store.query_json(
        "SELECT toUnixTimestamp64Milli(maxIf(window_end, is_final)) AS final_before "
        "FROM agent_metrics WHERE agent_id IN {agents:Array(String)}", params)
    open_windows = {(row["agent_id"], row["agent_version"], int(row["window_start"])) for row in store.query_json(
        "SELECT agent_id, agent_version, toUnixTimestamp64Milli(window_start) AS window_start FROM agent_metrics "
        "WHERE agent_id IN {agents:Array(String)} AND NOT is_final", params)}
    first_open = min((key[2] for key in open_windows), default=history_since)
    older = RunPages(
        store, "agent_id IN {agents:Array(String)} AND ended_at < fromUnixTimestamp64Milli({history_since:Int64}, 'UTC') "
        "AND (agent_id, agent_version, intDiv(toUnixTimestamp64Milli(ended_at), {window:Int64}) * {window:Int64}) IN "
        "(SELECT agent_id, agent_version, toUnixTimestamp64Milli(window_start) FROM agent_metrics "
        " WHERE agent_id IN {agents:Array(String)} AND NOT is_final)", {**params, "history_since": history_since},
        first_open, columns=_WINDOW_COLUMNS,
    ) if first_open < history_since else ()
    return open_windows, older, int(bounds["final_before"] or 0)


class RunPages:
    """The `runs` rows matching `where` that ended at or after `since`, oldest first, in pages
    of at most `page_runs` rows (more only if that many ended within one second): slices of
    event time cut from a count of the rows per second. Counted at once; read lazily, a page
    ahead of the one in use, and given in chunks of at most `chunk_runs` rows parsed from the
    page's response as they are taken: a rebuild holds two responses and a chunk of rows, not
    hours of them (a row is ~2 KB in Python)."""

    def __init__(self, store, where: str, params: dict, since: int, page_runs: int = PAGE_RUNS,  # noqa: ANN001
                 columns: str = _RUN_COLUMNS, chunk_runs: int = CHUNK_RUNS) -> None:
        self._store, self._where, self._params, self._columns = store, where, params, columns
        self._chunk_runs = chunk_runs
        per_second = store.query_json(
            "SELECT intDiv(toUnixTimestamp64Milli(ended_at), 1000) AS second, count() AS runs FROM runs "
            f"WHERE ended_at >= {_SINCE} AND {where} GROUP BY second ORDER BY second", {**params, "since": since})
        self.total = sum(int(row["runs"]) for row in per_second)  # a run counted once per stored version of its row
        self.slices: list[tuple[int, int]] = []  # [since, until) in epoch ms
        rows = 0
        for row in per_second:
            second, runs = int(row["second"]), int(row["runs"])
            if self.slices and rows + runs <= page_runs:
                self.slices[-1] = (self.slices[-1][0], (second + 1) * 1000)
                rows += runs
            else:
                self.slices.append((max(since, second * 1000), (second + 1) * 1000))
                rows = runs

    def __iter__(self) -> Iterator[list[dict]]:
        # The next page is read while this one is folded in: the store works (in `up`, for a
        # worker) while the rebuild computes. Two responses held, and a chunk of rows.
        with ThreadPoolExecutor(1, thread_name_prefix="run-pages") as ahead:
            coming = None
            for since, until in self.slices:
                page = ahead.submit(self._page, since, until)
                if coming is not None:
                    yield from self._chunks(coming.result())
                coming = page
            if coming is not None:
                yield from self._chunks(coming.result())

    def _chunks(self, rows: Iterator[dict]) -> Iterator[list[dict]]:
        while chunk := list(islice(rows, self._chunk_runs)):
            yield chunk

    def _page(self, since: int, until: int) -> Iterator[dict]:
        # The inner query filters on the columns; the outer one renames them.
        return self._store.query_dicts(
            f"SELECT {self._columns} FROM (SELECT * FROM runs WHERE ended_at >= {_SINCE} "
            f"AND ended_at < fromUnixTimestamp64Milli({{until:Int64}}, 'UTC') AND {self._where}) "
            "ORDER BY ended_at, run_id", {**self._params, "since": since, "until": until})
