"""Benchmark: events/s through the whole path, against a raw confluent-kafka consumer on the same broker.

    python -m jobs.bench [--events 200000] [--workers 1] [--partitions 4] [--profile DIR]

1. Starts `trackside up` (a subprocess, as a user runs it) on a fresh data dir and port.
2. Raw baseline: produces the same events to a scratch topic and reads them back with a
   bare confluent-kafka consumer (no decoding): messages/s.
3. Pipeline: produces the events to `agent.events` and times first publish -> last run
   queryable in ClickHouse; events/s = events / that time.
4. Latency: while the pipeline is loaded and then idle, small probe runs are published one
   at a time; for each, the time from publish until its event, and then its run, can be
   queried through `trackside sql`'s query service (polled every 10 ms); and a looping
   probe run, timed from its third identical tool call to its `loop` alert on the topic.

With `--profile DIR` (py-spy installed), every process of the stack is sampled by py-spy during
the pipeline phase: DIR gets one collapsed-stack file per process (for flame graphs) and the
bench prints where each one spends its time, by function and by stage.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import orjson
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from rich.console import Console
from rich.table import Table

from jobs.simulate import FleetConfig, simulate
from streams.ops.broker import free_port, resident_bytes
from streams.settings import Settings
from streams.store.clickhouse import running_service

RAW_TOPIC = "bench.raw"
# The bench's own polls (is it there yet?) skip FINAL: merging every part on read, many times a
# second, took ~20% of `up`'s CPU from the pipeline it measures (py-spy).
CHEAP = " SETTINGS final = 0"


def _produce(bootstrap: str, topic: str, lines: list[bytes], keys: list[bytes], progress: list[int] | None = None) -> float:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 1 << 20, "log.connection.close": False})
    started = time.perf_counter()
    for index, (value, key) in enumerate(zip(lines, keys)):
        if progress is not None:
            progress[0] = index
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(120)
    return time.perf_counter() - started


def raw_consume_rate(bootstrap: str, lines: list[bytes], keys: list[bytes], partitions: int) -> tuple[float, float]:
    """(produce msgs/s, consume msgs/s) of bare confluent-kafka clients on this broker."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(RAW_TOPIC, partitions, 1)])[RAW_TOPIC].result()
    produce_s = _produce(bootstrap, RAW_TOPIC, lines, keys)
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4()}", "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000, "fetch.wait.max.ms": 50, "enable.auto.commit": False,
    })
    consumer.subscribe([RAW_TOPIC])
    seen = 0
    started = None
    while seen < len(lines):
        batch = consumer.consume(10000, 1.0)
        if batch and started is None:
            started = time.perf_counter()
            first = len(batch)
        seen += sum(1 for message in batch if message.error() is None)
    elapsed = time.perf_counter() - started
    consumer.close()
    # The first batch arrived at `started`: rate over the rest.
    return len(lines) / produce_s, (seen - first) / elapsed


