"""Rebuilding a partition's state from the store when a worker (re)starts or takes it over.

The ingest stage lands every valid event in `events` before it hands the event to the
processors, so the store is the changelog: a partition's open runs are the runs of its
events that have no row in `runs` yet, and a partition's open windows are those of its
agents not marked final in `agent_metrics`, rebuilt from their runs. Replaying them through the same pure code gives the same state;
batches redelivered after the restart are then absorbed (events and runs are deduplicated).
"""

from __future__ import annotations

import logging

from streams.contracts import topics
from streams.contracts.topics import tenant_partition_key
from streams.contracts.messages import EVENT_FIELDS
from streams.contracts.topics import agent_partition
from streams.settings import Settings
from streams.contracts.tables import RUNS
from streams.store.clickhouse import query_store

log = logging.getLogger(__name__)

_EVENT_COLUMNS = ", ".join(
    {
        "ts": "toUnixTimestamp64Milli(ts) AS ts",
        "cost_usd": "toFloat64(cost_usd) AS cost_usd",
    }.get(name, name)
    for name in EVENT_FIELDS
)

# Every column of `runs`, times as epoch milliseconds and money as a float, as the processors hold them.
_RUN_COLUMNS = ", ".join(
    f"toUnixTimestamp64Milli({name}) AS {name}" if name in ("started_at", "ended_at", "updated_at")
    else "toFloat64(cost_usd) AS cost_usd" if name == "cost_usd" else name
    for name in RUNS.names
)


# The events of one assembler partition: from its agent.events partition, and the events of
# OTLP spans, which went to the assembler of CRC32(run_id) (streams.detect.runs.run_partition).
_PARTITION_EVENTS = ("(source LIKE {source:String} OR (startsWith(source, {otlp:String}) "
                     "AND CRC32(run_id) % {partitions:UInt32} = {partition:UInt32}))")


def open_run_events(settings: Settings, partition: int, horizon_ms: int) -> tuple[list[dict], set[str]]:
    """Every landed event of the partition's runs that have not closed, oldest first, and the
    ids of the alerts already sent about the partition's runs of the last `horizon_ms` of
    event time: replayed or redelivered events raise those alerts again."""
    store = query_store(settings, may_open=False)
    source = {"source": f"{topics.AGENT_EVENTS.name}:{partition}:%"}
    params = {**source, "otlp": f"{topics.OTLP_SPANS.name}:", "partitions": settings.partitions, "partition": partition}
    events = store.query_json(
        f"SELECT {_EVENT_COLUMNS} FROM events "
        f"WHERE {_PARTITION_EVENTS} AND run_id NOT IN (SELECT run_id FROM runs) ORDER BY ts",
        params,
    )
    if events:
        log.info("partition %d: rebuilding %d open runs from %d stored events",
                 partition, len({event["run_id"] for event in events}), len(events))
    sent = store.query_json(
        f"SELECT alert_id FROM alerts WHERE run_id IN (SELECT run_id FROM events WHERE {_PARTITION_EVENTS} "
        f"AND ts >= (SELECT max(ts) FROM events WHERE {_PARTITION_EVENTS}) - toIntervalMillisecond({{horizon:Int64}}))",
        {**params, "horizon": horizon_ms},
    )
    return events, {row["alert_id"] for row in sent}


def recent_runs(settings: Settings, partition: int, horizon_ms: int) -> tuple[list[dict], set[str]]:
    """The partition's agents' runs of the last `horizon_ms` of event time, oldest first, which
    the drift tests and the failure clusters learn again after a restart, and the ids of the
    alerts already sent about those agents."""
    store = query_store(settings, may_open=False)
    agents = _agents_of(store, settings, partition)
    if not agents:
        return [], set()
    # The inner query filters on the columns; the outer one renames them.
    runs = store.query_json(
        f"SELECT {_RUN_COLUMNS} FROM (SELECT * FROM runs WHERE agent_id IN {{agents:Array(String)}} AND ended_at >= "
        "(SELECT max(ended_at) FROM runs WHERE agent_id IN {agents:Array(String)}) - toIntervalMillisecond({horizon:Int64})) "
        "ORDER BY ended_at, run_id",
        {"agents": agents, "horizon": horizon_ms},
    )
    # every alert about these agents: drift, failure clusters, canary metrics, hourly budgets
    sent = store.query_json("SELECT alert_id FROM alerts WHERE agent_id IN {agents:Array(String)}", {"agents": agents})
    return runs, {row["alert_id"] for row in sent}


