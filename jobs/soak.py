"""Soak benchmark (issue 12.4): a steady stream for a long time, a clean restart in the middle,
memory per process, latencies, and exact counts at the end.

    python -m jobs.soak [--minutes 20] [--rate 5000] [--partitions 4] [--restart-at 0.5]
                        [--sample-seconds 10] [--print-seconds 60] [--out jobs/soak-results] [--data-dir DIR]

1. Starts `trackside up` (a subprocess, as a user runs it, as jobs/bench.py does) on a fresh
   data dir and port.
2. A publisher thread produces a simulated fleet (`jobs.simulate`, one minute of runs at a time,
   event times on the wall clock) to `agent.events` at a steady rate, paced per 100 ms tick,
   for the whole duration and through the restart (librdkafka retries while the broker is down;
   delivery errors are counted). When the duration is over it finishes the runs it started, then
   sends one run per partition half an hour of event time later, so that the runs that never
   end close as `timeout` as they would live half an hour later.
3. Every `--sample-seconds`: the resident memory of `up`, the broker and each faust worker (and
   of this job), kept for the CSV, the plot and the peaks (a broker recycled at its bound is a
   saw-tooth, whose peaks a sample a minute misses by chance), and printed every
   `--print-seconds`.
4. Latency probes (bench's `Probe`): publish -> event queryable, publish -> run queryable and
   looping call -> `loop` alert, every `--probe-seconds`; at 35% and 75% of the duration an
   analyst runs a heavy query through `trackside sql` for `--query-seconds`, and the probes
   taken meanwhile are reported apart.
5. At `--restart-at` of the duration: SIGTERM to `up` (it drains the broker into the store),
   then `up` again on the same data dir and port; the downtime and the drain's log line are kept.
6. At the end: exact counts (events and runs published vs stored, lost, doubled) and the memory
   verdict: each process's and the stack's peak over the last half of the duration at most 10%
   above its peak over the second quarter. Exits 1 if anything was lost or doubled.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson
from confluent_kafka import KafkaError, Message, Producer
from rich.console import Console
from rich.table import Table

from jobs.bench import CHEAP, Probe, _children, _quantile, _role, _rss_mb, start_up, up_env
from jobs.simulate import FleetConfig, simulate
from streams.ops.broker import free_port, resident_bytes
from streams.settings import Settings
from streams.store.clickhouse import running_service

TICK_S = 0.1
CHUNK_S = 60  # the fleet is simulated one minute of runs at a time
PROBE_AGENTS = ("bench-probe", "soak-clock")  # not the fleet's: left out of the counts
NOT_PROBES = f"agent_id NOT IN {PROBE_AGENTS!r}"
# An analyst's question over every stored event: per agent, tool and minute, calls, runs,
# latency percentiles and cost, deduplicated with FINAL.
HEAVY_QUERY = (
    "SELECT agent_id, tool, toStartOfMinute(ts) AS minute, count() AS calls, uniqExact(run_id) AS runs, "
    "quantiles(0.5, 0.95, 0.99)(latency_ms) AS latency_ms, sum(cost_usd) AS cost_usd "
    "FROM events FINAL GROUP BY agent_id, tool, minute ORDER BY calls DESC LIMIT 20"
)
GROWTH_BAR = 1.10
DRAIN_LINE = re.compile(r"(drained \d+ messages into the store in [\d.]+ s|stopped draining after .*)")


# --- the fleet ---------------------------------------------------------------------------


def events_per_run(seed: int) -> float:
    """The simulated fleet's mean events per run, measured on a sample."""
    sample = FleetConfig(seed=seed, runs=2000, start_ms=0, duration_ms=CHUNK_S * 1000)
    return sum(1 for _ in simulate(sample)) / sample.runs


def fleet(rate: float, seconds: float, start_ms: int, seed: int) -> Iterator[dict]:
    """The fleet's events in event-time order, from `start_ms` on: runs start over `seconds`, at
    a pace that makes `rate` events per second. One chunk of runs is simulated at a time and
    merged with the runs still going, so memory follows the runs in flight."""
    chunk_ms = int(min(CHUNK_S, seconds) * 1000)
    runs = max(1, round(rate * chunk_ms / 1000 / events_per_run(seed)))
    chunk_starts = range(start_ms, start_ms + int(seconds * 1000), chunk_ms)
    heap: list[tuple[int, int, int, dict, Iterator[dict]]] = []
    for index, chunk_start in enumerate(chunk_starts):
        chunk = simulate(FleetConfig(seed=seed + index, runs=runs, start_ms=chunk_start, duration_ms=chunk_ms))
        # Every event of the chunk is at or after its start: the ones before it can go first.
        while heap and heap[0][0] < chunk_start:
            yield _next(heap)
        first = next(chunk, None)
        if first is not None:
            heapq.heappush(heap, (first["ts"], index, 0, first, chunk))
    while heap:
        yield _next(heap)