class Probe:
    """Publishes one tiny run at a time and times until its event and its run are queryable."""

    def __init__(self, bootstrap: str, settings: Settings, clock) -> None:  # noqa: ANN001
        # Probes are stamped with the stream's own event time (`clock()`): stamped "now" they
        # would move their partition's watermark weeks ahead of the fleet, and stamped in the
        # past they would be late events that start no run.
        self.clock = clock
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "log.connection.close": False})
        self.store = running_service(settings)
        self.event_ms: list[float] = []
        self.run_ms: list[float] = []
        self.loop_ms: list[float] = []
        self.alerts = Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"bench-alerts-{uuid.uuid4()}", "auto.offset.reset": "latest",
            "session.timeout.ms": 6000, "fetch.wait.max.ms": 10, "enable.auto.commit": False,
        })
        self.alerts.subscribe(["trackside.alerts"])
        while not self.alerts.assignment():
            self.alerts.poll(0.1)

    def once(self) -> None:
        run_id = f"probe-{uuid.uuid4()}"
        base = {"run_id": run_id, "agent_id": "bench-probe", "agent_version": "1", "ts": self.clock()}
        start = orjson.dumps({**base, "event_id": f"{run_id}-s", "type": "run_start"})
        end = orjson.dumps({**base, "event_id": f"{run_id}-e", "type": "run_end", "outcome": "success"})
        sent = time.perf_counter()
        self.producer.produce("agent.events", value=start, key=run_id.encode())
        self.producer.produce("agent.events", value=end, key=run_id.encode())
        self.producer.flush(10)
        # by the tables' keys (agent_id first): a full scan of `events` per poll cost `up` ~9% of its CPU
        self.event_ms.append(self._until(
            f"SELECT count() FROM events WHERE agent_id = 'bench-probe' AND event_id = '{run_id}-s'{CHEAP}", sent))
        self.run_ms.append(self._until(
            f"SELECT count() FROM runs WHERE agent_id = 'bench-probe' AND run_id = '{run_id}'{CHEAP}", sent))

    def loop_once(self) -> None:
        """A run that calls one tool three times with the same arguments: time until its alert."""
        run_id = f"loop-probe-{uuid.uuid4()}"
        base = {"run_id": run_id, "agent_id": "bench-probe", "agent_version": "1", "ts": self.clock()}
        calls = [{**base, "event_id": f"{run_id}-s", "type": "run_start"}] + [
            {**base, "event_id": f"{run_id}-{n}", "type": "tool_call", "tool": "lookup", "args": {"id": 7}}
            for n in range(3)
        ]
        for event in calls[:-1]:
            self.producer.produce("agent.events", value=orjson.dumps(event), key=run_id.encode())
        self.producer.flush(10)
        sent = time.perf_counter()
        self.producer.produce("agent.events", value=orjson.dumps(calls[-1]), key=run_id.encode())
        self.producer.flush(10)
        while time.perf_counter() - sent < 60:
            message = self.alerts.poll(0.005)
            if message is not None and message.error() is None and orjson.loads(message.value())["run_id"] == run_id:
                self.loop_ms.append((time.perf_counter() - sent) * 1000)
                return
        self.loop_ms.append(float("nan"))

    def close(self) -> None:
        """Let go of the broker before the stack stops: clients left open print librdkafka's
        "Connection refused" lines once it is gone."""
        self.alerts.close()
        self.producer.flush(10)
        del self.producer

    def _until(self, sql: str, sent: float, timeout: float = 60) -> float:
        # polled every 10 ms, or every 2% of the wait so far (at most 100 ms): under load a
        # probe waits seconds, and polling it at 100 Hz took ~15% of `up`'s CPU (py-spy)
        while (waited := time.perf_counter() - sent) < timeout:
            if self.store.query_raw(sql, "TSV").strip() != b"0":
                return (time.perf_counter() - sent) * 1000
            time.sleep(min(0.1, max(0.01, waited / 50)))
        return float("nan")


def up_env(data_dir: Path, port: int, workers: int, partitions: int) -> dict[str, str]:
    """The environment of an embedded `trackside up` on its own data dir and port."""
    env = {
        **os.environ, "TRACKSIDE_DATA_DIR": str(data_dir), "TRACKSIDE_EMBEDDED_PORT": str(port),
        "TRACKSIDE_WORKERS": str(workers), "TRACKSIDE_PARTITIONS": str(partitions),
    }
    env.pop("TRACKSIDE_BOOTSTRAP", None)
    return env


def start_up(env: dict[str, str], settings: Settings, log: Path) -> subprocess.Popen:
    """`trackside up` as a user runs it (its log appended to `log`); returns once it printed its
    ready line and its query service answers."""
    up = subprocess.Popen(
        [str(Path(sys.executable).parent / "trackside"), "up"], env=env,
        stdout=subprocess.PIPE, stderr=open(log, "ab"),
    )
    for line in up.stdout:
        if line.startswith(b"trackside ready"):
            break
    else:
        raise RuntimeError(f"trackside up exited with code {up.wait()} before it was ready; see {log}")
    while running_service(settings) is None:
        time.sleep(0.1)
    return up


def _quantile(values: list[float], q: float) -> float:
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1] if len(values) > 1 else values[0]


def _rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, in MB."""
    total = 0
    pids = [pid]
    while pids:
        current = pids.pop()
        total += resident_bytes(current) or 0
        pids += _children(current)
    return total / (1 << 20)


def _children(pid: int) -> list[int]:
    """Pids of a process's direct children; none once it is gone."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _role(pid: int) -> str:
    """What a child of `trackside up` is: "faust worker", "front door" or "broker"."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "gone"
    return ("faust worker" if b"streams\0worker" in command else
            "front door" if b"streams.ops.frontdoor" in command else "broker")


def _cpu_seconds(stat: Path) -> float:
    """User + system CPU seconds so far of a process or thread, from its /proc stat file."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_by_process(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of `trackside up` and of each of its children, by role."""
    cpu: dict[str, float] = {}
    for current in [pid] + _children(pid):
        try:
            seconds = _cpu_seconds(Path(f"/proc/{current}/stat"))
        except OSError:
            continue
        role = "up (ingest, sink, chdb)" if current == pid else _role(current)
        cpu[role] = cpu.get(role, 0.0) + seconds
    return cpu


