"""The agent client: what a Python agent imports to send its runs (SPEC §4) and obey controls
(SPEC §9). Needs confluent-kafka and the standard library only. Guide: README.md, "Agent client"."""

from __future__ import annotations

import atexit
import json
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

EVENTS_TOPIC = "agent.events"
CONTROLS_TOPIC = "trackside.controls"
STOPS_KEPT = 100_000  # stop_run controls remembered (the newest), for runs that may still be going


class RunStopped(Exception):
    """A `stop_run` control for this run has arrived: stop it now. `reason` says why."""

    def __init__(self, run_id: str, reason: str) -> None:
        super().__init__(f"run {run_id} was stopped: {reason}")
        self.run_id, self.reason = run_id, reason


class VersionPaused(Exception):
    """This agent version is paused (a `pause_version` control): start no new run of it."""

    def __init__(self, agent_id: str, agent_version: str, reason: str) -> None:
        super().__init__(f"{agent_id} {agent_version} is paused: {reason}")
        self.reason = reason


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Trackside:
    """One per agent process. Events are produced without blocking the agent (librdkafka batches
    and sends them from its own threads; a full buffer while the broker is away drops the event
    and counts it in `dropped`); `close` (also at interpreter exit) flushes. A background
    consumer of `trackside.controls` reads the pauses in force from the topic's start, then
    follows it: `Run.check()` raises `RunStopped` once a stop for the run has come, and
    `start_run` of a paused version raises `VersionPaused`."""

    def __init__(self, bootstrap_servers: str, agent_id: str, agent_version: str, *, environment: str = "",
                 tenant: str = "", buffer_messages: int = 100_000, config: dict | None = None) -> None:
        self.agent_id, self.agent_version = agent_id, agent_version
        self.environment, self.tenant = environment, tenant
        self.dropped = 0  # events not sent: the buffer was full (the broker away for long)
        self.failed = 0  # events the broker refused
        common = {"bootstrap.servers": bootstrap_servers, **(config or {})}
        self._producer = Producer({**common, "linger.ms": 20, "queue.buffering.max.messages": buffer_messages,
                                   "message.timeout.ms": 300_000})
        self._consumer = Consumer({**common, "group.id": f"trackside-client-{uuid.uuid4().hex}",
                                   "enable.auto.commit": False, "enable.partition.eof": True})
        self._stops: OrderedDict[str, str] = OrderedDict()  # run_id -> reason
        self._paused: dict[tuple[str, str], str] = {}  # (agent, version) -> reason
        self._caught_up = threading.Event()  # the pauses in force are known
        self._closing = threading.Event()
        self._threads = [threading.Thread(target=self._send, name="trackside-send", daemon=True),
                         threading.Thread(target=self._follow, name="trackside-controls", daemon=True)]
        for thread in self._threads:
            thread.start()
        atexit.register(self._producer.flush, 10)  # what is still buffered goes out at exit

    # -- runs

    def start_run(self, run_id: str | None = None, *, task_id: str = "", session_id: str = "",
                  wait_s: float = 5.0, **attributes: Any) -> "Run":
        """A new run (a `run_start` event). Raises VersionPaused when the version is paused;
        waits up to `wait_s` for the pauses in force to be known (then starts anyway)."""
        self._caught_up.wait(wait_s)
        reason = self._paused.get((self.agent_id, self.agent_version))
        if reason is not None:
            raise VersionPaused(self.agent_id, self.agent_version, reason)
        run = Run(self, run_id or uuid.uuid4().hex, task_id, session_id)
        run._emit("run_start", attributes=attributes or None)
        return run

    @contextmanager
    def run(self, run_id: str | None = None, **options: Any) -> Iterator["Run"]:
        """A run that ends with the block: `success`, `aborted` when stopped, `failure` on an error."""
        current = self.start_run(run_id, **options)
        try:
            yield current
        except RunStopped as stopped:
            current.end("aborted", error_type="RunStopped", error_message=stopped.reason)
            raise
        except BaseException as error:
            current.end("failure", error_type=type(error).__name__, error_message=str(error)[:2000])
            raise
        else:
            if not current.ended:
                current.end("success")

    def stopped(self, run_id: str) -> str | None:
        """Why the run was stopped, or None."""
        return self._stops.get(run_id)

    def close(self, timeout: float = 10.0) -> None:
        self._closing.set()
        self._producer.flush(timeout)
        atexit.unregister(self._producer.flush)  # so the producer goes with the client, its connections too
        for thread in self._threads:
            thread.join(timeout)
        self._consumer.close()

    # -- the background

    def _produce(self, event: dict) -> None:
        try:
            self._producer.produce(EVENTS_TOPIC, json.dumps(event, separators=(",", ":")).encode(),
                                   key=event["run_id"].encode(), on_delivery=self._delivered)
        except BufferError:
            self.dropped += 1

    def _delivered(self, error, _message) -> None:  # noqa: ANN001 (librdkafka's callback)
        if error is not None:
            self.failed += 1

    def _send(self) -> None:
        while not self._closing.is_set():
            self._producer.poll(0.1)  # delivery reports; librdkafka sends on its own threads

    def _follow(self) -> None:
        try:
            metadata = self._consumer.list_topics(CONTROLS_TOPIC, timeout=10)
            partitions = list(metadata.topics[CONTROLS_TOPIC].partitions)
        except Exception:  # noqa: BLE001 - no broker, no topic: no controls known; the agent runs on
            self._caught_up.set()
            return
        self._consumer.assign([TopicPartition(CONTROLS_TOPIC, p, OFFSET_BEGINNING) for p in partitions])
        at_end: set[int] = set()
        while not self._closing.is_set():
            for message in self._consumer.consume(500, 0.05):
                if message.error() is not None:
                    if message.error().code() == KafkaError._PARTITION_EOF:
                        at_end.add(message.partition())
                        if len(at_end) == len(partitions):
                            self._caught_up.set()
                    continue
                self._obey(message.value())

    def _obey(self, value: bytes | None) -> None:
        try:
            control = json.loads(value or b"")
            action = control["action"]
        except (ValueError, KeyError, TypeError):
            return  # not a control: Trackside dead-letters it
        if action == "stop_run":
            self._stops[control.get("run_id", "")] = control.get("reason", "")
            while len(self._stops) > STOPS_KEPT:
                self._stops.popitem(last=False)
        elif action in ("pause_version", "resume_version"):
            version = (control.get("agent_id", ""), control.get("agent_version", ""))
            if action == "pause_version":
                self._paused[version] = control.get("reason", "")
            else:
                self._paused.pop(version, None)