def _next(heap: list[tuple[int, int, int, dict, Iterator[dict]]]) -> dict:
    _, index, seq, event, chunk = heapq.heappop(heap)
    following = next(chunk, None)
    if following is not None:
        heapq.heappush(heap, (following["ts"], index, seq + 1, following, chunk))
    return event


# --- publishing ----------------------------------------------------------------------------


class Publisher(threading.Thread):
    """Produces the fleet at a steady rate, per 100 ms tick; counts what it sent and what the
    broker confirmed or refused. Event and run ids are kept as 64-bit hashes, not strings."""

    def __init__(self, bootstrap: str, rate: float, seconds: float, seed: int) -> None:
        super().__init__(name="publisher", daemon=True)
        self.rate = rate
        self.events = fleet(rate, seconds, int(time.time() * 1000), seed)
        self.producer = Producer({
            "bootstrap.servers": bootstrap, "linger.ms": 20, "log.connection.close": False,
            # room for the minute or so `up` is away at its restart
            "queue.buffering.max.messages": 2_000_000,
            # no "Connection refused" line every 50 ms while the broker restarts: refusals
            # that matter come back as delivery errors, which are counted
            "log_level": 2,
        })
        self.published = 0
        self.delivered = 0
        self.errors = 0
        self.first_errors: list[str] = []
        self.most_queued = 0
        self.last_ts = int(time.time() * 1000)
        self.event_hashes = array("q")
        self.run_hashes: set[int] = set()
        self.finished = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        tick = 0
        for event in self.events:
            while self.published >= self.rate * (time.monotonic() - started):
                tick += 1
                self.producer.poll(0)
                self.most_queued = max(self.most_queued, len(self.producer))
                time.sleep(max(0.0, started + tick * TICK_S - time.monotonic()))
            self._produce(event)
        while len(self.producer):
            self.producer.flush(1)
        self.finished.set()

    def _produce(self, event: dict) -> None:
        key = event["run_id"].encode()
        while True:
            try:
                self.producer.produce("agent.events", value=orjson.dumps(event), key=key, on_delivery=self._delivered)
                break
            except BufferError:
                self.producer.poll(0.05)
        self.published += 1
        self.last_ts = event["ts"]
        self.event_hashes.append(hash(event["event_id"]))
        self.run_hashes.add(hash(event["run_id"]))

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is None:
            self.delivered += 1
            return
        self.errors += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(str(error))

    def distinct_events(self) -> int:
        import numpy

        return int(numpy.unique(numpy.frombuffer(self.event_hashes, dtype=numpy.int64)).size)

    def close_open_runs(self, partitions: int, ahead_ms: int) -> None:
        """One run per partition `ahead_ms` of event time after the last event: every
        partition's watermark passes the idle timeout of the runs that never sent run_end."""
        ts = self.last_ts + ahead_ms
        for partition in range(partitions):
            run_id = f"soak-clock-{partition}"
            base = {"run_id": run_id, "agent_id": "soak-clock", "agent_version": "1", "ts": ts}
            start = {**base, "event_id": f"{run_id}-s", "type": "run_start"}
            end = {**base, "event_id": f"{run_id}-e", "type": "run_end", "outcome": "success"}
            for event in (start, end):
                self.producer.produce("agent.events", value=orjson.dumps(event), key=run_id.encode(),
                                      partition=partition, on_delivery=self._clock_delivered)
        self.producer.flush(60)

    def _clock_delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self.errors += 1
            self.first_errors.append(f"clock run: {error}")


# --- the stack ------------------------------------------------------------------------------


