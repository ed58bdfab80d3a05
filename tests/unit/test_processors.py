"""The processors' per-partition state machines and their messages, without a broker or a store."""

import orjson
import pytest

from jobs.simulate import FleetConfig, simulate
from streams.contracts.events import parse
from streams.contracts.messages import (
    ClosedRuns, Deployments, EventBatch, InvalidMessage, MetricResults, TenantCosts, dead_letter, decode_run_result,
    pack, received_dead_letter,
)
from streams.contracts.topics import agent_partition, mode_partition_key
from streams.detect.policy import Policy
from streams.ingest.pricing import PriceTable, price_event
from streams.processors.assembler import AssemblerPartition
from streams.processors.metrics import MetricsOutput, MetricsPartition, MetricsState
from streams.settings import Settings

PARTITIONS = 4


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("data"), partitions=PARTITIONS)


def fleet(runs: int = 300, seed: int = 3) -> list[dict]:
    """Simulated events as the ingest stage hands them over: validated and priced."""
    prices = PriceTable()
    events = [parse(orjson.dumps(raw)) for raw in simulate(FleetConfig(seed=seed, runs=runs))]
    for event in events:
        price_event(prices, event)
    return events


def flow(settings: Settings, events: list[dict], policy: Policy | None = None,
         batch: int = 200) -> tuple[list[dict], list[MetricResults], list]:
    """Events through one assembler partition and the metrics partitions, as the faust agents
    would pass them: (closed runs, metrics results, every alert)."""
    policy = policy or Policy()
    assembler = AssemblerPartition(0, settings, policy, [], set(), now_ms=0)
    analysts = {p: MetricsPartition(p, settings, policy, MetricsState()) for p in range(PARTITIONS)}
    closed, results, alerts = [], [], []
    wall = 0.0
    for start in range(0, len(events), batch):
        wall += 2.0  # every batch is more than a second after the last: each target hears the watermark
        out = assembler.handle(EventBatch(0, [pack(e) for e in events[start:start + batch]]), 1, 0, wall)
        closed += out.closed
        alerts += out.alerts
        pending = [(target, decode_run_result(message.encode())) for target, message in out.results.items()]
        while pending:
            target, message = pending.pop(0)
            done = analysts[target].handle(message, 1, 0)
            results.append(done.results)
            alerts += done.alerts
            pending += [(target, decode_run_result(m.encode()))
                        for target, m in [*done.tenant_costs.items(), *done.failed_runs.items()]]
    return closed, results, alerts


def test_failed_runs_of_every_agent_meet_in_the_partition_of_their_mode(settings):
    """A failure mode spans agents of different partitions: each failed run goes to the partition
    of its mode key, which alone writes that mode's rows and the run's row with its mode."""
    closed, results, _ = flow(settings, fleet(runs=1200, seed=5))
    failed = {row["run_id"] for row in closed if row["outcome"] != "success"}
    enriched = {row["run_id"]: row["failure_cluster_id"] for r in results for row in r.runs}
    assert failed and set(enriched) == failed and all(enriched.values())
    owners: dict[str, set[int]] = {}
    rows: dict[str, dict] = {}
    for r in results:
        for row in r.failure_clusters:
            owners.setdefault(row["cluster_id"], set()).add(r.partition)
            rows[row["cluster_id"]] = row
    assert all(len(parts) == 1 for parts in owners.values())
    assert all(owners[cid] == {agent_partition(mode_partition_key(row["kind"]), PARTITIONS)} for cid, row in rows.items())
    agents = {row["agent_id"] for row in closed}
    assert len({agent_partition(a, PARTITIONS) for a in agents}) > 1  # the agents live in different partitions
    loop = next(row for row in rows.values() if row["kind"] == "loop")
    assert len(loop["agents"]) > 1 and loop["size"] == sum(1 for run_id in failed if enriched[run_id] == loop["cluster_id"])
    breakdown = [row for r in results for row in r.failure_cluster_agents if row["cluster_id"] == loop["cluster_id"]]
    newest = {(row["agent_id"], row["agent_version"]): row["runs"] for row in breakdown}  # rows come newest last
    assert sum(newest.values()) == loop["size"] and {a for a, _ in newest} == set(loop["agents"])


