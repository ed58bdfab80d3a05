"""Shared fixtures: a real `trackside up` (embedded Tansu broker + chdb) on its own data dir and port."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from streams.contracts import topics
from streams.ops.broker import free_port
from streams.ingest import sink
from streams.processors import app
from streams.settings import Settings
from streams.store.clickhouse import running_service
from tests.waiting import wait_until

BIN = Path(sys.executable).parent


# (consumer group, topic) for every topic `up` reads, upstream before downstream.
PIPELINE = (
    (sink.GROUP, topics.AGENT_EVENTS.name),
    (sink.GROUP, topics.OTLP_SPANS.name),
    (sink.GROUP, topics.AGENT_DEPLOYMENTS.name),
    (app.APP_ID, topics.EVENT_BATCHES.name),
    (app.APP_ID, topics.RUN_RESULTS.name),
    (sink.GROUP, topics.RUN_RESULTS.name),
    (sink.GROUP, topics.METRIC_RESULTS.name),
    (sink.GROUP, topics.ALERTS.name),
    (sink.GROUP, topics.ROLLBACKS.name),
)


def _reader(kafka_config: dict, group: str = "trackside-tests") -> Consumer:
    """A consumer that reads by assignment: it joins no group and commits nothing."""
    return Consumer({**kafka_config, "group.id": group, "enable.auto.commit": False,
                     "enable.partition.eof": True, "auto.offset.reset": "earliest"})


def _partitions(consumer: Consumer, topic: str) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions]


def metric_value(metrics: str, name: str) -> float:
    """The value of one sample of a Prometheus text exposition."""
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def committed_offsets(kafka_config: dict, group: str, topic: str) -> dict[int, int]:
    """`group`'s committed offset on each partition of `topic` (0 where it never committed)."""
    consumer = _reader(kafka_config, group)
    try:
        return {tp.partition: max(tp.offset, 0)
                for tp in consumer.committed(_partitions(consumer, topic), timeout=10)}
    finally:
        consumer.close()


def read_to_end(kafka_config: dict, topic: str,
                starts: dict[int, int] | None = None) -> tuple[list[Message], dict[int, int]]:
    """The messages of `topic` from `starts` (offset per partition; default the start) to the
    partitions' present ends, and those ends. An end is where a fetch stops: the embedded Tansu
    answers ListOffsets (get_watermark_offsets) with stale ends."""
    consumer = _reader(kafka_config)
    try:
        partitions = _partitions(consumer, topic)
        consumer.assign([TopicPartition(topic, tp.partition, (starts or {}).get(tp.partition, 0)) for tp in partitions])
        messages: list[Message] = []
        ends: dict[int, int] = {}

        def read_on() -> dict[int, int]:
            for message in consumer.consume(1000, 0.2):
                if message.error() is None:
                    messages.append(message)
                elif message.error().code() == KafkaError._PARTITION_EOF:
                    ends[message.partition()] = message.offset()
            return ends

        wait_until(read_on, 30, f"the ends of {topic}", done=lambda ends: len(ends) == len(partitions), interval=0)
        return messages, ends
    finally:
        consumer.close()


def unconsumed(kafka_config: dict, group: str, topic: str) -> dict[int, int]:
    """Per partition of `topic`, how many messages `group` has not committed (partitions with none left out)."""
    committed = committed_offsets(kafka_config, group, topic)
    _, ends = read_to_end(kafka_config, topic, committed)
    return {p: end - committed[p] for p, end in ends.items() if end > committed[p]}


