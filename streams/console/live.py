"""Runs open now, for the console (SPEC §10 `GET /api/v1/runs/live`), from the pipeline, not polled
from the store: the sink's hand-over `trackside.event-batches` (events already validated and
priced), the closed runs on `trackside.run-results`, the alerts on `trackside.alerts`. Inside
`trackside up` the sink hands them over in process (`fed`); a console of its own follows the
topics. At start the runs open in the store are read once."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import orjson
from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

from streams.contracts import topics
from streams.contracts.messages import EVENT_FIELDS, InvalidMessage, EventBatch, decode_run_result, ClosedRuns

log = logging.getLogger(__name__)

_TS, _TYPE, _RUN, _AGENT, _VERSION, _TOOL, _COST, _ID = (
    EVENT_FIELDS.index(name) for name in ("ts", "type", "run_id", "agent_id", "agent_version", "tool", "cost_usd",
                                          "event_id"))
_STEPS = ("llm_call", "tool_call")
_OPENS = ("run_start", "llm_call", "tool_call")
EXPIRE_EVERY_S = 1.0
RECENT_ALERTS = 200

# The runs of the store with events in the last idle timeout and no `runs` row: open at start.
OPEN_IN_STORE = """
WITH (SELECT max(ts) FROM events) AS newest
SELECT run_id, any(agent_id) AS agent_id, any(agent_version) AS agent_version,
       toUnixTimestamp64Milli(min(ts)) AS started_at, toUnixTimestamp64Milli(max(ts)) AS last_ts,
       countIf(type IN ('llm_call', 'tool_call')) AS steps, toFloat64(sum(ifNull(cost_usd, 0))) AS cost_usd,
       argMaxIf(tool, ts, type = 'tool_call') AS last_tool
FROM events FINAL
WHERE ts > newest - toIntervalSecond({idle_seconds:UInt32})
  AND run_id NOT IN (SELECT run_id FROM runs FINAL WHERE ended_at > newest - toIntervalSecond({idle_seconds:UInt32} * 2))