class Run:
    """One run of the agent: record its calls (and its guardrail hits, approvals and feedback),
    `check()` before each step, `end()` it."""

    def __init__(self, client: Trackside, run_id: str, task_id: str, session_id: str) -> None:
        self.client, self.run_id, self.task_id, self.session_id = client, run_id, task_id, session_id
        self.ended = False

    def check(self) -> None:
        """Raises RunStopped once a `stop_run` control for this run has arrived."""
        reason = self.client.stopped(self.run_id)
        if reason is not None:
            raise RunStopped(self.run_id, reason)

    def llm_call(self, *, model: str = "", provider: str = "", input_tokens: int = 0, output_tokens: int = 0,
                 latency_ms: float = 0.0, status: str = "ok", **fields: Any) -> None:
        self._emit("llm_call", model=model, provider=provider, input_tokens=input_tokens,
                   output_tokens=output_tokens, latency_ms=latency_ms, status=status, **fields)

    def tool_call(self, tool: str, *, args: dict | None = None, status: str = "ok", latency_ms: float = 0.0,
                  **fields: Any) -> None:
        if args is not None:
            fields["args"] = args
        self._emit("tool_call", tool=tool, status=status, latency_ms=latency_ms, **fields)

    def policy_hit(self, policy: str, decision: str, *, tool: str = "", **fields: Any) -> None:
        """A guardrail fired: `decision` is blocked, warned, redacted or allowed."""
        self._emit("policy_hit", policy=policy, decision=decision, tool=tool, **fields)

    def approval(self, status: str, *, action: str = "", approver: str = "", wait_ms: float | None = None,
                 **fields: Any) -> None:
        """A human gate: `requested`, then `granted`, `denied` or `expired` (with the wait)."""
        self._emit("approval", status=status, action=action, approver=approver, wait_ms=wait_ms, **fields)

    def feedback(self, score: float, *, label: str = "", source: str = "", **fields: Any) -> None:
        """A live evaluation of the run, 0..1 (it may come after `end`, within a minute or so)."""
        self._emit("feedback", score=score, label=label, source=source, **fields)

    def end(self, outcome: str = "success", **fields: Any) -> None:
        if not self.ended:
            self.ended = True
            self._emit("run_end", outcome=outcome, **fields)

    def _emit(self, kind: str, **fields: Any) -> None:
        client = self.client
        event = {"event_id": uuid.uuid4().hex, "ts": _now_ms(), "type": kind, "run_id": self.run_id,
                 "agent_id": client.agent_id, "agent_version": client.agent_version}
        for name, value in (("task_id", self.task_id), ("session_id", self.session_id),
                            ("environment", client.environment), ("tenant", client.tenant)):
            if value:
                event[name] = value
        event.update({name: value for name, value in fields.items() if value not in ("", None)})
        client._produce(event)