def test_closed_runs_go_to_the_partition_of_their_agent_with_the_watermark(settings):
    events = fleet()
    assembler = AssemblerPartition(2, settings, Policy(), [], set(), now_ms=0)
    out = assembler.handle(EventBatch(2, [pack(e) for e in events]), processed_ts=1234, now_ms=0, wall_s=10.0)
    assert out.closed and set(out.results) == set(range(PARTITIONS))  # runs, or the watermark, to every partition
    for target, message in out.results.items():
        assert (message.partition, message.processed_ts, message.watermark) == (2, 1234, assembler.assembler.watermark)
        assert all(agent_partition(run["agent_id"], PARTITIONS) == target for run in message.runs)
    assert sum(len(m.runs) for m in out.results.values()) == len(out.closed)
    # half a second later, a batch that closes nothing tells its own partition only (that it is done)
    again = assembler.handle(EventBatch(2, [pack(events[-1])]), processed_ts=1235, now_ms=0, wall_s=10.5)
    assert list(again.results) == [2] and again.results[2].runs == [] and again.results[2].processed_ts == 1235


def test_a_rebuilt_partition_replays_stored_runs_and_does_not_resend_their_alerts(settings):
    events = fleet()
    first = AssemblerPartition(0, settings, Policy(), [], set(), now_ms=0)
    out = first.handle(EventBatch(0, [pack(e) for e in events]), 1, 0, 1.0)
    assert any(alert["kind"] == "loop" for alert in out.alerts)
    ended = {row["run_id"] for row in out.closed if row["closed_by"] == "run_end"}
    rebuilt = AssemblerPartition(0, settings, Policy(), [[pack(e) for e in events]], {alert["alert_id"] for alert in out.alerts}, now_ms=0)
    again = rebuilt.handle(EventBatch(0, []), 1, 0, 1.0)
    assert again.alerts == []
    # runs that ended close again; idle ones wait for the stream to move the watermark
    assert {row["run_id"] for row in again.closed} == ended


def test_a_partition_rebuilt_a_few_runs_at_a_time_is_the_one_rebuilt_at_once(settings):
    """Recovery reads the open runs' events a few runs at a time (each run whole, oldest first),
    not every event at once: the replay comes to the same runs, rows and alerts."""
    events = fleet()
    runs = list(dict.fromkeys(e["run_id"] for e in events))
    reads = [[pack(e) for e in events if e["run_id"] in set(runs[start:start + 7])]
             for start in range(0, len(runs), 7)]
    assert len(reads) > 10
    at_once = AssemblerPartition(0, settings, Policy(), [[pack(e) for e in events]], set(), now_ms=0)
    in_reads = AssemblerPartition(0, settings, Policy(), reads, set(), now_ms=0)

    def state(partition: AssemblerPartition) -> tuple:
        out = partition.handle(EventBatch(0, []), 1, 0, 1.0)
        assembler = partition.assembler
        return (sorted(out.closed, key=lambda row: row["run_id"]),
                sorted(out.alerts, key=lambda alert: alert["alert_id"]),
                sorted(assembler.open), sorted(assembler.closed), assembler.duplicates, assembler.late_events)

    rebuilt = state(at_once)
    assert rebuilt[0] and rebuilt[1] and rebuilt[2]  # closed runs, alerts and open runs to compare
    assert state(in_reads) == rebuilt


def test_every_run_is_counted_once_in_the_windows_across_partitions(settings):
    events = fleet()
    closed, results, _ = flow(settings, events)
    windows = {}
    for result in results:
        for row in result.metrics:  # a window is re-emitted as runs arrive: the last row wins
            windows[(row["agent_id"], row["agent_version"], row["window_start"])] = row["runs"]
    assert sum(windows.values()) == len({row["run_id"] for row in closed}) > 250
    assert all(result.processed_ts == 1 for result in results)


def test_tenant_costs_travel_to_the_partition_that_owns_the_tenant(settings):
    events = fleet(runs=200)
    for event in events:
        event["tenant"] = "acme"
    policy = Policy.from_mapping({"tenants": {"acme": {"day_usd": 0.01}}})
    _, _, alerts = flow(settings, events, policy)
    (budget,) = [alert for alert in alerts if alert["kind"] == "budget" and alert["evidence"]["scope"] == "tenant_day"]
    assert budget["evidence"]["subject"] == "acme" and budget["evidence"]["spent_usd"] > 0.01


