"""Recovery reads a bounded event-time range, served by skip indexes: a partition takeover costs the
same after a month of history as after an hour (issue 11.5). Real chdb, through the query service."""

import pytest

from streams.detect.runs import RUN_ID, TS
from streams.processors.recovery import RunPages, read_metrics_state, read_open_runs
from streams.store.clickhouse import running_service
from tests.conftest import RunningStack
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

NOW = 1_793_491_200_000  # event time the assembler of partition 0 had reached
HOUR = 3_600_000
DAY = 24 * HOUR
MONTH = 30 * DAY
OLD_EVENTS = 2_000_000  # 245 granules of 8,192 rows


class Recording:
    """The store recovery reads through, remembering each query it runs."""

    def __init__(self, store) -> None:  # noqa: ANN001
        self.store = store
        self.queries: list[tuple[str, dict]] = []

    def query_json(self, sql: str, parameters: dict | None = None) -> list[dict]:
        self.queries.append((sql, parameters or {}))
        return self.store.query_json(sql, parameters)

    def query_lists(self, sql: str, parameters: dict | None = None) -> list[list]:
        self.queries.append((sql, parameters or {}))
        return self.store.query_lists(sql, parameters)

    def query_dicts(self, sql: str, parameters: dict | None = None) -> list[dict]:
        self.queries.append((sql, parameters or {}))
        return self.store.query_dicts(sql, parameters)


