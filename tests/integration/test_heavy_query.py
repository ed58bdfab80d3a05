"""A person's heavy query beside the live pipeline (issue 12.2): it runs on a reader of its own,
bounded in time, memory and threads, and holds up neither the sink's writes nor Trackside's own
reads: a loop alert goes out while it runs, and the query is stopped at its bound."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer

from streams.store.clickhouse import QueryLimits, Store, StoreError, running_service
from tests.conftest import RunningStack
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

T0 = 1_793_600_000_000
HEAVY = "SELECT count() FROM numbers(1000000000000) WHERE NOT ignore(cityHash64(number))"


def _loop_run(port: int) -> None:
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{port}"})
    for n, kind in enumerate(["run_start", "tool_call", "tool_call", "tool_call"]):
        event = {"event_id": f"stall-{n}", "ts": T0 + n * 1000, "type": kind, "run_id": "stall-run",
                 "agent_id": "looper", "agent_version": "v1"}
        if kind == "tool_call":
            event.update(tool="lookup_order", args={"order": 42})
        producer.produce("agent.events", value=orjson.dumps(event), key=b"stall-run")
    assert producer.flush(10) == 0


def _nice_values(pid: int) -> list[int]:
    """The nice value of each thread of a process (field 19 of /proc/<pid>/task/<tid>/stat)."""
    values = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            values.append(int(stat.read_text().rpartition(")")[2].split()[16]))
    return values


def test_a_heavy_query_holds_up_no_alert_and_is_stopped_at_its_bound(tmp_path):
    stack = RunningStack(tmp_path / "stack", {"TRACKSIDE_QUERY_MAX_SECONDS": "8"})
    stack.start()
    try:
        # a query may tighten its own bounds, not lift them
        assert stack.cli("sql", "SELECT 1 SETTINGS max_threads = 1, max_execution_time = 5, os_thread_priority = 19, "
                                "max_bytes_before_external_group_by = 1000000").returncode == 0
        for lifted in ("max_threads = 8", "max_threads = 0", "max_execution_time = 3600", "max_memory_usage = 0",
                       "os_thread_priority = 0", "os_thread_priority = -5", "max_bytes_before_external_sort = 0"):
            refused = stack.cli("sql", f"SELECT 1 SETTINGS {lifted}", check=False)
            assert refused.returncode != 0 and b"not lift them" in refused.stderr, lifted

        heavy: dict = {}

        def run_heavy() -> None:
            heavy["result"] = stack.cli("sql", HEAVY, check=False)
            heavy["ended"] = time.monotonic()

        runner = threading.Thread(target=run_heavy)
        runner.start()
        own = running_service(stack.settings, person=False)  # Trackside's own reads, as recovery's
        wait_until(lambda: own.query_json("SELECT count() AS n FROM system.processes WHERE query LIKE '%cityHash64%' "
                                          "AND query NOT LIKE '%system.processes%'"), 20,
                   "the heavy query to run", done=lambda rows: int(rows[0]["n"]) == 1)
        # its thread runs at the nice value of a person's query: the pipeline's threads come first
        assert 10 in _nice_values(stack.process.pid)
        _loop_run(stack.port)
        wait_until(lambda: [a for a in stack.on_topic("trackside.alerts") if a["run_id"] == "stall-run"], 20,
                   "the loop alert while the heavy query runs", done=bool)
        assert runner.is_alive(), "the heavy query ended before the alert came: this test proves nothing"
        # the sink's writes landed meanwhile, and Trackside's own reads see them
        assert own.query_json("SELECT count() AS n FROM events WHERE run_id = 'stall-run'") == [{"n": 4}]
        runner.join(60)
        result: subprocess.CompletedProcess = heavy["result"]
        assert result.returncode != 0 and b"TIMEOUT_EXCEEDED" in result.stderr, result.stderr[-500:]
    finally:
        assert stack.stop() == 0


def test_a_persons_group_by_past_its_spill_bound_goes_on_in_files_under_the_memory_bound(tmp_path):
    # 5 million keys: about 200 MB of hash table in memory, over a person's bound of 150 MB
    group_by = "SELECT number % 5000000 AS k, count() AS n FROM numbers(10000000) GROUP BY k ORDER BY n DESC, k LIMIT 1"
    path = f"chdb://{tmp_path / 'chdb'}"  # chdb hosts one store path per process: both are closed after
    in_memory = Store(path, "default", limits=QueryLimits(60, 150_000_000, 1, spill_bytes=0))
    spilling = Store(path, "default", limits=QueryLimits(60, 150_000_000, 1, spill_bytes=50_000_000))
    try:
        with pytest.raises(StoreError, match="MEMORY_LIMIT_EXCEEDED"):
            in_memory.query_json(group_by)
        assert spilling.query_json(group_by) == [{"k": 0, "n": 2}]
    finally:
        in_memory.close()
        spilling.close()
