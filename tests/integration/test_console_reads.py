"""The console's reads made fast for a large store (issue 16's benchmark) answer what direct
counts over the raw tables answer, on a store filled as `jobs.bench_console` fills it (a simulated
day copied day after day), in real chdb."""

import re

import pytest
from rich.console import Console
from starlette.testclient import TestClient

from jobs.bench_console import fill
from jobs.simulate import DEFAULT_CANARY
from streams.console import reads
from streams.console.app import Console as ConsoleApp
from streams.detect.canary import METRICS, CanaryAnalysis, CanaryPolicy
from streams.settings import Settings
from streams.store.clickhouse import Store

pytestmark = pytest.mark.integration

BASE_RUNS = 4_000
COPIES = 3
DAY_MS = 24 * 3_600_000


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = Store(f"chdb://{tmp_path_factory.mktemp('console-reads')}/clickhouse", "trackside")
    store.migrate()
    base = 13.2 * BASE_RUNS  # events a run, about
    fill(store, int(base * (COPIES - 0.5)), Console(quiet=True), base_runs=BASE_RUNS)
    yield store
    store.close()


@pytest.fixture(scope="module")
def read(store):
    return lambda sql, params: store.query_json(sql, params, person=False)


def _one(store: Store, sql: str, params: dict | None = None):
    return store.query_rows(sql, params)[0][0]


def test_the_filled_store_is_days_of_a_fleet(store):
    runs, run_ids = store.query_rows("SELECT count(), uniqExact(run_id) FROM trackside.runs FINAL")[0]
    assert runs == run_ids == COPIES * BASE_RUNS, "every copy's runs have ids of their own"
    orphans = _one(store, "SELECT count() FROM trackside.events WHERE run_id NOT IN (SELECT run_id FROM trackside.runs)")
    assert orphans == 0
    days = store.query_rows("SELECT toDate(ended_at) AS day, count() FROM trackside.runs GROUP BY day ORDER BY day")
    assert len(days) >= COPIES and min(n for _, n in days[:COPIES]) > BASE_RUNS // 2, "spread over the days"
    agents, versions = store.query_rows("SELECT uniqExact(agent_id), uniqExact(agent_id, agent_version) "
                                        "FROM trackside.runs WHERE position(run_id, '~') > 0")[0]
    assert agents >= 3 and versions >= 6
    for table, column in (("drift", "window"), ("dead_letters", "received_at"), ("alerts", "ts")):
        hours = _one(store, f"SELECT dateDiff('hour', min({column}), max({column})) FROM trackside.{table}")
        assert hours >= (COPIES - 1) * 24, f"{table} over every day"


def test_tools_as_counted_from_the_tool_calls(store, read):
    """Calls, error and timeout rates and the versions that use it, counted here in Python from the
    raw tool calls of the range; retries (a call right after a failed call of the same tool in its
    run) from every call of the runs that ended in the range."""
    newest = _one(store, "SELECT toUnixTimestamp64Milli(max(ts)) FROM trackside.events FINAL WHERE type = 'tool_call'")
    assert reads.newest_tool_call(read) == newest
    since = newest - 6 * 3_600_000
    for agent_id in ("", "support-bot"):
        calls = store.query_json(
            "SELECT run_id, toUnixTimestamp64Milli(ts) AS ts_ms, event_id, tool, status, agent_id, agent_version, "
            "ts > fromUnixTimestamp64Milli({since:Int64}, 'UTC') AS in_range, "
            "run_id IN (SELECT run_id FROM trackside.runs FINAL WHERE ended_at > fromUnixTimestamp64Milli({since:Int64}, 'UTC')) "
            "AS run_in_range FROM trackside.events FINAL WHERE type = 'tool_call' "
            "AND ({agent_id:String} = '' OR agent_id = {agent_id:String})",
            {"since": since, "agent_id": agent_id}, person=False)
        expected: dict[str, dict] = {}
        previous: dict[str, dict] = {}
        retries: dict[str, int] = {}
        for call in sorted(calls, key=lambda c: (c["run_id"], c["ts_ms"], c["event_id"])):
            before = previous.get(call["run_id"])
            previous[call["run_id"]] = call
            if call["run_in_range"] and before and before["tool"] == call["tool"] and before["status"] in ("error", "timeout"):
                retries[call["tool"]] = retries.get(call["tool"], 0) + 1
            if not call["in_range"]:
                continue
            tool = expected.setdefault(call["tool"], {"calls": 0, "errors": 0, "timeouts": 0, "used_by": set()})
            tool["calls"] += 1
            tool["errors"] += call["status"] == "error"
            tool["timeouts"] += call["status"] == "timeout"
            tool["used_by"].add(f"{call['agent_id']} {call['agent_version']}")
        for name, tool in expected.items():
            tool["retries"] = retries.get(name, 0)
        rows, series = reads.tools(read, 6, agent_id)
        assert sum(t["retries"] for t in expected.values()) > 0, "the fleet retries failed calls"
        assert {row["tool"]: (row["calls"], row["error_rate"], row["timeout_rate"], row["retries"], row["used_by"])
                for row in rows} == {
            name: (t["calls"], t["errors"] / t["calls"], t["timeouts"] / t["calls"], t["retries"], sorted(t["used_by"]))
            for name, t in expected.items()}
        assert [row["calls"] for row in rows] == sorted((row["calls"] for row in rows), reverse=True)
        assert set(series) == set(expected)