@dataclass
class Stack:
    """`trackside up` on one data dir and port, restartable."""

    env: dict[str, str]
    settings: Settings
    log: Path
    up: subprocess.Popen | None = None

    def start(self) -> None:
        self.up = start_up(self.env, self.settings, self.log)

    def stop(self) -> float:
        """SIGTERM and wait for `up` to leave; returns how long it took."""
        began = time.monotonic()
        if self.up is not None and self.up.poll() is None:
            self.up.send_signal(signal.SIGTERM)
            self.up.wait(300)
        return time.monotonic() - began

    def processes(self) -> dict[str, int]:
        """Pid of `up`, its broker and each of its workers, by role; after a restart they are new."""
        if self.up is None or self.up.poll() is not None:
            return {}
        children = {pid: _role(pid) for pid in sorted(_children(self.up.pid))}
        workers = [pid for pid, role in children.items() if role == "faust worker"]
        roles = {"up": self.up.pid}
        roles.update({role.replace(" ", "-"): pid for pid, role in children.items() if role in ("broker", "front door")})
        roles.update({f"worker-{index}": pid for index, pid in enumerate(workers)})
        return roles

    def drain_line(self) -> str:
        found = DRAIN_LINE.findall(self.log.read_text(errors="replace"))
        return found[-1] if found else "no drain line in the log"


@dataclass
class Sample:
    elapsed_s: float
    published: int
    delivered: int
    memory_mb: dict[str, float]  # by role, each with its children; "stack" is `up` and all its children


def take_sample(stack: Stack, publisher: Publisher, elapsed: float) -> Sample:
    memory = {role: _rss_mb(pid) if role != "up" else (resident_bytes(pid) or 0) / (1 << 20)
              for role, pid in stack.processes().items()}
    if stack.up is not None and stack.up.poll() is None:
        memory["stack"] = _rss_mb(stack.up.pid)
    memory["soak job"] = (resident_bytes(os.getpid()) or 0) / (1 << 20)
    return Sample(elapsed, publisher.published, publisher.delivered, memory)


# --- probes and the analyst ----------------------------------------------------------------


@dataclass
class ProbeResult:
    elapsed_s: float
    during_query: bool
    event_ms: float
    run_ms: float
    loop_ms: float


@dataclass
class Prober:
    """Runs bench's probes every `interval` seconds in a thread; `lock` is held around each
    probe, so that the restart can take the probe away between two of them."""

    stack: Stack
    publisher: Publisher
    interval: float
    started: float
    query_running: threading.Event
    results: list[ProbeResult] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    probe: Probe | None = None

    def connect(self) -> None:
        self.probe = Probe(f"127.0.0.1:{self.stack.settings.embedded_port}", self.stack.settings,
                           lambda: self.publisher.last_ts)

    def disconnect(self) -> None:
        if self.probe is not None:
            self.probe.close()
            self.probe = None

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            with self.lock:
                if self.probe is None:
                    continue
                during = self.query_running.is_set()
                began = time.monotonic() - self.started
                self.probe.once()
                self.probe.loop_once()
                self.results.append(ProbeResult(began, during and self.query_running.is_set(),
                                                self.probe.event_ms[-1], self.probe.run_ms[-1], self.probe.loop_ms[-1]))


@dataclass
class Analyst:
    """A person who runs the heavy query through `trackside sql`, again and again, for a while."""

    env: dict[str, str]
    started: float
    # Held around each query and by the restart: `trackside sql` run while `up` is away opens
    # the embedded store itself, and `up` then cannot start (chdb's lock on the directory).
    store_lock: threading.Lock
    running: threading.Event = field(default_factory=threading.Event)
    took: list[float] = field(default_factory=list)  # seconds per query; NaN when it failed
    windows: list[tuple[float, float]] = field(default_factory=list)  # seconds of the soak

    def session(self, seconds: float) -> None:
        trackside = str(Path(sys.executable).parent / "trackside")
        began = time.monotonic()
        self.running.set()
        try:
            while time.monotonic() < began + seconds:
                with self.store_lock:
                    one = time.monotonic()
                    done = subprocess.run([trackside, "sql", HEAVY_QUERY, "--format", "Null"], env=self.env,
                                          capture_output=True, check=False)
                    self.took.append(time.monotonic() - one if done.returncode == 0 else float("nan"))
        finally:
            self.running.clear()
            self.windows.append((began - self.started, time.monotonic() - self.started))