class RunningStack:
    """A `trackside up` subprocess and what a test needs to talk to it."""

    def __init__(
        self, data_dir: Path, extra_env: dict | None = None, *, trackside: Path = BIN / "trackside", cwd: Path | None = None
    ) -> None:
        self.data_dir = data_dir
        self.trackside = trackside  # the console script to run, and the directory to run it in
        self.cwd = cwd
        self.port = free_port()
        self.metrics_port = free_port()
        self.console_port = free_port()
        self.env = {
            **os.environ,
            "TRACKSIDE_DATA_DIR": str(data_dir),
            "TRACKSIDE_EMBEDDED_PORT": str(self.port),
            "TRACKSIDE_METRICS_PORT": str(self.metrics_port),
            # the console follows every hand-over in `up`: on only where a test asks for it
            "TRACKSIDE_CONSOLE_PORT": "0",
            **(extra_env or {}),
        }
        self.env.pop("TRACKSIDE_BOOTSTRAP", None)
        self.env.pop("TRACKSIDE_CLICKHOUSE_URL", None)
        self.process: subprocess.Popen | None = None
        self.output = data_dir / "up.out"

    @property
    def settings(self) -> Settings:
        return Settings(data_dir=self.data_dir, embedded_port=self.port)

    def start(self, timeout: float = 90) -> str:
        """Start `trackside up` and wait until it says it is ready and its query service answers."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        written_before = self.output.stat().st_size if self.output.exists() else 0
        with open(self.output, "ab") as out:
            self.process = subprocess.Popen(
                [str(self.trackside), "up"], env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            self.ready_line = wait_until(lambda: self._ready(written_before), timeout, "`trackside up` to be ready")
        except AssertionError as not_ready:
            raise AssertionError(f"{not_ready}\n{self._output_tail()}") from None
        return self.ready_line

    def _ready(self, written_before: int) -> str | None:
        """The ready line this start printed, once the query service answers too."""
        if self.process.poll() is not None:
            raise RuntimeError(f"trackside up exited:\n{self._output_tail()}")
        with open(self.output, "rb") as out:
            out.seek(written_before)
            printed = out.read().decode(errors="replace").splitlines()
        ready = [line for line in printed if line.startswith("trackside ready ")]
        return ready[-1] if ready and running_service(self.settings) is not None else None

    def _output_tail(self) -> str:
        return self.output.read_text(errors="replace")[-3000:]

    def stop(self, timeout: float = 60) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.terminate()
        return self.process.wait(timeout)

    def cli(self, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.trackside), *args], env=self.env, cwd=self.cwd, input=input, capture_output=True, timeout=300,
            check=check,
        )

    def query(self, sql: str, parameters: dict | None = None) -> list[dict]:
        """Rows of a query through the running stack's query service (FINAL applied)."""
        return running_service(self.settings).query_json(sql, parameters)

    def metrics(self) -> str:
        """The text of `up`'s Prometheus /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return response.read().decode()

    def count(self, sql: str, parameters: dict | None = None) -> int:
        """A one-number query (ClickHouse's JSON quotes 64-bit integers)."""
        (row,) = self.query(sql, parameters)
        return int(next(iter(row.values())))

    def wait_for_count(self, sql: str, expected: int, timeout: float = 90, parameters: dict | None = None) -> int:
        """Wait until a one-number query gives `expected`, and return it."""
        return wait_until(lambda: self.count(sql, parameters), timeout, f"`{sql}` to give {expected}",
                          done=lambda count: count == expected, interval=0.3)

    def with_console(self) -> RunningStack:
        """Serve the console (SPEC §10) on `console_port` when started."""
        self.env["TRACKSIDE_CONSOLE_PORT"] = str(self.console_port)
        return self

    def running(self) -> Iterator[RunningStack]:
        """For a module's fixture: started, yielded, then stopped cleanly (`yield from`)."""
        self.start()
        yield self
        assert self.stop() == 0

    def api(self, path: str, *, method: str = "GET", body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, object]:
        """(status, JSON) of a request to the console (SPEC §10); an error's JSON too."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.console_port}{path}", data=body, method=method,
                                         headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, orjson.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, orjson.loads(error.read() or b"null")

    def on_topic(self, topic: str) -> list[dict]:
        """Every message on a topic so far, decoded from JSON."""
        messages, _ = read_to_end(self.settings.kafka_config, topic)
        return [orjson.loads(message.value()) for message in messages]

    def unconsumed(self, group: str, topic: str) -> dict[int, int]:
        return unconsumed(self.settings.kafka_config, group, topic)

    def committed(self, group: str, topic: str) -> dict[int, int]:
        return committed_offsets(self.settings.kafka_config, group, topic)

    def wait_until_processed(self, timeout: float = 90) -> None:
        """Wait until the store sink and the processors have committed every message on every
        topic they read. The topics are checked in the order the pipeline passes messages on,
        so what a stage sent before committing its input is counted downstream."""
        wait_until(lambda: {f"{group} on {topic}": lag for group, topic in PIPELINE
                            if (lag := self.unconsumed(group, topic))},
                   timeout, "the sink and the processors to commit every message", done=lambda lags: not lags,
                   interval=0.5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One stack per test module: event time is shared per partition, so modules must not mix."""
    running = RunningStack(tmp_path_factory.mktemp("stack"))
    running.start()
    yield running
    assert running.stop() == 0


def canary_runs(agent_id: str, version: str, n: int, success: float, start: int, seed: int,
                prefix: str = "") -> list[dict]:
    """`n` one-call runs of an agent version a second apart from `start`, each a success with
    probability `success` (seeded): what the canary and shadow tests feed both arms."""
    rng = random.Random(seed)
    events = []
    for i in range(n):
        run, t = f"{prefix}{version}-{i}", start + i * 1000
        common = {"run_id": run, "agent_id": agent_id, "agent_version": version}
        events += [
            {**common, "event_id": f"{run}:0", "ts": t, "type": "run_start"},
            {**common, "event_id": f"{run}:1", "ts": t + 400, "type": "llm_call", "model": "gpt-4o",
             "provider": "openai", "input_tokens": 500, "output_tokens": 50, "status": "ok", "cost_usd": 0.01},
            {**common, "event_id": f"{run}:2", "ts": t + 800, "type": "run_end",
             "outcome": "success" if rng.random() < success else "failure"},
        ]
    return events