def test_the_newest_is_found_when_the_last_day_has_none(store, read):
    """The newest tool call and drift window are looked for in the day before the newest run's end;
    when that day has none (the hint is misleading), the whole table is read."""
    def far_hint(sql, params):
        if sql == reads.NEWEST_RUN_HINT:
            return [{"ended": 4_000_000_000_000}]  # the year 2096
        return read(sql, params)

    tool_call = _one(store, "SELECT toUnixTimestamp64Milli(max(ts)) FROM trackside.events FINAL WHERE type = 'tool_call'")
    window = _one(store, "SELECT toUnixTimestamp64Milli(max(window)) FROM trackside.drift FINAL")
    assert reads.newest_tool_call(far_hint) == reads.newest_tool_call(read) == tool_call
    assert reads._newest(far_hint, reads.NEWEST_DRIFT_WINDOW) == reads._newest(read, reads.NEWEST_DRIFT_WINDOW) == window
    assert reads._newest(lambda sql, params: [{"ended": None}] if sql == reads.NEWEST_RUN_HINT else
                         [{"newest": None}], reads.NEWEST_TOOL_CALL) is None


def test_the_canary_replay_stops_where_the_analysis_must_have_ended(store, read):
    """The trajectory is the analysis (`decide`) replayed over both arms' runs since the canary
    started, in the order they ended, up to max_runs canary runs."""
    canary = reads.canary(read, "support-bot", DEFAULT_CANARY.version)
    assert canary["verdict"] == "rollback"
    last = canary["canary_runs"] + 40  # the replay goes on past the decision, to max_runs
    policy = CanaryPolicy(max_runs=last, promote_after=last)
    rows = store.query_json(
        "SELECT run_id, agent_version, outcome, toFloat64(cost_usd) AS cost_usd, loop_detected, tool_calls, "
        "tool_errors, duration_ms, toUnixTimestamp64Milli(ended_at) AS ended_ms FROM trackside.runs FINAL "
        "WHERE agent_id = 'support-bot' AND agent_version IN ({stable:String}, {canary:String}) "
        "AND toUnixTimestamp64Milli(ended_at) >= {since:Int64} ORDER BY ended_at, run_id",
        {"stable": canary["stable_version"], "canary": canary["version"], "since": canary["since"]}, person=False)
    analysis, runs, points = CanaryAnalysis(policy), [], {metric: [] for metric in METRICS}
    for row in rows:
        arm = "canary" if row["agent_version"] == canary["version"] else "stable"
        analysis.add(arm, [row])
        if arm == "canary":
            verdict = analysis.decide()
            runs.append(verdict.canary_runs)
            for result in verdict.metrics:
                points[result.metric].append(result.p_value)
            analysis.verdict_ = None
            if len(runs) == policy.max_runs:
                break
    trajectory = reads.canary_trajectory(read, canary, policy)
    assert trajectory["runs"] == runs == list(range(1, policy.max_runs + 1))
    assert trajectory["p_values"] == points
    assert trajectory["decided_at_run"] == canary["canary_runs"]
    older = _one(store, "SELECT count() FROM trackside.runs FINAL WHERE agent_id = 'support-bot' "
                        "AND toUnixTimestamp64Milli(ended_at) < {since:Int64}", {"since": canary["since"]})
    assert older > 0, "stable runs from before the canary, left out"


def test_drift_heatmap_and_its_cells(store, read):
    newest = _one(store, "SELECT toUnixTimestamp64Milli(max(window)) FROM trackside.drift FINAL")
    cells = store.query_rows(
        "SELECT agent_id, agent_version, toUnixTimestamp64Milli(window), feature, max(statistic) FROM trackside.drift "
        "FINAL WHERE toUnixTimestamp64Milli(window) > {since:Int64} AND position(feature, '@') = 0 "
        "GROUP BY ALL", {"since": newest - 24 * 3_600_000})
    versions = reads.drift(read, 24)
    shown = {(agent, version, w, f): c["statistic"] for (agent, version), v in versions.items()
             for (f, w), c in v["cells"].items()}
    assert shown == {(a, v, w, f): statistic for a, v, w, f, statistic in cells} and len(shown) > 50
    for (agent, version, w, f), _ in list(shown.items())[::97]:
        assert reads.drift_test(read, agent, version, f, w) == versions[(agent, version)]["cells"][(f, w)]
    assert reads.drift_test(read, "support-bot", "v0", "cost_usd", newest) is None
    page = TestClient(ConsoleApp(Settings(console_port=0, metrics_port=0), read, None).app()).get("/drift?hours=24")
    assert page.status_code == 200
    assert len(re.findall(r'<td class="cell [^"]*" style=', page.text)) == len(shown)
    assert set(re.findall(r'<a href="(/drift/[^"]*)">', page.text)) == {
        f"/drift/{a}/{v}?feature={f}&window={w}&hours=24" for a, v, w, f in shown}
    cell = versions[next(iter(versions))]["cells"]
    (f, w), test = next(iter(cell.items()))
    assert f'title="{f} at ' in page.text and f'{test["statistic"]} ' in page.text
    assert page.text.count('<td class="cell none">') == sum(
        len(v["features"]) * len(v["windows"]) - len(v["cells"]) for v in versions.values())