def test_messages_round_trip_and_refuse_the_wrong_shape():
    runs = ClosedRuns(1, 99, [{"run_id": "r"}], 7)
    assert decode_run_result(runs.encode()) == runs
    assert decode_run_result(Deployments([{"agent_id": "a"}]).encode()) == Deployments([{"agent_id": "a"}])
    assert decode_run_result(TenantCosts([{"run_id": "r"}]).encode()) == TenantCosts([{"run_id": "r"}])
    assert EventBatch.decode(EventBatch(3, [[1, 2]]).encode()) == EventBatch(3, [[1, 2]])
    letter = dead_letter("trackside.event-batches", 2, 41, None, b"\xff{bytes", "boom", 5)
    result = MetricResults.decode(MetricResults(drift=[{"x": 1}], dead_letters=[letter]).encode())
    assert result.rows_by_table() == {"drift": [{"x": 1}]}
    assert received_dead_letter(result.dead_letters[0]) == ("trackside.event-batches", 2, 41, b"", b"\xff{bytes", "boom", 5)
    for bad in (b"", b"[1]", b'{"partition": 1}', b'{"partition": "x", "watermark": 1, "runs": []}'):
        with pytest.raises(InvalidMessage):
            decode_run_result(bad)
    with pytest.raises(InvalidMessage):
        EventBatch.decode(b'{"events": []}')


def test_stored_events_ahead_of_the_stream_do_not_make_its_older_events_late(settings):
    # The store lands events before the assembler sees them: after a restart it can hold the
    # newest hour while the stream redelivers from the first. Found by test_spine when recovery
    # first read a bounded range: replaying the newest hour moved the watermark, and the
    # stream's first hour was dropped as late.
    events = fleet()
    newest_hour = [e for e in events if e["ts"] >= events[-1]["ts"] - 3_600_000]
    assert len(newest_hour) < len(events) * 0.8
    rebuilt = AssemblerPartition(0, settings, Policy(), [[pack(e) for e in newest_hour]], set(), now_ms=0)
    closed = []
    for start in range(0, len(events), 500):
        closed += rebuilt.handle(EventBatch(0, [pack(e) for e in events[start:start + 500]]), 1, 0, 1.0).closed
    assembler = rebuilt.assembler
    assert assembler.late_events == 0
    assert {row["run_id"] for row in closed} | set(assembler.open) == {e["run_id"] for e in events}
    # the stream's redelivered events move the watermark even where the store had them (found
    # the same way: a run that went idle an hour before the newest event never timed out)
    assert assembler.watermark == events[-1]["ts"] - settings.allowed_lateness_seconds * 1000
    assert all(run.last_ts + assembler.idle_timeout_ms > assembler.watermark for run in assembler.open.values())


def test_a_batch_is_encoded_at_once_when_it_fits_and_split_the_same_way_when_not():
    rows = [pack(event) for event in fleet(runs=40)]
    for limit in (10_000_000, 5_000):
        messages = EventBatch(3, rows).encode_split(limit)
        assert (len(messages) == 1) == (limit == 10_000_000)
        assert all(len(message) <= limit for message in messages)
        assert [row for m in messages for row in EventBatch.decode(m).events] == [list(row) for row in rows]


def test_a_large_result_is_split_by_bytes_and_the_watermark_moves_with_its_last_part():
    runs = [{"run_id": f"r{i}", "error_message": "é" * (i % 700)} for i in range(400)]
    parts = ClosedRuns(3, 12_345, runs, 99).encode_split(20_000)
    decoded = [decode_run_result(part) for part in parts]
    assert len(parts) > 1 and max(map(len, parts)) <= 20_000
    assert [run for part in decoded for run in part.runs] == runs
    assert [part.watermark for part in decoded] == [0] * (len(parts) - 1) + [12_345]
    assert {(part.partition, part.processed_ts) for part in decoded} == {(3, 99)}
    assert ClosedRuns(3, 1, runs[:2], 9).encode_split(20_000) == [ClosedRuns(3, 1, runs[:2], 9).encode()]

    results = MetricResults(runs=runs, metrics=runs[:50], partition=1, processed_ts=5)
    split = [MetricResults.decode(part) for part in results.encode_split(30_000)]
    assert [row for part in split for row in part.runs] == runs
    assert [row for part in split for row in part.metrics] == runs[:50]
    alone = ClosedRuns(0, 7, [{"run_id": "big", "error_message": "x" * 50_000}, *runs[:3]], 0).encode_split(20_000)
    assert len(alone[0]) > 20_000 and decode_run_result(alone[0]).runs[0]["run_id"] == "big"