@dataclass
class Restart:
    """A clean stop of `up` and a start on the same data dir and port, while the publisher goes on."""

    stack: Stack
    prober: Prober
    analyst: Analyst
    started: float
    console: Console
    window: tuple[float, float] | None = None  # (SIGTERM sent, ready again) in seconds of the soak
    drain: str = ""
    failed: BaseException | None = None

    def run(self) -> None:
        try:
            self._restart()
        except BaseException as error:  # the soak's loop raises it
            self.failed = error

    def _restart(self) -> None:
        with self.prober.lock, self.analyst.store_lock:
            self.prober.disconnect()
            stopped_at = self._say("restart: SIGTERM to trackside up")
            took = self.stack.stop()
            self.drain = self.stack.drain_line()
            self._say(f"up left in {took:.1f} s: {self.drain}")
            self.stack.start()
            ready_at = self._say("up ready again")
            self.window = (stopped_at, ready_at)
            self._say(f"up was away {ready_at - stopped_at:.1f} s")
            self.prober.connect()

    def _say(self, what: str) -> float:
        elapsed = time.monotonic() - self.started
        self.console.print(f"{elapsed / 60:5.1f} min  {what}")
        return elapsed


# --- the end ---------------------------------------------------------------------------------


@dataclass
class Counts:
    events_published: int
    events_distinct_published: int
    events_final: int
    events_distinct_stored: int
    events_rows: int
    runs_published: int
    runs_final: int
    runs_distinct_stored: int
    store_bytes: int = 0  # the store's directory after `up` stopped (its final merge done)

    @property
    def events_lost(self) -> int:
        return self.events_distinct_published - self.events_distinct_stored

    @property
    def events_doubled(self) -> int:
        return self.events_final - self.events_distinct_stored

    @property
    def runs_lost(self) -> int:
        return self.runs_published - self.runs_distinct_stored

    @property
    def runs_doubled(self) -> int:
        return self.runs_final - self.runs_distinct_stored


def wait_for_runs(settings: Settings, expected: int, timeout: float, quiet: float = 60.0) -> int:
    """Runs landed once all `expected` are, or none has landed for `quiet` seconds, or after `timeout`."""
    store = running_service(settings)
    ends = time.monotonic() + timeout
    landed, moved = -1, time.monotonic()
    while True:
        now = int(store.query_raw(f"SELECT uniqExact(run_id) FROM runs WHERE {NOT_PROBES}{CHEAP}", "TSV"))
        if now != landed:
            landed, moved = now, time.monotonic()
        if landed >= expected or time.monotonic() > min(ends, moved + quiet):
            return landed
        time.sleep(1)


def count(settings: Settings, publisher: Publisher) -> Counts:
    store = running_service(settings)

    def one(sql: str) -> int:
        return int(store.query_raw(sql, "TSV"))

    return Counts(
        events_published=publisher.published,
        events_distinct_published=publisher.distinct_events(),
        events_final=one(f"SELECT count() FROM events FINAL WHERE {NOT_PROBES}"),
        events_distinct_stored=one(f"SELECT uniqExact(event_id) FROM events WHERE {NOT_PROBES}"),
        events_rows=one(f"SELECT count() FROM events WHERE {NOT_PROBES}"),
        runs_published=len(publisher.run_hashes),
        runs_final=one(f"SELECT count() FROM runs FINAL WHERE {NOT_PROBES}"),
        runs_distinct_stored=one(f"SELECT uniqExact(run_id) FROM runs WHERE {NOT_PROBES}"),
    )


def growth(samples: list[Sample], seconds: float) -> dict[str, tuple[float, float]]:
    """Per role: (peak over 25-50% of the duration, peak over 50-100%)."""
    roles = dict.fromkeys(role for sample in samples for role in sample.memory_mb)
    return {role: (_peak(samples, role, 0.25 * seconds, 0.5 * seconds), _peak(samples, role, 0.5 * seconds, seconds))
            for role in roles}


def _peak(samples: list[Sample], role: str, low: float, high: float) -> float:
    return max((s.memory_mb[role] for s in samples if low <= s.elapsed_s <= high and role in s.memory_mb),
               default=float("nan"))


# --- reporting ---------------------------------------------------------------------------------


def print_sample(console: Console, sample: Sample) -> None:
    memory = "  ".join(f"{role} {mb:,.0f}" for role, mb in sample.memory_mb.items())
    console.print(f"{sample.elapsed_s / 60:5.1f} min  published {sample.published:>10,}  "
                  f"delivered {sample.delivered:>10,}  MB: {memory}")


