"""How fast the console answers (issue 16): every API call and page on a store filled with
`--events` events, the live runs view with 10,000 open runs, and an event's way to Live runs.

    python -m jobs.bench_console [--events 10000000] [--repeat 20]

1. A store of its own (chdb, no `up`): a simulated fleet (three agents, six versions, a canary
   rolled back) goes through the real code paths (event validation, run assembly, windows, drift
   tests, canary analysis, alerts), then its day is copied inside ClickHouse, each copy with other
   run, event and alert ids and the next day of event time (events, runs, alerts, windows, drift
   tests), until it holds `--events` events (10 million: 38 days, ~760k runs), with 5,000 dead
   letters a day; merged (`OPTIMIZE FINAL`) as a store that has run a while would be. The console serves it; each
   request is timed at the client (server time plus a local round trip), p50/p95 over `--repeat`.
2. Live runs: 10,000 open runs in the live view, the endpoint's work (snapshot and JSON) timed.
3. An event's way: `trackside up`, a new run's first events published one run at a time, the time
   until `/api/v1/runs/live` lists it.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from jobs.bench import _quantile, start_up, up_env
from jobs.simulate import DEFAULT_CANARY, FleetConfig, genai_prices_fn, simulate
from streams.console.app import JSON, ConsoleServer
from streams.console.live import LiveRuns
from streams.contracts import tables
from streams.contracts.events import parse
from streams.contracts.messages import pack
from streams.contracts.messages import ClosedRuns
from streams.processors.metrics import MetricsPartition, MetricsState
from streams.detect.runs import RunAssembler
from streams.ingest.decode import event_row
from streams.ops.broker import free_port
from streams.settings import Settings
from streams.store.clickhouse import Store

TARGET_MS = 300.0
LIVE_TARGET_MS = 100.0
VISIBLE_TARGET_MS = 1000.0
BASE_RUNS = 20_000
DEAD_LETTERS_PER_DAY = 5_000
DEAD_LETTER_ERRORS = ("field 'ts': not an RFC 3339 timestamp: 'yesterday'", "field 'run_id': required",
                      "not valid JSON: invalid literal, expected 'null': line 1 column 1 (char 0)",
                      "field 'ts': event time 1 ms is before 2000 or more than a day in the future",
                      "field 'input_tokens': must be a non-negative integer, got -3")


def fill(store: Store, events_wanted: int, console: Console, base_runs: int = BASE_RUNS) -> tuple[int, int]:
    """A day of a fleet through the real code paths, copied day after day until the store holds
    `events_wanted` events."""
    config = FleetConfig(seed=11, runs=base_runs, canary=DEFAULT_CANARY, price_fn=genai_prices_fn,
                         duration_ms=24 * 3_600_000)
    started = time.monotonic()
    events = [parse(orjson.dumps(raw)) for raw in simulate(config)]
    rows = []
    for event in events:
        event["cost_source"] = "reported" if event["cost_usd"] is not None else ""
        row = event_row(event)
        row[tables.EVENTS.names.index("source")] = "agent.events:0:0"
        row[tables.EVENTS.names.index("ingested_at")] = event["ts"]
        rows.append(row)
    store.insert_arrow("events", tables.to_arrow(rows, tables.EVENTS))
    assembler = RunAssembler(30 * 60_000)
    runs = assembler.apply(events, now_ms=0) + assembler.advance(now_ms=0)
    assembler.max_ts += 10 * 3_600_000  # every run closes
    runs += assembler.advance(now_ms=0)
    store.insert_arrow("runs", tables.to_arrow(runs, tables.RUNS))
    # the metrics stage itself: windows, drift tests, failure clusters, canary analyses, alerts
    settings = Settings(partitions=1)
    stage = MetricsPartition(0, settings, settings.policy(), MetricsState(), now_ms=1)
    runs.sort(key=lambda run: run["ended_at"])
    found: dict[str, list] = {"agent_metrics": [], "drift": [], "failure_clusters": [], "canaries": [], "alerts": [],
                              "rollbacks": []}
    for at in range(0, len(runs), 500):
        batch = runs[at:at + 500]
        out = stage.handle(ClosedRuns(0, batch[-1]["ended_at"] + 3_600_000 if at + 500 >= len(runs)
                                      else batch[-1]["ended_at"], batch), processed_ts=1, now_ms=2 + at)
        for table, rows in out.results.rows_by_table().items():
            if table != "runs":
                found.setdefault(table, []).extend(rows)
        found["alerts"] += [{**alert, "evidence": orjson.dumps(alert["evidence"]).decode(),
                             "action": alert.get("action", "")} for alert in out.alerts]
        found["rollbacks"] += [{**rollback, "evidence": orjson.dumps(rollback["evidence"]).decode()}
                               for rollback in out.rollbacks]
    found["alerts"] += [{**alert, "evidence": orjson.dumps(alert["evidence"]).decode(),
                         "action": alert.get("action", "")} for alert in assembler.take_alerts()]
    for table, rows in found.items():
        store.insert_arrow(table, tables.to_arrow(rows, tables.BY_TABLE[table]))
    base = len(events)
    copies = max(1, math.ceil(events_wanted / base))
    console.print(f"base fleet: {len(runs):,} runs, {base:,} events, "
                  + ", ".join(f"{len(rows):,} {table}" for table, rows in found.items())
                  + f", through the code paths in "
                  f"{time.monotonic() - started:.0f} s; {copies} copies")
    span = config.duration_ms
    db = store.database
    # each copy reads the base rows in a subquery: in its own WHERE a REPLACE alias shadows the column
    for k in range(1, copies):
        shift = k * span
        store.command(f"INSERT INTO {db}.events SELECT * REPLACE (concat(event_id, '~{k}') AS event_id, "
                      f"concat(run_id, '~{k}') AS run_id, ts + toIntervalMillisecond({shift}) AS ts, "
                      f"ingested_at + toIntervalMillisecond({shift}) AS ingested_at) "
                      f"FROM (SELECT * FROM {db}.events WHERE position(event_id, '~') = 0)")
        store.command(f"INSERT INTO {db}.runs SELECT * REPLACE (concat(run_id, '~{k}') AS run_id, "
                      f"started_at + toIntervalMillisecond({shift}) AS started_at, "
                      f"ended_at + toIntervalMillisecond({shift}) AS ended_at) "
                      f"FROM (SELECT * FROM {db}.runs WHERE position(run_id, '~') = 0)")
        store.command(f"INSERT INTO {db}.alerts SELECT * REPLACE (concat(alert_id, '~{k}') AS alert_id, "
                      f"concat(fingerprint, '~{k}') AS fingerprint, if(run_id = '', '', concat(run_id, '~{k}')) AS run_id, "
                      f"ts + toIntervalMillisecond({shift}) AS ts) "
                      f"FROM (SELECT * FROM {db}.alerts WHERE position(alert_id, '~') = 0)")
        store.command(f"INSERT INTO {db}.agent_metrics SELECT * REPLACE ("
                      f"window_start + toIntervalMillisecond({shift}) AS window_start, "
                      f"window_end + toIntervalMillisecond({shift}) AS window_end) FROM (SELECT * FROM {db}.agent_metrics "
                      f"WHERE window_start < fromUnixTimestamp64Milli({config.start_ms + span}, 'UTC'))")
        store.command(f"INSERT INTO {db}.drift SELECT * REPLACE (window + toIntervalMillisecond({shift}) AS window, "
                      f"updated_at + toIntervalMillisecond({shift}) AS updated_at) FROM (SELECT * FROM {db}.drift "
                      f"WHERE window < fromUnixTimestamp64Milli({config.start_ms + span}, 'UTC'))")
    # rejected messages, as a fleet's bad producers send them: a few a minute, spread over the whole span
    dead = copies * DEAD_LETTERS_PER_DAY * span // 86_400_000
    store.command(f"INSERT INTO {db}.dead_letters SELECT fromUnixTimestamp64Milli({config.start_ms} + intDiv(number * "
                  f"{copies * span}, {dead}), 'UTC') AS received_at, concat('agent.events:', toString(number % 4), ':', "
                  f"toString(number)) AS source, 'agent.events', number % 4, number, concat('run-', toString(number)), "
                  f"{{errors:Array(String)}}[number % {len(DEAD_LETTER_ERRORS)} + 1] AS error, "
                  f"concat('{{\"event_id\": \"dl-', toString(number), "
                  f"'\", \"ts\": \"yesterday\", \"type\": \"llm_call\"}}') "
                  f"AS payload, length(payload) FROM numbers({dead})", {"errors": list(DEAD_LETTER_ERRORS)})
    started = time.monotonic()
    store.optimize()
    (events_n,), = store.query_rows(f"SELECT count() FROM {db}.events")
    (runs_n,), = store.query_rows(f"SELECT count() FROM {db}.runs")
    console.print(f"store: {events_n:,} events, {runs_n:,} runs; merged in {time.monotonic() - started:.0f} s")
    return events_n, runs_n


def _time(url: str, repeat: int) -> list[float]:
    took = []
    for i in range(repeat + 2):
        began = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=120) as response:
                response.read()
        except urllib.error.HTTPError as error:  # the gate answers 409 for a rollback, the live API 503 without a broker
            if error.code >= 500 and error.code != 503:
                raise
            error.read()
        if i >= 2:  # two to warm up (the query's first parse, the page's template)
            took.append((time.perf_counter() - began) * 1000)
    return took


def store_phase(events: int, repeat: int, console: Console, keep: Path | None = None) -> list[tuple[str, list[float]]]:
    """Fill a store (or reuse the one `keep` holds, filled by an earlier run), serve it, time each page."""
    data_dir = keep or Path(tempfile.mkdtemp(prefix="trackside-bench-console-"))
    reuse = keep is not None and (keep / "filled").exists()
    try:
        store = Store(f"chdb://{data_dir}/clickhouse", "trackside")
        store.migrate()
        if reuse:
            (events_n,), = store.query_rows("SELECT count() FROM trackside.events")
            console.print(f"store of {data_dir}: {events_n:,} events (filled before; --events ignored)")
        else:
            began = time.monotonic()
            fill(store, events, console)
            console.print(f"filled in {time.monotonic() - began:.0f} s")
            if keep is not None:
                (keep / "filled").touch()
        size = store.query_rows("SELECT sum(bytes_on_disk) FROM system.parts WHERE active AND database = 'trackside'")
        console.print(f"store size on disk: {size[0][0] / 1e6:,.0f} MB")
        run_id = store.query_rows("SELECT run_id FROM trackside.runs WHERE loop_detected ORDER BY run_id LIMIT 1")[0][0]
        # a drift cell of the newest window: the heatmap's link
        cell = store.query_rows("SELECT agent_id, agent_version, feature, toUnixTimestamp64Milli(window) "
                                "FROM trackside.drift "
                                "WHERE significant AND position(feature, '@') = 0 ORDER BY window DESC, agent_id, "
                                "agent_version, feature LIMIT 1")[0]
        settings = Settings(data_dir=data_dir, console_port=free_port(), metrics_port=0)
        server = ConsoleServer(settings, lambda sql, params: store.query_json(sql, params, person=False), live=False)
        assert server.start(), "the console did not start"
        base = f"http://127.0.0.1:{settings.console_port}"
        paths = ["/api/v1/fleet", "/api/v1/alerts", "/api/v1/alerts?status=firing", "/api/v1/canaries",
                 f"/api/v1/canaries/support-bot/{DEFAULT_CANARY.version}", f"/api/v1/runs/{run_id}", "/healthz",
                 "/", f"/runs/{run_id}", "/alerts", "/canaries", f"/canaries/support-bot/{DEFAULT_CANARY.version}",
                 f"/api/v1/canaries/support-bot/{DEFAULT_CANARY.version}/gate", "/live",
                 "/drift", f"/drift/{cell[0]}/{cell[1]}?feature={cell[2]}&window={cell[3]}", "/failure-modes", "/tools",
                 "/dead-letters",
                 # a week, as an on-call engineer looks back (the default range is a day)
                 "/api/v1/fleet?hours=168", "/?hours=168", "/drift?hours=168", "/tools?hours=168",
                 "/failure-modes?hours=168", "/alerts?hours=168"]
        results = []
        for path in paths:
            results.append((path, _time(base + path, repeat)))
            console.print(f"  {path}: p95 {_quantile(results[-1][1], 0.95):.0f} ms")
        server.stop()
        store.close()
        return results
    finally:
        if keep is None:
            shutil.rmtree(data_dir, ignore_errors=True)


def live_phase(open_runs: int, repeat: int) -> list[float]:
    live = LiveRuns({}, 30 * 60_000, fed=True)  # fed directly, as the sink of `up` feeds it
    now = time.time_ns() // 1_000_000
    rows = []
    for i in range(open_runs):
        for n, kind in enumerate(("run_start", "llm_call", "tool_call")):
            rows.append(pack({"event_id": f"e{i}-{n}", "ts": now + i + n, "type": kind, "run_id": f"r{i}",
                              "agent_id": f"agent-{i % 7}", "agent_version": "v1", "task_id": "", "session_id": "",
                              "tenant": "", "environment": "", "input_tokens": 0, "output_tokens": 0,
                              "cache_read_input_tokens": 0, "status": "ok", "error_type": "", "error_message": "",
                              "tool": "search", "args_hash": "", "outcome": "", "score": None, "cost_usd": 0.001,
                              "cost_source": "reported", "policy": "", "decision": "", "wait_ms": None}))
    live.apply([list(row) for row in rows])
    assert len(live.runs) == open_runs
    took = []
    for _ in range(repeat):
        began = time.perf_counter()
        JSON(live.snapshot()).body
        took.append((time.perf_counter() - began) * 1000)
    return took


def visible_phase(trials: int) -> list[float]:
    from confluent_kafka import Producer

    data_dir = Path(tempfile.mkdtemp(prefix="trackside-bench-live-"))
    port, console_port = free_port(), free_port()
    env = {**up_env(data_dir, port, 1, 4), "TRACKSIDE_CONSOLE_PORT": str(console_port), "TRACKSIDE_METRICS_PORT": "0"}
    up = start_up(env, Settings(data_dir=data_dir, embedded_port=port), data_dir / "up.log")
    base = f"http://127.0.0.1:{console_port}"
    try:
        while not orjson.loads(urllib.request.urlopen(f"{base}/healthz", timeout=10).read()).get("live"):
            time.sleep(0.1)
        producer = Producer({"bootstrap.servers": f"127.0.0.1:{port}", "linger.ms": 0})
        took = []
        for trial in range(trials):
            run_id = f"bench-live-{trial}"
            now = time.time_ns() // 1_000_000
            began = time.perf_counter()
            for n, kind in enumerate(("run_start", "llm_call")):
                producer.produce("agent.events", key=run_id.encode(), value=orjson.dumps(
                    {"event_id": f"{run_id}-{n}", "ts": now + n, "type": kind, "run_id": run_id,
                     "agent_id": "bench-live", "agent_version": "v1"}))
            producer.flush(10)
            while True:
                runs = orjson.loads(urllib.request.urlopen(f"{base}/api/v1/runs/live", timeout=10).read())
                if any(run["run_id"] == run_id for run in runs):
                    break
                if time.perf_counter() - began > 30:
                    raise RuntimeError(f"{run_id} never showed in Live runs")
                time.sleep(0.01)
            took.append((time.perf_counter() - began) * 1000)
        return took
    finally:
        up.terminate()
        up.wait(120)
        shutil.rmtree(data_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--open-runs", type=int, default=10_000)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--store", type=Path, default=None,
                        help="keep the filled store in this directory, and time the one it holds when filled before")
    parser.add_argument("--store-only", action="store_true", help="time the store's pages and API only (part 1)")
    args = parser.parse_args(argv)
    console = Console()
    console.print(f"1. the store with {args.events:,} events")
    results = store_phase(args.events, args.repeat, console, args.store)
    live: list[float] = []
    visible: list[float] = []
    if not args.store_only:
        console.print(f"2. the live view with {args.open_runs:,} open runs")
        live = live_phase(args.open_runs, args.repeat * 5)
        console.print(f"3. an event's way to Live runs, {args.trials} runs")
        visible = visible_phase(args.trials)
    table = Table(title="Console timings (ms; p95 against the issue's bar)")
    for column in ("what", "p50", "p95", "bar", "p95 / bar"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for name, took, bar in [*((path, took, TARGET_MS) for path, took in results),
                            (f"live runs view, {args.open_runs:,} open (snapshot + JSON)", live, LIVE_TARGET_MS),
                            ("an event published -> listed in /api/v1/runs/live", visible, VISIBLE_TARGET_MS)]:
        if not took:
            continue
        p95 = _quantile(took, 0.95)
        table.add_row(name, f"{_quantile(took, 0.5):.0f}", f"{p95:.0f}", f"{bar:.0f}", f"{p95 / bar:.2f}")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