def test_a_metrics_partition_rebuilt_a_page_at_a_time_relearns_its_runs(tmp_path):
    """The runs a restart reads back, folded page by page: every run reaches the detectors, the
    drift windows are tested as the pages pass them (each window a rebuild from one page tests,
    and more: canary baselines learnt as they were live), and no run's row is sent again."""
    one = Settings(data_dir=tmp_path, partitions=1)
    assembler = AssemblerPartition(0, one, Policy(), [], set(), now_ms=0)
    live = MetricsPartition(0, one, Policy(), MetricsState())
    events = fleet(runs=3000, seed=4)
    stored: dict[str, dict] = {}
    modes: dict[str, dict] = {}
    breakdown: dict[tuple, dict] = {}
    sent: set[str] = set()
    for start in range(0, len(events), 500):
        out = assembler.handle(EventBatch(0, [pack(e) for e in events[start:start + 500]]), 1, 0, float(start))
        for message in out.results.values():
            message = decode_run_result(message.encode())
            done = live.handle(message, 1, 0)
            assert done.failed_runs == {}  # one partition: its failure modes are its own
            stored.update((row["run_id"], row) for row in message.runs + done.results.runs)  # as the sink lands them
            modes.update((row["cluster_id"], row) for row in done.results.failure_clusters)
            breakdown.update(((r["cluster_id"], r["agent_id"], r["agent_version"]), r)
                             for r in done.results.failure_cluster_agents)
            sent |= {alert["alert_id"] for alert in done.alerts}  # what the app sent
    history = sorted(stored.values(), key=lambda row: (row["ended_at"], row["run_id"]))
    failed = [row for row in history if row["outcome"] != "success"]
    assert failed and all(row["failure_cluster_id"] for row in failed)
    assert sum(row["runs"] for row in breakdown.values()) == sum(row["size"] for row in modes.values()) == len(failed)

    def rebuild(page: int) -> tuple[MetricsPartition, MetricsOutput]:
        pages = [history[start:start + page] for start in range(0, len(history), page)]
        state = MetricsState(history=pages, watermark=assembler.assembler.watermark, sent=set(sent),
                             modes=list(modes.values()), mode_agents=list(breakdown.values()),
                             mode_history=[failed[start:start + page] for start in range(0, len(failed), page)])
        partition = MetricsPartition(0, one, Policy(), state)
        return partition, partition.handle(ClosedRuns(0, assembler.assembler.watermark, [], 2), 2, 0)

    def windows(out: MetricsOutput) -> set[tuple]:
        return {(row["agent_id"], row["agent_version"], row["window"]) for row in out.results.drift}

    (paged, first), (_, whole) = rebuild(400), rebuild(len(history))
    assert len(paged.clusters.seen_runs_) == len(failed)
    assert {cid: c.size for cid, c in paged.clusters.clusters_.items()} == {r["cluster_id"]: r["size"] for r in modes.values()}
    assert windows(first) > windows(whole) and len(windows(whole)) > 50
    assert first.results.runs == []  # every run's mode as stored: no row sent again


def test_a_partition_built_after_its_failed_runs_landed_still_sends_their_new_modes(tmp_path):
    """The worker's first assignment can come seconds after `up` is ready, when the first runs
    have landed already, their failure modes not yet: the rebuild learns them silently from the
    store, then their results come. Every mode a partition running from the start opened an
    incident for, and that is not quiet by then, has its "new" incident sent by the rebuilt one
    too, listing every agent (the suite's flake: none came)."""
    one = Settings(data_dir=tmp_path, partitions=1)
    assembler = AssemblerPartition(0, one, Policy(), [], set(), now_ms=0)
    out = assembler.handle(EventBatch(0, [pack(e) for e in fleet(runs=600, seed=5)]), 1, 0, 1.0)
    (message,) = [decode_run_result(m.encode()) for m in out.results.values()]
    landed = sorted(message.runs, key=lambda row: (row["ended_at"], row["run_id"]))  # plain rows: no mode yet

    def incidents(partition: MetricsPartition) -> list[dict]:
        return [a for a in partition.handle(message, 1, 0).alerts if a["kind"] == "failure_cluster"]

    live = incidents(MetricsPartition(0, one, Policy(), MetricsState()))
    quiet = {a["evidence"]["cluster_id"] for a in live if a["status"] == "resolved"}
    opened: dict[str, dict] = {}  # the first alert of each mode's incident, before its updates as it spread
    for a in live:
        opened.setdefault(a["evidence"]["cluster_id"], a)
    expected = {cid: a["alert_id"] for cid, a in opened.items() if cid not in quiet}
    assert all(a["evidence"]["condition"] == "new" for a in opened.values())
    assert len(expected) >= 5 and quiet
    state = MetricsState(history=[landed], watermark=assembler.assembler.watermark,
                         mode_history=[[row for row in landed if row["outcome"] != "success"]])
    rebuilt = incidents(MetricsPartition(0, one, Policy(), state))
    assert {a["evidence"]["cluster_id"]: a["alert_id"] for a in rebuilt} == expected
    newest = {a["evidence"]["cluster_id"]: a["evidence"]["agents"] for a in live}  # as they spread, newest last
    assert all(a["evidence"]["agents"] == newest[a["evidence"]["cluster_id"]] for a in rebuilt)