def write_csv(path: Path, samples: list[Sample]) -> None:
    roles = list(dict.fromkeys(role for sample in samples for role in sample.memory_mb))
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["elapsed_s", "published", "delivered"] + [f"{role}_mb" for role in roles])
        for s in samples:
            writer.writerow([f"{s.elapsed_s:.1f}", s.published, s.delivered]
                            + [f"{s.memory_mb[role]:.1f}" if role in s.memory_mb else "" for role in roles])


def write_probes_csv(path: Path, results: list[ProbeResult]) -> None:
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["elapsed_s", "during_query", "event_ms", "run_ms", "loop_alert_ms"])
        for r in results:
            writer.writerow([f"{r.elapsed_s:.1f}", int(r.during_query), f"{r.event_ms:.1f}", f"{r.run_ms:.1f}",
                             f"{r.loop_ms:.1f}"])


def write_summary(path: Path, counts: Counts, publisher: Publisher, peaks: dict[str, tuple[float, float]]) -> None:
    """The counts and the memory peaks, for a machine to read."""
    summary = {
        **asdict(counts), "events_lost": counts.events_lost, "events_doubled": counts.events_doubled,
        "runs_lost": counts.runs_lost, "runs_doubled": counts.runs_doubled,
        "events_delivered": publisher.delivered, "delivery_errors": publisher.errors,
        "memory_peaks_mb": {role: {"second_quarter": warm, "last_half": late} for role, (warm, late) in peaks.items()},
    }
    path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))


