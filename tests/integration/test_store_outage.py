"""A store that refuses writes: nothing is committed, the sink retries, and once the store is
back every event lands exactly once. The failure is real ClickHouse: the `events` table is
detached through `trackside sql --write`, so inserts fail inside chdb, then attached again."""

import orjson
import pytest
from confluent_kafka import Producer

from jobs.simulate import FleetConfig, simulate
from streams.ingest.sink import GROUP
from tests.conftest import RunningStack, metric_value
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


def _unlanded(stack: RunningStack) -> int:
    """Messages on agent.events the store sink has not committed, read without joining its group."""
    return sum(stack.unconsumed(GROUP, "agent.events").values())


def _events_retries(metrics: str) -> float:
    """How often a refused insert into events was retried (the counter shows from the first)."""
    name = 'trackside_store_retries_total{table="events"}'
    return metric_value(metrics, name) if f"\n{name} " in metrics else 0.0


def _publish(stack: RunningStack, events: list[dict]) -> None:
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}", "linger.ms": 5})
    for event in events:
        producer.produce("agent.events", value=orjson.dumps(event), key=event["run_id"].encode())
    assert producer.flush(30) == 0


def test_a_refusing_store_loses_and_doubles_nothing(tmp_path):
    events = list(simulate(FleetConfig(seed=5, runs=120)))
    first, second = events[:400], events[400:]
    stack = RunningStack(tmp_path / "stack")
    stack.start()
    try:
        _publish(stack, first)
        assert stack.wait_for_count("SELECT count() FROM events", len(first)) == len(first)
        wait_until(lambda: _unlanded(stack), 30, "the sink to commit what it inserted", done=lambda left: left == 0)

        stack.cli("sql", "--write", "DETACH TABLE events")
        _publish(stack, second)
        log = stack.data_dir / "up.out"
        wait_until(lambda: "store refused" in log.read_text(), 30, "the outage in the log")
        metrics = wait_until(stack.metrics, 30, "two retries of the refused insert",  # visible to an operator
                             done=lambda text: _events_retries(text) >= 2)
        assert _unlanded(stack) == len(second), "nothing is committed while the store refuses"
        assert "trackside_store_retrying 1.0" in metrics
        assert 0 < metric_value(metrics, "trackside_sink_inflight_messages") <= len(second)

        stack.cli("sql", "--write", "ATTACH TABLE events")
        total = len({event["event_id"] for event in events})
        assert stack.wait_for_count("SELECT count() FROM events", total) == total
        assert "store accepts writes again" in log.read_text()
        assert "trackside_store_retrying 0.0" in stack.metrics()
        wait_until(lambda: _unlanded(stack), 30, "the sink to commit the backlog", done=lambda left: left == 0)
        # every run is assembled once from the delayed batches, nothing doubled
        runs = len({event["run_id"] for event in events})
        assert stack.wait_for_count("SELECT count() FROM runs", runs) == runs
        assert stack.count("SELECT count() FROM (SELECT event_id FROM events GROUP BY event_id HAVING count() > 1)") == 0
    finally:
        assert stack.stop() == 0
