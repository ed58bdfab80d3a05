"""`trackside publish`: JSON Lines agent events -> `agent.events`, keyed by run_id.

Every non-blank line is sent as it is: validating is the pipeline's job, and a malformed
line must reach the dead-letter topic and table with its reason, not vanish here. A line is
counted as rejected when the broker does not take it (too large, broker error).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer
from rich.progress import BarColumn, Progress, TextColumn, TransferSpeedColumn

from streams.contracts import topics
from streams.ops.broker import wait_for_broker
from streams.ingest.sink import producer_config
from streams.settings import Settings


@dataclass
class PublishReport:
    produced: int = 0
    rejected: int = 0
    errors: list[str] = field(default_factory=list)


def _field_key(line: bytes, name: str) -> bytes | None:
    """A string field of a JSON line, as the message key; None when the line has none."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    field_value = value.get(name) if isinstance(value, dict) else None
    return field_value.encode() if isinstance(field_value, str) else None


def run_key(line: bytes) -> bytes | None:
    """The run_id of an agent event line: its key on agent.events."""
    return _field_key(line, "run_id")


def agent_key(line: bytes) -> bytes | None:
    """The agent_id of a deployment line: its key on agent.deployments."""
    return _field_key(line, "agent_id")


def publish_lines(settings: Settings, lines: Iterable[bytes], *, on_line=None,
                  topic: str = topics.AGENT_EVENTS.name, key=run_key) -> PublishReport:  # noqa: ANN001
    """Produce each non-blank line to `topic` (agent events keyed by run_id unless told
    otherwise); returns the counts once every delivery is confirmed."""
    wait_for_broker(settings, timeout=10)
    report = PublishReport()
    producer = Producer({**producer_config(settings), "linger.ms": 20, "log_level": 4})

    def delivered(error: KafkaError | None, message) -> None:
        if error is None:
            report.produced += 1
        else:
            report.rejected += 1
            report.errors.append(f"{message.key()!r}: {error.str()}")

    for number, line in enumerate(lines, 1):
        if on_line is not None:
            on_line(len(line))
        line = line.strip()
        if not line:
            continue
        while True:
            try:
                producer.produce(topic, value=line, key=key(line), on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.1)
            except KafkaException as error:
                report.rejected += 1
                report.errors.append(f"line {number}: {error.args[0].str()}")
                break
        producer.poll(0)
    remaining = producer.flush(60)
    producer.close()  # now, not when collected: by then the broker may be gone
    if remaining:
        report.rejected += remaining
        report.errors.append(f"{remaining} messages not confirmed by the broker within 60 s")
    return report


def publish_file(settings: Settings, path: str, *, progress: bool = True, deployments: bool = False) -> PublishReport:
    """Publish a JSON Lines file (or `-` for standard input) with a progress bar; agent
    events, or deployment events to `agent.deployments` keyed by agent_id."""
    where = {"topic": topics.AGENT_DEPLOYMENTS.name, "key": agent_key} if deployments else {}
    if path == "-":
        return publish_lines(settings, _lines(sys.stdin.buffer), **where)
    size = Path(path).stat().st_size
    with open(path, "rb") as handle, Progress(
        TextColumn("publishing"), BarColumn(), TransferSpeedColumn(), disable=not progress, transient=True,
    ) as bar:
        task = bar.add_task("publish", total=size)
        return publish_lines(settings, _lines(handle), on_line=lambda n: bar.advance(task, n), **where)


def _lines(handle: BinaryIO) -> Iterable[bytes]:
    yield from handle