def test_a_long_range_heatmap_shows_each_buckets_most_telling_test(store, read):
    """Past MAX_DRIFT_COLUMNS windows a column is a bucket of windows, its cell the bucket's
    drifted test first, then its smallest p-value (then the earliest window, then statistic),
    linked to that test's own window; checked against every test of the range in Python."""
    hours, window_ms, columns = 72, 300_000, 20
    newest = _one(store, "SELECT toUnixTimestamp64Milli(max(window)) FROM trackside.drift FINAL")
    tests = store.query_rows(
        "SELECT agent_id, agent_version, feature, toUnixTimestamp64Milli(window), statistic, p_value, significant "
        "FROM trackside.drift FINAL WHERE toUnixTimestamp64Milli(window) > {since:Int64} AND position(feature, '@') = 0",
        {"since": newest - hours * 3_600_000})
    per_column = -(-hours * 3600 // (300 * columns))
    bucket = per_column * window_ms
    best: dict[tuple, tuple] = {}
    for agent, version, feature, window, statistic, p, significant in tests:
        key = (agent, version, feature, window // bucket * bucket)
        rank = (not significant, 2.0 if p is None else p, window, statistic)
        if key not in best or rank < best[key]:
            best[key] = rank
    versions = reads.drift(read, hours, window_s=300, max_columns=columns)
    shown = {(agent, version, f, column): (not c["significant"], 2.0 if c["p_value"] is None else c["p_value"],
                                          c["window_ms"], c["statistic"])
             for (agent, version), v in versions.items() for (f, column), c in v["cells"].items()}
    assert shown == best and len(best) > 50
    assert {v["windows_per_column"] for v in versions.values()} == {per_column} and per_column > 1
    assert max(len(v["windows"]) for v in versions.values()) <= columns + 1
    assert len(tests) > 5 * len(best)  # a cell is picked among many tests
    assert next(iter(reads.drift(read, 24).values()))["windows_per_column"] == 1  # a day is window by window
    page = TestClient(ConsoleApp(Settings(console_port=0, metrics_port=0), read, None).app()).get("/drift?hours=2400")
    assert page.status_code == 200 and "a column per 100 windows" in page.text
    windows = {w for *_, w, _, _, _ in store.query_rows(
        "SELECT agent_id, agent_version, feature, toUnixTimestamp64Milli(window), statistic, p_value, significant "
        "FROM trackside.drift FINAL")}
    linked = {int(w) for w in re.findall(r'<a href="/drift/[^"]*&window=(\d+)&hours=2400">', page.text)}
    assert linked and linked <= windows  # a cell opens its own test's window


def test_a_run_has_each_of_its_events_once(store, read):
    """The run's events through PREWHERE and FINAL without merging across partitions: a
    redelivered event stored twice (another part) shows once, and a run across a month's end
    (two partitions) has all of its events."""
    run_id = _one(store, "SELECT run_id FROM trackside.runs FINAL WHERE steps > 3 ORDER BY run_id LIMIT 1")
    store.command("INSERT INTO trackside.events SELECT * REPLACE (ingested_at + 1 AS ingested_at) FROM "
                  "trackside.events WHERE run_id = {run_id:String}", {"run_id": run_id})
    store.command("INSERT INTO trackside.events SELECT * REPLACE (concat(event_id, '-next-month') AS event_id, "
                  "ts + toIntervalDay(40) AS ts) FROM trackside.events FINAL WHERE run_id = {run_id:String} "
                  "ORDER BY ts LIMIT 1", {"run_id": run_id})
    assert _one(store, "SELECT uniqExact(toYYYYMM(ts)) FROM trackside.events WHERE run_id = {r:String}", {"r": run_id}) == 2
    expected = store.query_rows("SELECT event_id FROM trackside.events FINAL WHERE run_id = {r:String} "
                                "ORDER BY ts, event_id", {"r": run_id})
    events = reads.run_events(read, run_id)
    assert [e["event_id"] for e in events] == [event_id for (event_id,) in expected]
    assert len(events) == len({e["event_id"] for e in events}) > 4


def test_alert_kinds_are_those_of_the_newest_alerts(store, read):
    kinds = store.query_rows("SELECT DISTINCT kind FROM (SELECT kind FROM trackside.alerts FINAL "
                             "ORDER BY ts DESC, alert_id LIMIT 5000) ORDER BY kind")
    assert reads.alert_kinds(read) == [kind for (kind,) in kinds] and len(kinds) >= 2