def _write(stack: RunningStack, sql: str) -> None:
    done = stack.cli("sql", "--write", sql, check=False)
    assert done.returncode == 0, done.stderr.decode()[-800:]


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A month of closed runs (10 events each) on partition 0 up to three days ago, and three runs still open."""
    stack = RunningStack(tmp_path_factory.mktemp("stack"))
    stack.start()
    start = NOW - MONTH - 3 * DAY
    step = MONTH // OLD_EVENTS
    _write(stack, f"""INSERT INTO events (event_id, ts, type, run_id, agent_id, agent_version, source, ingested_at)
        SELECT concat('old-', toString(number)), fromUnixTimestamp64Milli(toInt64({start} + number * {step}), 'UTC'),
               'tool_call', concat('old-run-', toString(intDiv(number, 10))), 'bulk', 'v1',
               concat('agent.events:0:', toString(number)), now64(3)
        FROM numbers({OLD_EVENTS})""")
    _write(stack, f"""INSERT INTO runs (run_id, agent_id, agent_version, started_at, ended_at, outcome, version)
        SELECT concat('old-run-', toString(number)), 'bulk', 'v1',
               fromUnixTimestamp64Milli(toInt64({start} + number * 10 * {step}), 'UTC'),
               fromUnixTimestamp64Milli(toInt64({start} + (number * 10 + 9) * {step}), 'UTC'), 'success', 20
        FROM numbers({OLD_EVENTS // 10})""")
    open_events = [("recent-1", NOW - 10 * 60_000), ("recent-2", NOW - 5 * 60_000),
                   ("long", NOW - 5 * HOUR), ("long", NOW - 4 * 60_000)]  # a run older than the horizon
    values = ", ".join(
        f"('open-{i}', fromUnixTimestamp64Milli({ts}, 'UTC'), 'tool_call', '{run}', 'bulk', 'v1', "
        f"'agent.events:0:{OLD_EVENTS + i}', now64(3))" for i, (run, ts) in enumerate(open_events))
    _write(stack, f"INSERT INTO events (event_id, ts, type, run_id, agent_id, agent_version, source, ingested_at) "
                  f"SELECT * FROM (SELECT * FROM values('a String, b DateTime64(3), c String, d String, e String, "
                  f"f String, g String, h DateTime64(3)', {values}))")
    _write(stack, f"INSERT INTO stage_progress SELECT 'assemble_runs', number, "
                  f"fromUnixTimestamp64Milli({NOW}, 'UTC'), now64(3) FROM numbers(4)")
    _write(stack, "OPTIMIZE TABLE events FINAL")  # merged parts, as a month of history would be
    yield stack
    assert stack.stop() == 0


def _rows_read(stack: RunningStack, queries: list[tuple[str, dict]], table: str) -> int:
    """What ClickHouse estimates the queries read of `table` (EXPLAIN ESTIMATE: after partition,
    primary key and skip-index pruning)."""
    store = running_service(stack.settings)
    return sum(int(row["rows"]) for sql, params in queries
               for row in store.query_json(f"EXPLAIN ESTIMATE {sql}", params) if row["table"] == table)


def test_open_runs_come_back_whole_from_a_bounded_read(history):
    store = Recording(running_service(history.settings))
    reads, sent = read_open_runs(store, 4, 0, HOUR, runs_per_read=2)
    assert sent == set()
    by_run = {}
    for events in reads:
        assert len({event[RUN_ID] for event in events}) <= 2  # a few runs at a time, each whole
        for event in events:
            by_run.setdefault(event[RUN_ID], []).append(event[TS])
    assert by_run == {"recent-1": [NOW - 10 * 60_000], "recent-2": [NOW - 5 * 60_000],
                      "long": [NOW - 5 * HOUR, NOW - 4 * 60_000]}
    read = _rows_read(history, store.queries, "events")
    assert read < OLD_EVENTS * 0.05, f"recovery reads {read} of {OLD_EVENTS} events"


def test_rows_as_lists_are_the_rows_as_dicts_in_column_order(history):
    store = running_service(history.settings)
    sql = "SELECT number AS n, toString(number) AS s, [number, 1] AS a FROM numbers(3) WHERE number >= {low:UInt64}"
    assert list(store.query_lists(sql, {"low": 1})) == [list(row.values()) for row in store.query_json(sql, {"low": 1})]
    assert list(store.query_lists(sql, {"low": 1})) == [[1, "1", [1, 1]], [2, "2", [2, 1]]]
    assert list(store.query_lists(sql, {"low": 5})) == []
    assert list(store.query_dicts(sql, {"low": 1})) == store.query_json(sql, {"low": 1})
    assert list(store.query_dicts(sql, {"low": 5})) == []


def test_a_metrics_partition_reads_recent_runs_only(history):
    store = Recording(running_service(history.settings))
    state = read_metrics_state(store, 4, 0, 300_000, 3 * HOUR, tenant_budgets=True)
    # nothing of the month ended in the last 3 hours, nor (tenant budgets) in the last two days
    assert list(state.history) == [] and list(state.window_runs) == [] and state.tenant_runs == []
    read = _rows_read(history, store.queries, "runs")
    assert read < OLD_EVENTS // 10 * 0.05, f"recovery reads {read} of {OLD_EVENTS // 10} runs"


def test_recent_runs_are_read_a_page_at_a_time(history):
    """A rebuild holds two pages of runs, the one in use and the next (read meanwhile): slices of
    event time of at most `page_runs` rows, cut where the runs are dense (a burst of 2,000 runs
    in 5 minutes among 1,000 over 2 hours). A page is folded in chunks of at most `chunk_runs`."""
    spread = ", ".join(f"('spread-{n}', {NOW - 2 * HOUR + n * 7_000})" for n in range(1_000))
    burst = ", ".join(f"('burst-{n}', {NOW - HOUR + n * 150})" for n in range(2_000))
    _write(history, "INSERT INTO runs (run_id, agent_id, agent_version, started_at, ended_at, outcome, version) "
                    "SELECT run, 'paged', 'v1', fromUnixTimestamp64Milli(ts, 'UTC'), fromUnixTimestamp64Milli(ts, 'UTC'), "
                    f"'success', 20 FROM values('run String, ts Int64', {spread}, {burst})")
    store = Recording(running_service(history.settings))
    pages = RunPages(store, "agent_id = {agent:String}", {"agent": "paged"}, NOW - 3 * HOUR, page_runs=300,
                     chunk_runs=70)
    assert pages.total == 3_000 and len(store.queries) == 1  # counted, nothing read yet
    reading = iter(pages)
    read = [next(reading)]
    wait_until(lambda: len(store.queries), 30, "the next page read while this one is in use", lambda n: n == 3)
    read += list(reading)
    assert len(store.queries) - 1 <= 3_000 // 300 * 2  # pages of at most 300 runs
    assert all(0 < len(chunk) <= 70 for chunk in read) and len(read) >= 3_000 // 70
    rows = [row for page in read for row in page]
    assert len({row["run_id"] for row in rows}) == 3_000 == len(rows)
    assert [(row["ended_at"], row["run_id"]) for row in rows] == sorted((row["ended_at"], row["run_id"]) for row in rows)


def test_open_windows_take_their_runs_from_the_history_read_and_the_landed_watermark_after_it(history):
    """The runs of windows not final yet come from the history's pages (one read of them); only
    a window open for longer than the history reads its older runs on its own. The watermark
    that bounds when restored runs are sealed is read after the pages: a run landed while they
    were read was emitted up to it."""
    from streams.contracts.topics import agent_partition

    window = 300_000
    partition = agent_partition("windowed", 4)
    open_start, final_start, stale_start = NOW - 10 * 60_000, NOW - 60 * 60_000, NOW - 4 * HOUR
    _write(history, "INSERT INTO agent_metrics (agent_id, agent_version, window_start, window_end, is_final, version) "
                    "SELECT 'windowed', 'v1', fromUnixTimestamp64Milli(s, 'UTC'), fromUnixTimestamp64Milli(s + 300000, 'UTC'), "
                    f"f, 1 FROM values('s Int64, f Bool', ({open_start}, false), ({final_start}, true), ({stale_start}, false))")
    runs = [("in-open", open_start + 1_000), ("in-final", final_start + 1_000), ("in-stale", stale_start + 1_000)]
    _write(history, "INSERT INTO runs (run_id, agent_id, agent_version, started_at, ended_at, outcome, version) "
                    "SELECT run, 'windowed', 'v1', fromUnixTimestamp64Milli(ts, 'UTC'), fromUnixTimestamp64Milli(ts, 'UTC'), "
                    "'success', 20 FROM values('run String, ts Int64', "
                    + ", ".join(f"('{run}', {ts})" for run, ts in runs) + ")")
    store = running_service(history.settings)
    state = read_metrics_state(store, 4, partition, window, 3 * HOUR, tenant_budgets=False)
    assert state.open_windows == {("windowed", "v1", open_start), ("windowed", "v1", stale_start)}
    assert [row["run_id"] for page in state.window_runs for row in page] == ["in-stale"]
    _write(history, f"INSERT INTO stage_progress SELECT 'assemble_runs', 1, fromUnixTimestamp64Milli({NOW + 60_000}, 'UTC'), now64(3)")
    assert state.landed_watermark is None, "read once the history has been"
    read = [row["run_id"] for page in state.history for row in page if row["agent_id"] == "windowed"]
    assert read == ["in-final", "in-open"]
    assert state.landed_watermark == NOW + 60_000


def test_failed_runs_already_in_a_mode_are_learnt_again_by_the_partition_of_that_mode(history):
    """Each metrics partition relearns the failed runs of its failure mode keys. A run already in
    a stored mode belongs to that mode's partition and is not read by the others (most failed
    runs are in one); a run in none goes by its own key."""
    from streams.contracts.topics import agent_partition, mode_partition_key
    from streams.detect.failures import mode_key

    def partition_of(error_type: str) -> int:
        return agent_partition(mode_partition_key(mode_key("failure", error_type, "", False)), 4)

    types = [f"Error{n}" for n in range(40)]
    mine = types[0]
    theirs = next(t for t in types if partition_of(t) != partition_of(mine))
    partition = partition_of(mine)
    _write(history, "INSERT INTO failure_clusters (cluster_id, kind) SELECT * FROM values('id String, kind String', "
                    f"('mode-mine', '{mode_key('failure', mine, '', False)}'), "
                    f"('mode-theirs', '{mode_key('failure', theirs, '', False)}'))")
    runs = [("f-in-mine", mine, "mode-mine"), ("f-free-mine", mine, ""), ("f-free-theirs", theirs, ""),
            ("f-in-theirs", mine, "mode-theirs")]  # its own key is this partition's, its mode is not
    _write(history, "INSERT INTO runs (run_id, agent_id, agent_version, started_at, ended_at, outcome, error_type, "
                    "failure_cluster_id, version) SELECT run, 'failing', 'v1', fromUnixTimestamp64Milli(ts, 'UTC'), "
                    "fromUnixTimestamp64Milli(ts, 'UTC'), 'failure', type, cluster, 20 FROM values("
                    "'run String, type String, cluster String, ts Int64', "
                    + ", ".join(f"('{run}', '{kind}', '{cluster}', {NOW - HOUR})" for run, kind, cluster in runs) + ")")
    state = read_metrics_state(running_service(history.settings), 4, partition, 300_000, 3 * HOUR, tenant_budgets=False)
    learnt = {row["run_id"] for page in state.mode_history for row in page if row["agent_id"] == "failing"}
    assert learnt == {"f-in-mine", "f-free-mine"}
    assert [row["cluster_id"] for row in state.modes if row["cluster_id"].startswith("mode-")] == ["mode-mine"]