def plot(path: Path, samples: list[Sample], restart: tuple[float, float] | None,
         queries: list[tuple[float, float]], title: str) -> bool:
    """Memory per process over time, the restart and the analyst's queries shaded."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(10, 5))
    minutes = [s.elapsed_s / 60 for s in samples]
    for role in dict.fromkeys(role for sample in samples for role in sample.memory_mb):
        axes.plot(minutes, [s.memory_mb.get(role, math.nan) for s in samples], marker=".",
                  label=role, linewidth=2.5 if role == "stack" else 1.5)
    if restart is not None:
        axes.axvspan(restart[0] / 60, restart[1] / 60, color="red", alpha=0.2, label="restart of up")
    for index, (began, ended) in enumerate(queries):
        axes.axvspan(began / 60, ended / 60, color="grey", alpha=0.15, label="analyst query" if index == 0 else None)
    axes.set_xlabel("minutes")
    axes.set_ylabel("resident memory (MB)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return True


def latency_table(results: list[ProbeResult], queries_s: list[float]) -> Table:
    table = Table(title="latency probes (ms)")
    for column in ("probes", "n", "measure", "p50", "p95", "p99"):
        table.add_column(column, justify="right" if column not in ("probes", "measure") else "left")
    for label, chosen in (("all", results), ("during an analyst query", [r for r in results if r.during_query])):
        for measure, values in (("publish -> event queryable", [r.event_ms for r in chosen]),
                                ("publish -> run queryable", [r.run_ms for r in chosen]),
                                ("looping call -> loop alert", [r.loop_ms for r in chosen])):
            lost = sum(1 for v in values if v != v)
            table.add_row(label, f"{len(values)}" + (f" ({lost} timed out)" if lost else ""), measure,
                          *(f"{_quantile(values, q):,.0f}" for q in (0.5, 0.95, 0.99)))
    ok = [t for t in queries_s if t == t]
    fastest, slowest = min(ok, default=math.nan), max(ok, default=math.nan)
    table.caption = (f"analyst query through `trackside sql`: {len(queries_s)} runs, "
                     f"{len(queries_s) - len(ok)} failed, {fastest:.1f}-{slowest:.1f} s each")
    return table


def growth_table(peaks: dict[str, tuple[float, float]]) -> tuple[Table, bool]:
    table = Table(title=f"memory after warm-up: peak over the last half vs the second quarter (bar: x{GROWTH_BAR:.2f})")
    for column in ("process", "peak 25-50% (MB)", "peak 50-100% (MB)", "ratio", "verdict"):
        table.add_column(column, justify="left" if column == "process" else "right")
    passed = True
    for role, (warm, late) in peaks.items():
        if role == "soak job":
            continue
        ratio = late / warm if warm else math.nan
        verdict = "PASS" if ratio <= GROWTH_BAR else "FAIL"
        passed &= verdict == "PASS"
        table.add_row(role, f"{warm:,.0f}", f"{late:,.0f}", f"{ratio:.3f}", verdict)
    return table, passed


def counts_table(counts: Counts, publisher: Publisher) -> Table:
    table = Table(title="exact counts (the fleet's; probes left out)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("events published (produce calls)", counts.events_published),
        ("events delivered (broker confirmed)", publisher.delivered),
        ("delivery errors", publisher.errors),
        ("distinct event_ids published", counts.events_distinct_published),
        ("SELECT count() FROM events FINAL", counts.events_final),
        ("SELECT uniqExact(event_id) FROM events", counts.events_distinct_stored),
        ("rows in events before deduplication (redeliveries)", counts.events_rows),
        ("events lost", counts.events_lost),
        ("events doubled (FINAL count - distinct)", counts.events_doubled),
        ("runs published", counts.runs_published),
        ("SELECT count() FROM runs FINAL", counts.runs_final),
        ("SELECT uniqExact(run_id) FROM runs", counts.runs_distinct_stored),
        ("runs lost", counts.runs_lost),
        ("runs doubled", counts.runs_doubled),
        ("most messages queued in the producer", publisher.most_queued),
    ]
    for measure, value in rows:
        table.add_row(measure, f"{value:,}")
    return table


# --- the job ------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=5000.0, help="events per second")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--restart-at", type=float, default=0.5, help="fraction of the duration; 0 = no restart")
    parser.add_argument("--sample-seconds", type=float, default=10.0,
                        help="how often memory is measured (the CSV, the plot and the peaks)")
    parser.add_argument("--print-seconds", type=float, default=60.0, help="how often a sample is printed")
    parser.add_argument("--probe-seconds", type=float, default=10.0)
    parser.add_argument("--query-seconds", type=float, default=60.0, help="how long each analyst session lasts")
    parser.add_argument("--settle-seconds", type=float, default=600.0,
                        help="longest wait at the end for every published run to land")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "soak-results")
    parser.add_argument("--data-dir", type=Path, help="default: a fresh temporary dir, removed at the end")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # one line per sample in a log file too
    seconds = args.minutes * 60
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="trackside-soak-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = up_env(data_dir, port, args.workers, args.partitions)
    stack = Stack(env, Settings(data_dir=data_dir, embedded_port=port), data_dir / "up.err")
    console.print(f"soak: {args.minutes:g} min at {args.rate:,.0f} events/s, {args.partitions} partitions, "
                  f"{args.workers} worker(s), data dir {data_dir}, {os.cpu_count()} cores; "
                  f"started {time.strftime('%H:%M:%S')}")
    with console.status("starting trackside up"):
        stack.start()
    publisher = Publisher(f"127.0.0.1:{port}", args.rate, seconds, args.seed)
    started = time.monotonic()
    analyst = Analyst(env, started, threading.Lock())
    prober = Prober(stack, publisher, args.probe_seconds, started, analyst.running)
    restart = Restart(stack, prober, analyst, started, console)
    try:
        prober.connect()
        publisher.start()
        samples = soak(args, console, stack, publisher, analyst, restart, started)
        counts = settle(args, console, stack.settings, publisher)
        prober.disconnect()
    finally:
        prober.stop.set()
        stop_s = stack.stop()
    console.print(f"trackside up stopped in {stop_s:.1f} s")
    counts.store_bytes = sum(path.stat().st_size for path in (data_dir / "clickhouse").rglob("*") if path.is_file())
    console.print(f"the store on disk: {counts.store_bytes / 1e6:,.0f} MB, {counts.store_bytes / counts.events_final:,.0f} "
                  "bytes per event (events, runs and every result table)")
    exact = report(args, console, samples, counts, publisher, prober.results, analyst, restart)
    if args.data_dir is None and exact:
        shutil.rmtree(data_dir, ignore_errors=True)
    else:
        console.print(f"data dir kept: {data_dir}")
    return 0 if exact else 1


def soak(args: argparse.Namespace, console: Console, stack: Stack, publisher: Publisher, analyst: Analyst,
         restart: Restart, started: float) -> list[Sample]:
    """Until the publisher is done: a sample every --sample-seconds, the restart and the analyst's
    sessions when they are due."""
    seconds = args.minutes * 60
    samples: list[Sample] = []
    sessions = [0.35 * seconds, 0.75 * seconds]
    probes = threading.Thread(target=restart.prober.run, name="prober")
    probes.start()
    threads: list[threading.Thread] = []
    next_sample = next_print = 0.0
    while not publisher.finished.wait(0.2):
        if restart.failed is not None:
            raise RuntimeError("the restart of trackside up failed") from restart.failed
        elapsed = time.monotonic() - started
        if elapsed >= next_sample:
            samples.append(take_sample(stack, publisher, elapsed))
            next_sample += args.sample_seconds
            if elapsed >= next_print:
                print_sample(console, samples[-1])
                next_print += args.print_seconds
        if args.restart_at and not threads_started(threads, "restart") and elapsed >= args.restart_at * seconds:
            threads.append(threading.Thread(target=restart.run, name="restart"))
            threads[-1].start()
        if sessions and elapsed >= sessions[0]:
            sessions.pop(0)
            threads.append(threading.Thread(target=analyst.session, args=(args.query_seconds,), name="analyst"))
            threads[-1].start()
    elapsed = time.monotonic() - started
    samples.append(take_sample(stack, publisher, elapsed))
    print_sample(console, samples[-1])
    console.print(f"published {publisher.published:,} events in {elapsed:.0f} s "
                  f"({publisher.published / elapsed:,.0f}/s); delivery errors so far: {publisher.errors}")
    restart.prober.stop.set()
    for thread in [probes] + threads:
        thread.join()
    return samples


def threads_started(threads: list[threading.Thread], name: str) -> bool:
    return any(thread.name == name for thread in threads)


def settle(args: argparse.Namespace, console: Console, settings: Settings, publisher: Publisher) -> Counts:
    """Close the runs that never ended, wait for every published run to land, and count."""
    # They close once event time is an idle timeout (plus the lateness) past them: one run per
    # partition that much later says it is.
    ahead_s = settings.run_idle_timeout_seconds + settings.allowed_lateness_seconds + 60
    publisher.close_open_runs(args.partitions, ahead_s * 1000)
    began = time.monotonic()
    with console.status(f"waiting for {len(publisher.run_hashes):,} runs to land"):
        landed = wait_for_runs(settings, len(publisher.run_hashes), args.settle_seconds)
    console.print(f"{landed:,} of {len(publisher.run_hashes):,} runs landed {time.monotonic() - began:.0f} s "
                  "after the last publish")
    return count(settings, publisher)


def report(args: argparse.Namespace, console: Console, samples: list[Sample], counts: Counts,
           publisher: Publisher, probes: list[ProbeResult], analyst: Analyst, restart: Restart) -> bool:
    """Print the tables, write the CSVs and the plot; returns whether nothing was lost or doubled."""
    console.print(latency_table(probes, analyst.took))
    peaks = growth(samples, args.minutes * 60)
    growth_view, memory_passed = growth_table(peaks)
    console.print(growth_view)
    console.print(counts_table(counts, publisher))
    if restart.window is not None:
        began, ended = restart.window
        console.print(f"restart at {began / 60:.1f} min: `up` was away {ended - began:.1f} s; {restart.drain}")
    if publisher.first_errors:
        console.print(f"first delivery errors: {publisher.first_errors}")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    csv_path, png_path = args.out / f"soak-{stamp}.csv", args.out / f"soak-{stamp}.png"
    write_csv(csv_path, samples)
    write_probes_csv(args.out / f"soak-{stamp}-probes.csv", probes)
    write_summary(args.out / f"soak-{stamp}-summary.json", counts, publisher, peaks)
    title = f"trackside soak: {args.minutes:g} min at {args.rate:,.0f} events/s, {args.partitions} partitions"
    if plot(png_path, samples, restart.window, analyst.windows, title):
        console.print(f"samples: {csv_path}; plot: {png_path}")
    else:
        console.print(f"samples: {csv_path}; no plot: matplotlib (a dev dependency) is not installed")

    exact = (counts.events_lost == counts.events_doubled == counts.runs_lost == counts.runs_doubled == 0
             and publisher.errors == 0)
    console.print(f"memory bounded after warm-up: {'PASS' if memory_passed else 'FAIL'}; "
                  f"nothing lost or doubled: {'PASS' if exact else 'FAIL'}")
    return exact


if __name__ == "__main__":
    sys.exit(main())
