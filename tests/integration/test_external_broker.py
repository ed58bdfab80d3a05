"""`trackside up` against a broker it did not start (TRACKSIDE_BOOTSTRAP set): the path of a
real cluster. The broker here is a separately started Tansu; the store is chdb."""

import orjson
import pytest

from jobs.simulate import FleetConfig, run_labels, simulate
from streams.ops.broker import embedded_broker
from streams.settings import Settings
from tests.conftest import RunningStack, free_port
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


def test_up_with_an_external_broker_processes_everything(tmp_path):
    port = free_port()
    broker = embedded_broker(Settings(data_dir=tmp_path / "broker", embedded_port=port))
    broker.start()
    try:
        stack = RunningStack(tmp_path / "stack", {"TRACKSIDE_BOOTSTRAP": f"127.0.0.1:{port}"})
        stack.env["TRACKSIDE_BOOTSTRAP"] = f"127.0.0.1:{port}"  # RunningStack clears it by default
        stack.port = port
        ready = stack.start()
        assert f"bootstrap=127.0.0.1:{port}" in ready
        assert not (stack.data_dir / "run" / "broker.pid").exists(), "up started no broker of its own"
        config = FleetConfig(seed=9, runs=60)
        events = list(simulate(config))
        result = stack.cli("publish", "-", input=b"\n".join(orjson.dumps(e) for e in events))
        assert f"produced={len(events)}".encode() in result.stdout
        ended = sum(1 for label in run_labels(config).values() if not label["timeout"])
        wait_until(lambda: stack.count("SELECT count() FROM runs"), 60, f"the {ended} ended runs in the store",
                   done=lambda runs: runs >= ended)  # timed-out runs close later
        assert stack.count("SELECT count() FROM events") == len({e["event_id"] for e in events})
        assert stack.stop() == 0
    finally:
        broker.stop()
