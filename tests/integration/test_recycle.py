"""The front door of the embedded broker (issue 12): past TRACKSIDE_BROKER_MEMORY_BYTES the broker
is drained and started afresh, and a stop under load lands everything; agents are shut out
meanwhile and retry, and no event is lost or doubled."""

from __future__ import annotations

import threading

import orjson
import pytest
from confluent_kafka import Producer

from jobs.simulate import FleetConfig, genai_prices_fn, simulate, truth
from streams.ops.broker import resident_bytes
from tests.conftest import RunningStack
from tests.waiting import paced, wait_until

pytestmark = pytest.mark.integration

RECYCLE_LINE = "recycled the embedded broker"


def _broker_held(stack: RunningStack) -> int | None:
    """The broker's resident bytes; None while a recycle replaces it (its pid file is gone
    between the old broker's stop and the new one's start)."""
    try:
        pid = int((stack.data_dir / "run/broker.pid").read_text().split()[0])
    except FileNotFoundError:
        return None
    return resident_bytes(pid)


def test_a_broker_past_its_bound_is_recycled_and_nothing_is_lost_or_doubled(tmp_path):
    events = list(simulate(FleetConfig(seed=31, runs=1_500, price_fn=genai_prices_fn)))
    expected = truth(events, price_fn=genai_prices_fn)
    stack = RunningStack(tmp_path / "stack")
    stack.start()
    try:
        # the bound: a little above what the broker holds with its topics and nothing else
        bound = _broker_held(stack) + (6 << 20)
    finally:
        assert stack.stop() == 0
    stack.env["TRACKSIDE_BROKER_MEMORY_BYTES"] = str(bound)
    # A drain that never runs dry (agents let in) gives up after 5 s: then what the broker
    # still holds is lost, and this test sees it.
    stack.env["TRACKSIDE_DRAIN_SECONDS"] = "5"
    stack.start()
    try:
        failed: list[str] = []
        producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}", "linger.ms": 5})  # as an agent's

        def publish(part: list[dict]) -> None:
            for event in part:
                producer.produce("agent.events", value=orjson.dumps(event), key=event["run_id"].encode(),
                                 on_delivery=lambda error, _message: error and failed.append(str(error)))
            assert producer.flush(120) == 0 and not failed, failed

        # The first part takes the broker past its bound. The rest goes on at the pipeline's pace
        # (each slice once the one before has landed) while the broker is recycled, and moves
        # event time on, so the runs open at the recycle close too.
        cut = len(events) * 3 // 5
        publish(events[:cut])
        for start in range(cut, len(events), 300):
            publish(events[start:start + 300])
            sent = len({event["event_id"] for event in events[:start + 300]})
            stack.wait_for_count("SELECT count() FROM events FINAL", sent)
        wait_until(lambda: stack.output.read_text().count(RECYCLE_LINE), 90, "a recycle of the broker",
                   done=lambda count: count >= 1)
        runs = len(expected["runs"])
        assert stack.wait_for_count("SELECT count() FROM runs FINAL", runs) == runs
        distinct = len({event["event_id"] for event in events})
        assert stack.count("SELECT count() FROM events FINAL") == distinct
        landed = {row["run_id"]: (row["outcome"], row["steps"])
                  for row in stack.query("SELECT run_id, outcome, steps FROM runs FINAL")}
        assert landed == {run_id: (run["outcome"], run["steps"]) for run_id, run in expected["runs"].items()}
        wait_until(lambda: _broker_held(stack) or bound, 30, "the broker under its bound",
                   done=lambda held: held < bound)
        line = next(line for line in stack.output.read_text().splitlines() if RECYCLE_LINE in line)
        assert "drained" in line and "agents shut out for" in line, line
    finally:
        assert stack.stop() == 0


def test_a_stop_under_load_lands_everything_and_agents_retry_across_the_restart(tmp_path):
    events = list(simulate(FleetConfig(seed=32, runs=1_000, price_fn=genai_prices_fn)))
    expected = truth(events, price_fn=genai_prices_fn)
    # a drain that never runs dry (agents let in) gives up after 5 s, and loses what is left
    stack = RunningStack(tmp_path / "stack", {"TRACKSIDE_DRAIN_SECONDS": "5"})
    stack.start()
    failed: list[str] = []
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.port}", "linger.ms": 5})  # as an agent's

    def publish() -> None:
        for event in paced(events, per_second=2_000):  # still sending when `up` stops, and after
            producer.produce("agent.events", value=orjson.dumps(event), key=event["run_id"].encode(),
                             on_delivery=lambda error, _message: error and failed.append(str(error)))
            producer.poll(0)
        producer.flush(180)

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        stack.wait_for_count("SELECT count() > 2000 FROM events", 1)
        assert stack.stop() == 0
        stopping = stack.output.read_text()
        assert publisher.is_alive(), "the fleet was all sent before the stop"
        stack.start()
        publisher.join(180)
        assert not failed and len(producer) == 0, failed
        assert "front door closed to agents" in stopping and "still arriving" not in stopping, stopping[-2000:]
        runs = len(expected["runs"])
        assert stack.wait_for_count("SELECT count() FROM runs FINAL", runs) == runs
        assert stack.count("SELECT count() FROM events FINAL") == len({event["event_id"] for event in events})
    finally:
        publisher.join(180)
        assert stack.stop() == 0
