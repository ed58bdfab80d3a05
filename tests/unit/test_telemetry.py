"""Multiprocess metrics: one /metrics endpoint shows what the parent and its children counted.

The scenario runs in fresh interpreters (multiprocessing, spawn): prometheus_client picks its
storage once per process, and this pytest process may already hold in-process metrics.
"""

from __future__ import annotations

import multiprocessing
import os
import urllib.request
from pathlib import Path

import pytest


def _child(events: int, kind: str) -> None:
    """A worker: counts, sets a live gauge, exits."""
    from streams import telemetry

    assert telemetry.EVENTS_INGESTED._value.__class__.__name__ == "MmapedValue"  # multiprocess storage
    telemetry.EVENTS_INGESTED.inc(events)
    telemetry.ALERTS.labels(kind=kind, status="firing").inc()
    telemetry.SINK_BATCH_MESSAGES.observe(events)
    telemetry.SINK_INFLIGHT_MESSAGES.set(events)


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def _parent(directory: str, results) -> None:
    """`trackside up`: prepares the directory, counts itself, starts children, serves."""
    # prometheus_client imported first, as any library might: telemetry must still pick mmap storage.
    import prometheus_client  # noqa: F401

    from streams import telemetry

    path = telemetry.prepare_multiproc_dir(directory)
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(path)
    telemetry.EVENTS_INGESTED.inc(5)
    telemetry.STORE_RETRYING.set(1)
    server = telemetry.start_metrics_server(0, path)
    try:
        context = multiprocessing.get_context("spawn")
        pids = []
        for events, kind in ((7, "loop"), (11, "drift")):
            child = context.Process(target=_child, args=(events, kind))
            child.start()
            child.join(60)
            assert child.exitcode == 0
            pids.append(child.pid)
        results.put(("children", _scrape(server.url)))
        for pid in pids:
            telemetry.mark_process_dead(pid)  # what `up` does before restarting a worker
        results.put(("dead", _scrape(server.url)))
    finally:
        server.stop()
    results.put(("done", None))


def test_parent_and_children_are_served_together(tmp_path):
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_999999.db").write_bytes(b"left over from an earlier run")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    parent = context.Process(target=_parent, args=(str(directory), results))
    parent.start()
    got = {}
    while "done" not in got:
        key, value = results.get(timeout=120)
        got[key] = value
    parent.join(30)
    assert parent.exitcode == 0

    children = got["children"]
    assert children["trackside_events_ingested_total"] == 5 + 7 + 11  # parent + both children
    assert children['trackside_alerts_total{kind="loop",status="firing"}'] == 1
    assert children['trackside_alerts_total{kind="drift",status="firing"}'] == 1
    assert children["trackside_sink_batch_messages_count"] == 2
    assert children["trackside_sink_batch_messages_sum"] == 18
    assert children["trackside_sink_inflight_messages"] == 18  # livesum over the children
    assert children["trackside_store_retrying"] == 1  # livemax, the parent's
    # A dead child's live gauge goes away; what it counted stays.
    dead = got["dead"]
    assert "trackside_sink_inflight_messages" not in dead or dead["trackside_sink_inflight_messages"] == 0
    assert dead["trackside_events_ingested_total"] == 23
    assert not (directory / "counter_999999.db").exists()  # cleaned at start


def test_single_process_mode_and_misuse(tmp_path):
    """Without the variable, metrics are in-process; preparing afterwards is refused."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_single, args=(str(tmp_path), results))
    process.start()
    value, refused = results.get(timeout=120)
    process.join(30)
    assert process.exitcode == 0
    assert value == 3
    assert refused


def _single(directory: str, results) -> None:
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    from streams import telemetry

    telemetry.FORWARDER_DELIVERIES.labels("webhook", "delivered").inc(3)
    with telemetry.start_metrics_server(0) as server:
        value = _scrape(server.url)['trackside_forwarder_deliveries_total{result="delivered",target="webhook"}']
    try:
        telemetry.prepare_multiproc_dir(Path(directory) / "late")
        refused = False
    except RuntimeError:
        refused = True
    results.put((value, refused))


def test_unknown_attribute():
    from streams import telemetry

    with pytest.raises(AttributeError):
        telemetry.NOT_A_METRIC  # noqa: B018


def test_the_memory_report_sees_python_objects_come_and_go():
    import re

    from streams.runtime import memory_report

    def in_use() -> int:
        report = memory_report()
        assert re.search(r"^resident \d+; pymalloc arenas \d+ \(blocks in use \d+\); C heap in use \d+", report), report
        return int(re.search(r"blocks in use (\d+)", report).group(1))

    before = in_use()
    held = [{"n": n} for n in range(300_000)]  # ~60 MB of small dicts, from pymalloc
    during = in_use()
    del held
    assert during - before >= 40 and in_use() < during - 40