def thread_cpu(pid: int) -> Counter[str]:
    """CPU seconds so far of each thread name of a process (Python's threads and native ones, such
    as chdb's merges, which py-spy does not see)."""
    cpu: Counter[str] = Counter()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
            seconds = _cpu_seconds(task / "stat")
        except OSError:
            continue
        cpu[re.sub(r"[0-9]+$", "", name) or name] += seconds
    return cpu


def start_profilers(pid: int, folder: Path) -> list[tuple[str, Path, subprocess.Popen]]:
    """py-spy sampling `trackside up` and its Python children (not the broker), each into a
    collapsed-stack file of `folder`."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    folder.mkdir(parents=True, exist_ok=True)
    profilers = []
    for current in [pid] + _children(pid):
        role = "up" if current == pid else _role(current)
        if role in ("broker", "gone"):
            continue
        path = folder / f"{role.replace(' ', '-')}-{current}.txt"
        command = [spy, "record", "--pid", str(current), "--rate", "250", "--nonblocking", "--full-filenames", "--format", "raw",
                   "--output", str(path)]
        profilers.append((role, path, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    return profilers


def stop_profilers(profilers: list[tuple[str, Path, subprocess.Popen]]) -> list[tuple[str, Path]]:
    """Stop the samplers (py-spy writes its file on SIGINT); the files they wrote."""
    for _, _, spy in profilers:
        spy.send_signal(signal.SIGINT)
    for _, _, spy in profilers:
        spy.wait(60)
    return [(role, path) for role, path, _ in profilers if path.exists()]


def _frame_name(frame: str) -> tuple[str, str]:
    """("function (file)", "package module") of a py-spy frame "function (path:line)"."""
    function, _, where = frame.rpartition(" (")
    path = where.rsplit(":", 1)[0]
    if "/streams/" in path or path.startswith("streams/"):
        module = "streams/" + path.rsplit("streams/", 1)[1]
    elif "site-packages/" in path:
        module = path.rsplit("site-packages/", 1)[1].split("/", 1)[0]
    else:
        module = path.rsplit("/", 1)[-1]
    return f"{function} ({module})", module


def profile_table(role: str, path: Path, top: int = 12) -> Table:
    """Where one process spent its samples: by function (self) and by module of the stack
    (inclusive, each module once per sample)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [_frame_name(frame) for frame in stack.split(";") if " (" in frame]
        if frames:
            own[frames[-1][0]] += samples
        for module in {module for _, module in frames if module.startswith("streams/")}:
            inclusive[module] += samples
    table = Table(title=f"profile of {role}: {total:,} samples while busy ({path})")
    table.add_column("function (self)")
    table.add_column("share", justify="right")
    table.add_column("module (inclusive)")
    table.add_column("share", justify="right")
    rows_own = own.most_common(top)
    rows_inclusive = inclusive.most_common(top)
    for i in range(max(len(rows_own), len(rows_inclusive))):
        name, samples = rows_own[i] if i < len(rows_own) else ("", 0)
        module, module_samples = rows_inclusive[i] if i < len(rows_inclusive) else ("", 0)
        table.add_row(name, f"{100 * samples / max(total, 1):.1f}%" if name else "",
                      module, f"{100 * module_samples / max(total, 1):.1f}%" if module else "")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--probes", type=int, default=40)
    parser.add_argument("--profile", type=Path, help="sample each process with py-spy into this folder")
    parser.add_argument(
        "--hours", type=float, default=1.0,
        help="event time the fleet spans: a replay compresses it, and each (version, window) costs a drift test",
    )
    args = parser.parse_args(argv)
    console = Console()

    runs = max(10, args.events // 12)  # the default fleet has ~12.6 events per run
    config = FleetConfig(seed=1, runs=runs, duration_ms=int(args.hours * 3_600_000))
    with console.status(f"simulating {runs} runs"):
        # The whole fleet, not a cut: a run cut short at the end of the stream would never close.
        events = list(simulate(config))
    lines = [orjson.dumps(event) for event in events]
    keys = [event["run_id"].encode() for event in events]
    run_ids = {event["run_id"] for event in events}

    data_dir = Path(tempfile.mkdtemp(prefix="trackside-bench-"))
    port = free_port()
    env = up_env(data_dir, port, args.workers, args.partitions)
    settings = Settings(data_dir=data_dir, embedded_port=port)
    bootstrap = f"127.0.0.1:{port}"
    with console.status("starting trackside up"):
        up = start_up(env, settings, data_dir / "up.err")
    try:
        with console.status("raw confluent-kafka baseline"):
            produce_rate, raw_rate = raw_consume_rate(bootstrap, lines, keys, args.partitions)

        published = [0]
        probe = Probe(bootstrap, settings, lambda: events[published[0]]["ts"])
        probe.once()  # warm-up, not counted
        probe.event_ms.clear()
        probe.run_ms.clear()
        store = running_service(settings)
        with console.status(f"pipeline: {len(lines)} events of {len(run_ids)} runs"):
            # Publish in a thread, so the clock starts at the first publish and runs to the last run landed.
            cpu_before = _cpu_by_process(up.pid)
            profilers = start_profilers(up.pid, args.profile) if args.profile else []
            threads_before = thread_cpu(up.pid)
            started = time.perf_counter()
            publisher = threading.Thread(target=_produce, args=(bootstrap, "agent.events", lines, keys, published))
            publisher.start()
            loaded_probes = 0
            while True:
                landed = int(store.query_raw(f"SELECT uniqExact(run_id) FROM runs WHERE agent_id != 'bench-probe'{CHEAP}",
                                             "TSV"))
                if landed >= len(run_ids):
                    break
                if loaded_probes < args.probes // 2:
                    probe.once()
                    probe.loop_once()
                    loaded_probes += 1
                else:  # each poll costs `up` a query: often only near the end, which it times
                    time.sleep(0.2 if landed < 0.95 * len(run_ids) else 0.02)
                if time.perf_counter() - started > 300:
                    raise RuntimeError(f"only {landed} of {len(run_ids)} runs landed in 5 minutes")
            elapsed = time.perf_counter() - started
            cpu_after = _cpu_by_process(up.pid)
            publisher.join()
            profiles = stop_profilers(profilers)
            threads = thread_cpu(up.pid)
            threads.subtract(threads_before)
        rss = _rss_mb(up.pid)
        loaded = (list(probe.event_ms), list(probe.run_ms), list(probe.loop_ms))
        probe.event_ms.clear()
        probe.run_ms.clear()
        probe.loop_ms.clear()
        with console.status("idle latency probes"):
            for _ in range(args.probes - loaded_probes):
                probe.once()
                probe.loop_once()
        idle = (probe.event_ms, probe.run_ms, probe.loop_ms)
        probe.close()
    finally:
        up.terminate()
        up.wait(60)
        shutil.rmtree(data_dir, ignore_errors=True)

    rate = len(lines) / elapsed
    table = Table(title=f"Trackside benchmark: {len(lines)} events, {len(run_ids)} runs over {args.hours:g} h of event "
                        f"time, {args.partitions} partitions, {args.workers} faust worker(s), {os.cpu_count()} cores")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("raw confluent-kafka produce", f"{produce_rate:,.0f} msgs/s")
    table.add_row("raw confluent-kafka consume (baseline)", f"{raw_rate:,.0f} msgs/s")
    table.add_row("pipeline, first publish -> last run in ClickHouse", f"{elapsed:.2f} s")
    table.add_row("pipeline throughput", f"{rate:,.0f} events/s")
    table.add_row("ratio pipeline / raw consume", f"{rate / raw_rate:.3f}")
    for label, (event_ms, run_ms, loop_ms) in (("under load", loaded), ("idle", idle)):
        table.add_row(f"publish -> event queryable, {label} (p50 / p99, n={len(event_ms)})",
                      f"{_quantile(event_ms, .5):,.0f} / {_quantile(event_ms, .99):,.0f} ms")
        table.add_row(f"publish -> run queryable, {label} (p50 / p99, n={len(run_ms)})",
                      f"{_quantile(run_ms, .5):,.0f} / {_quantile(run_ms, .99):,.0f} ms")
        table.add_row(f"looping call published -> loop alert on topic, {label} (p50 / p99, n={len(loop_ms)})",
                      f"{_quantile(loop_ms, .5):,.0f} / {_quantile(loop_ms, .99):,.0f} ms")
    for role, seconds in cpu_after.items():
        spent = seconds - cpu_before.get(role, 0.0)
        table.add_row(f"CPU of {role} during the pipeline (per event, % of one core)",
                      f"{spent * 1e6 / len(lines):.1f} µs ({100 * spent / elapsed:.0f}%)")
    table.add_row("memory of trackside up and children at the end", f"{rss:,.0f} MB")
    console.print(table)
    if args.profile:
        for role, path in profiles:
            console.print(profile_table(role, path))
        busy = Table(title="CPU of up's threads during the pipeline, by thread name")
        busy.add_column("thread")
        busy.add_column("µs per event", justify="right")
        for name, seconds in threads.most_common(12):
            busy.add_row(name, f"{seconds * 1e6 / len(lines):.1f}")
        console.print(busy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
