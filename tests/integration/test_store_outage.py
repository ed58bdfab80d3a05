"""A store that refuses writes: nothing is committed, the sink retries, and once the store is
back every event lands exactly once. The failure is real ClickHouse: the `events` table is
detached through `trackside sql --write`, so inserts fail inside chdb, then attached again."""

import time

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from jobs.simulate import FleetConfig, simulate
from tests.conftest import RunningStack

pytestmark = pytest.mark.integration


def _committed(stack: RunningStack) -> dict[int, int]:
    """The store sink's committed offsets on agent.events, read without joining its group."""
    consumer = Consumer({"bootstrap.servers": f"127.0.0.1:{stack.port}", "group.id": "trackside-store"})
    try:
        parts = consumer.committed([TopicPartition("agent.events", p) for p in range(stack.settings.partitions)],
                                   timeout=10)
        return {tp.partition: tp.offset for tp in parts}
    finally:
        consumer.close()


def _sample(metrics: str, name: str) -> float:
    """The value of one sample of a Prometheus text exposition."""
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


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
        time.sleep(1)  # the commit follows the insert
        before = _committed(stack)
        assert sum(before.values()) == len(first)

        stack.cli("sql", "--write", "DETACH TABLE events")
        _publish(stack, second)
        log = stack.data_dir / "up.out"
        deadline = time.monotonic() + 30
        while "store refused" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "store refused" in log.read_text(), "the outage is logged"
        time.sleep(2)  # a few retries
        assert _committed(stack) == before, "nothing is committed while the store refuses"
        metrics = stack.metrics()  # the backlog is visible to an operator
        assert "trackside_store_retrying 1.0" in metrics
        assert _sample(metrics, 'trackside_store_retries_total{table="events"}') >= 2
        assert 0 < _sample(metrics, "trackside_sink_inflight_messages") <= len(second)

        stack.cli("sql", "--write", "ATTACH TABLE events")
        total = len({event["event_id"] for event in events})
        assert stack.wait_for_count("SELECT count() FROM events", total) == total
        assert "store accepts writes again" in log.read_text()
        assert "trackside_store_retrying 0.0" in stack.metrics()
        time.sleep(1)
        assert sum(_committed(stack).values()) == len(events)
        # every run is assembled once from the delayed batches, nothing doubled
        runs = len({event["run_id"] for event in events})
        assert stack.wait_for_count("SELECT count() FROM runs", runs) == runs
        assert stack.count("SELECT count() FROM (SELECT event_id FROM events GROUP BY event_id HAVING count() > 1)") == 0
    finally:
        assert stack.stop() == 0