GROUP BY run_id
HAVING countIf(type = 'run_end') = 0
"""


@dataclass(slots=True)
class OpenRun:
    run_id: str
    agent_id: str
    agent_version: str
    started_at: int
    last_ts: int
    steps: int = 0
    cost_usd: float = 0.0
    last_tool: str = ""
    last_tool_ts: int = 0
    loop_suspected: bool = False
    event_ids: set[int] = field(default_factory=set)

    def as_dict(self) -> dict:
        return {"run_id": self.run_id, "agent_id": self.agent_id, "agent_version": self.agent_version,
                "started_at": self.started_at, "steps": self.steps, "cost_usd": self.cost_usd,
                "last_tool": self.last_tool, "loop_suspected": self.loop_suspected, "last_event_at": self.last_ts}


class LiveRuns:
    """The open runs, kept current by a background consumer (its own group, from the topics' end,
    nothing committed), or, `fed`, by the sink of the same process (`events`, `runs_closed`,
    `alerted`: what it hands over, lands and sees, without decoding it again). A run leaves when
    its closed row comes from the assembler, or when it has been quiet for an idle timeout of
    event time (the assembler closes it then too)."""

    def __init__(self, kafka_config: dict, idle_timeout_ms: int,
                 read: Callable[[str, dict], list[dict]] | None = None, max_runs: int = 200_000,
                 session_timeout_ms: int = 6_000, *, fed: bool = False) -> None:
        self.idle_timeout_ms = idle_timeout_ms
        self.max_runs = max_runs
        self.runs: dict[str, OpenRun] = {}
        self.alerts: deque[dict] = deque(maxlen=RECENT_ALERTS)  # the newest alerts seen on the topic, oldest first
        self.alerts_seen = 0  # how many came: a page's stream sends those after the count it last saw
        self.newest_ts = 0
        self.version = 0  # grows with every change: what a page's live stream waits on
        self.changed = threading.Condition()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # a group of its own (the topics' partitions, rebalanced if they change), joined quickly: a
        # join waits half the session timeout. From the end: what was before is read from the store.
        self._consumer = None if fed else Consumer({**kafka_config, "group.id": f"trackside-console-{uuid.uuid4().hex}",
                                   "enable.auto.commit": False, "auto.offset.reset": "latest",
                                   "session.timeout.ms": session_timeout_ms,
                                   "heartbeat.interval.ms": max(500, session_timeout_ms // 6),
                                   "fetch.wait.max.ms": 50, "client.id": "trackside-console"})
        self._read = read
        self._expired_at = 0.0
        self._thread = threading.Thread(target=self._follow, name="console-live-runs", daemon=True)
        # assigned its partitions and placed at their ends: what is produced from now on is seen
        self.listening = threading.Event()

    def start(self) -> None:
        if self._read is not None:
            try:
                self._seed(self._read(OPEN_IN_STORE, {"idle_seconds": self.idle_timeout_ms // 1000}))
            except Exception as error:  # noqa: BLE001 (the live view starts empty rather than not at all)
                log.warning("the console could not read the open runs from the store: %s", error)
        if self._consumer is None:
            self.listening.set()  # the sink hands over what it sees from now on
            return
        self._consumer.subscribe([topics.EVENT_BATCHES.name, topics.RUN_RESULTS.name, topics.ALERTS.name],
                                 on_assign=self._at_the_end)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        if self._consumer is not None:
            self._consumer.close()

    def snapshot(self, agent_id: str = "") -> list[dict]:
        """The open runs, newest first."""
        with self._lock:
            runs = [run.as_dict() for run in self.runs.values() if not agent_id or run.agent_id == agent_id]
        runs.sort(key=lambda run: (-run["started_at"], run["run_id"]))
        return runs

    def get(self, run_id: str) -> dict | None:
        with self._lock:
            run = self.runs.get(run_id)
            return None if run is None else run.as_dict()

    # -- following the topics

    def _seed(self, rows: list[dict]) -> None:
        with self._lock:
            for row in rows:
                self.runs[row["run_id"]] = OpenRun(row["run_id"], row["agent_id"], row["agent_version"],
                                                   int(row["started_at"]), int(row["last_ts"]), int(row["steps"]),
                                                   float(row["cost_usd"]), row["last_tool"])
                self.newest_ts = max(self.newest_ts, int(row["last_ts"]))

    def _follow(self) -> None:
        while not self._stop.is_set():
            messages = self._consumer.consume(1000, 0.2)
            changed = False
            for message in messages:
                if message.error() is not None:
                    if message.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("the console's live view: %s", message.error())
                    continue
                try:
                    changed |= self._handle(message.topic(), message.value())
                except (InvalidMessage, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                    log.warning("the console's live view skipped a message of %s: %s", message.topic(), error)
            if changed:
                self._changed()

    def _changed(self) -> None:
        """Wake the pages' live streams (and now and then forget the runs gone quiet)."""
        if time.monotonic() - self._expired_at >= EXPIRE_EVERY_S:
            self._expire()
            self._expired_at = time.monotonic()
        with self.changed:
            self.version += 1
            self.changed.notify_all()

    # -- fed by the sink of the same process (streams.ingest.sink.SinkObserver)

    def events(self, packed: list) -> None:
        """Events handed over to the assemblers (`EventBatch.events` rows)."""
        if packed:
            self.apply(packed)
            self._changed()

    def runs_closed(self, run_ids: list[str]) -> None:
        if run_ids:
            self.close(run_ids)
            self._changed()

    def alerted(self, alerts: list[dict]) -> None:
        if alerts:
            for alert in alerts:
                self._alert(alert)
            self._changed()

    def _at_the_end(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Start each assigned partition at its end, resolved here and now: with "latest" left to
        the client the end is asked for after the assignment, and what was produced in between
        would not be seen. An end reported short (the embedded broker's can be) re-reads a few
        recent messages, which the live view takes twice harmlessly (event ids, closed runs)."""
        for tp in partitions:
            try:
                tp.offset = consumer.get_watermark_offsets(tp, timeout=5)[1]
            except KafkaException:
                tp.offset = OFFSET_END
        consumer.assign(partitions)
        self.listening.set()

    def _handle(self, topic: str, value: bytes) -> bool:
        if topic == topics.EVENT_BATCHES.name:
            self.apply(EventBatch.decode(value).events)
            return True
        if topic == topics.RUN_RESULTS.name:
            result = decode_run_result(value)
            if isinstance(result, ClosedRuns) and result.runs:
                self.close([row["run_id"] for row in result.runs])
                return True
            return False
        alert = orjson.loads(value)
        if not isinstance(alert, dict) or "alert_id" not in alert:
            return False  # not an alert: the sink dead-letters it
        self._alert(alert)
        return True

    def _alert(self, alert: dict) -> None:
        with self._lock:
            self.alerts.append(alert)
            self.alerts_seen += 1
        if alert.get("kind") == "loop" and alert.get("status") == "firing":
            with self._lock:
                run = self.runs.get(alert.get("run_id", ""))
                if run is not None:
                    run.loop_suspected = True

    def recent_alerts(self, after: int) -> tuple[list[dict], int]:
        """The alerts seen since the count `after` (as many as are kept), and the count now."""
        with self._lock:
            new = min(self.alerts_seen - after, len(self.alerts))
            return (list(self.alerts)[len(self.alerts) - new:] if new > 0 else []), self.alerts_seen

    def apply(self, events: list[list]) -> None:
        """Fold packed events (`EventBatch.events`) in."""
        with self._lock:
            runs = self.runs
            for event in events:
                run = runs.get(event[_RUN])
                ts = event[_TS]
                if run is None:
                    # a run starts with a step; an end, feedback or the like of a closed run does not reopen it
                    if event[_TYPE] not in _OPENS or len(runs) >= self.max_runs:
                        continue
                    run = runs[event[_RUN]] = OpenRun(event[_RUN], event[_AGENT], event[_VERSION], ts, ts)
                key = hash(event[_ID])
                if key in run.event_ids:
                    continue
                run.event_ids.add(key)
                run.started_at, run.last_ts = min(run.started_at, ts), max(run.last_ts, ts)
                kind = event[_TYPE]
                if kind in _STEPS:
                    run.steps += 1
                    if kind == "tool_call" and ts >= run.last_tool_ts:
                        run.last_tool, run.last_tool_ts = event[_TOOL], ts
                run.cost_usd += event[_COST] or 0.0
                if ts > self.newest_ts:
                    self.newest_ts = ts

    def close(self, run_ids: list[str]) -> None:
        with self._lock:
            for run_id in run_ids:
                self.runs.pop(run_id, None)

    def _expire(self) -> None:
        """Forget runs quiet for an idle timeout of event time: the assembler has closed them."""
        horizon = self.newest_ts - self.idle_timeout_ms
        with self._lock:
            for run_id in [run_id for run_id, run in self.runs.items() if run.last_ts < horizon]:
                del self.runs[run_id]