def rollout_state(settings: Settings, partition: int, tenant_budgets: bool) -> tuple[list[dict], list[dict], set[str]]:
    """What the rollout controller of a metrics partition starts from: the deployment events
    of its agents, the runs of the last two days of its tenants (when tenant budgets are on),
    and the ids of rollbacks and tenant budget alerts already sent."""
    store = query_store(settings, may_open=False)

    def mine(key: str) -> bool:
        return agent_partition(key, settings.partitions) == partition

    deployments = [
        row for row in store.query_json(
            "SELECT agent_id, version, role, traffic_pct, toUnixTimestamp64Milli(ts) AS ts FROM deployments ORDER BY ts")
        if mine(row["agent_id"])
    ]
    sent = {row["rollback_id"] for row in store.query_json("SELECT rollback_id, agent_id FROM rollbacks")
            if mine(row["agent_id"])}
    tenant_runs: list[dict] = []
    if tenant_budgets:
        tenant_runs = [
            row for row in store.query_json(
                "SELECT run_id, agent_id, tenant, toUnixTimestamp64Milli(ended_at) AS ended_at, "
                "toFloat64(cost_usd) AS cost_usd FROM runs WHERE tenant != '' "
                "AND ended_at >= (SELECT max(ended_at) FROM runs) - INTERVAL 2 DAY")
            if mine(tenant_partition_key(row["tenant"]))
        ]
        sent |= {row["alert_id"] for row in store.query_json(
            "SELECT alert_id FROM alerts WHERE kind = 'budget' AND agent_id = '' AND run_id = ''")}
    return deployments, tenant_runs, sent


def _agents_of(store, settings: Settings, partition: int) -> list[str]:  # noqa: ANN001
    return [
        row["agent_id"] for row in store.query_json("SELECT DISTINCT agent_id FROM runs")
        if agent_partition(row["agent_id"], settings.partitions) == partition
    ]


def open_windows(settings: Settings, partition: int) -> tuple[list[dict], int]:
    """The runs of the partition's windows that are not final yet, and where final ends.

    A window emitted as final must stay as it is, and a window still open must be restored
    whole: re-emitted with part of its runs, it would replace the complete row.
    """
    store = query_store(settings, may_open=False)
    agents = _agents_of(store, settings, partition)
    if not agents:
        return [], 0
    window_ms = settings.window_seconds * 1000
    # The inner query filters on the columns; the outer one renames them.
    runs = store.query_json(
        f"SELECT {_RUN_COLUMNS} FROM (SELECT * FROM runs WHERE agent_id IN {{agents:Array(String)}} "
        "AND (agent_id, agent_version, intDiv(toUnixTimestamp64Milli(ended_at), {window:Int64}) * {window:Int64}) IN "
        "(SELECT agent_id, agent_version, toUnixTimestamp64Milli(window_start) FROM agent_metrics "
        " WHERE agent_id IN {agents:Array(String)} AND NOT is_final))",
        {"agents": agents, "window": window_ms},
    )
    (final,) = store.query_json(
        "SELECT toUnixTimestamp64Milli(max(window_end)) AS final_before FROM agent_metrics "
        "WHERE agent_id IN {agents:Array(String)} AND is_final",
        {"agents": agents},
    )
    log.info("partition %d: rebuilding windows of %d agents from %d stored runs", partition, len(agents), len(runs))
    return runs, int(final["final_before"] or 0)
