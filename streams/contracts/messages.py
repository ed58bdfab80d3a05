"""The messages Trackside's stages send each other over its internal topics, defined once.
Each is JSON (orjson) and carries a batch: faust pays per message, so no message holds one event."""

from __future__ import annotations

import base64
import operator
from dataclasses import dataclass, field

import orjson

from streams.contracts.tables import EVENTS

# The fields of a normalised event the assembler reads; the ingest stage sends only these,
# as positional rows (`pack`), which cost a third of dicts to encode and decode.
EVENT_FIELDS = (
    "event_id", "ts", "type", "run_id", "agent_id", "agent_version", "task_id", "session_id",
    "tenant", "environment", "input_tokens", "output_tokens", "cache_read_input_tokens",
    "status", "error_type", "error_message", "tool", "args_hash", "outcome", "score",
    "cost_usd", "cost_source", "policy", "decision", "wait_ms",
)


pack = operator.itemgetter(*EVENT_FIELDS)  # of a normalised event (a dict)
pack_row = operator.itemgetter(*(EVENTS.names.index(name) for name in EVENT_FIELDS))  # of an `events` row


class InvalidMessage(ValueError):
    """An internal message that does not have the shape of its topic."""


class _Message:
    __slots__ = ()
    # Fields whose value only the last part of a split message carries (`encode_split`).
    _LAST_PART_ONLY: dict = {}

    def encode(self) -> bytes:
        return orjson.dumps({name: getattr(self, name) for name in self.__slots__})

    def encode_split(self, max_bytes: int) -> list[bytes]:
        """The message in as many as keep each within `max_bytes`: its lists cut between rows,
        every part with the other fields (but `_LAST_PART_ONLY`'s values in all parts but the
        last); a row larger than that travels alone. Mostly one part."""
        whole = self.encode()
        if len(whole) <= max_bytes:
            return [whole]
        fields = {name: getattr(self, name) for name in self.__slots__}
        lists = [name for name, value in fields.items() if isinstance(value, list)]
        scalars = {name: value for name, value in fields.items() if name not in lists}
        overhead = len(self._assemble(scalars, {name: [] for name in lists}))
        parts: list[dict[str, list[bytes]]] = [{name: [] for name in lists}]
        size = overhead
        for name in lists:
            for row in fields[name]:
                item = orjson.dumps(row)
                if size > overhead and size + len(item) + 1 > max_bytes:
                    parts.append({key: [] for key in lists})
                    size = overhead
                parts[-1][name].append(item)
                size += len(item) + 1
        early = {**scalars, **self._LAST_PART_ONLY}
        return [self._assemble(early if index < len(parts) - 1 else scalars, part)
                for index, part in enumerate(parts)]

    @staticmethod
    def _assemble(scalars: dict, lists: dict[str, list[bytes]]) -> bytes:
        encoded = [orjson.dumps(scalars)[1:-1]] if scalars else []
        encoded += [b'"%s":[%s]' % (name.encode(), b",".join(items)) for name, items in lists.items()]
        return b"{" + b",".join(encoded) + b"}"


@dataclass(slots=True)
class EventBatch(_Message):
    """`trackside.event-batches`, ingest -> assembler: valid events of one `agent.events`
    partition (or OTLP runs routed to it), packed, sent to the same partition number."""

    partition: int
    events: list[list]

    @classmethod
    def decode(cls, value: bytes) -> EventBatch:
        raw = _object(value)
        try:
            return cls(int(raw["partition"]), list(raw["events"]))
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidMessage(f"not an event batch: {error!r}") from None


@dataclass(slots=True)
class ClosedRuns(_Message):
    """`trackside.run-results`, assembler -> metrics stage (and the sink, which lands `runs`):
    the runs of one assembler partition that closed, for the partition of their agent, with
    the assembler's watermark; sent at least once a second to every partition while events
    flow, so windows can close. `processed_ts`: Kafka timestamp (ms) of the newest event
    batch the assembler had handled, which the pipeline watch compares with what was sent."""

    partition: int
    watermark: int
    runs: list[dict]
    processed_ts: int = 0

    # the watermark moves on with the last part only, once every run of the batch is in
    _LAST_PART_ONLY = {"watermark": 0}


@dataclass(slots=True)
class Deployments(_Message):
    """`trackside.run-results`, sink -> metrics stage: deployment events (SPEC §5) of the
    agents of the partition they are sent to."""

    deployments: list[dict]


@dataclass(slots=True)
class TenantCosts(_Message):
    """`trackside.run-results`, metrics stage -> the metrics partition that owns a tenant:
    the cost of closed runs, for the tenant's daily budget."""

    tenant_runs: list[dict]


@dataclass(slots=True)
class FailedRuns(_Message):
    """`trackside.run-results`, metrics stage -> the metrics partition that owns a failure mode
    key (`mode_partition`): failed runs (whole `runs` rows, which that partition sends again with
    their mode), and `traffic`, agent -> window start (as text) -> runs closed in it so far where
    they were counted, which the spike test of a mode scales by. Without runs: traffic only."""

    failed_runs: list[dict]
    traffic: dict[str, dict[str, int]] = field(default_factory=dict)


RunResult = ClosedRuns | Deployments | TenantCosts | FailedRuns


def decode_run_result(value: bytes) -> RunResult:
    """One message of `trackside.run-results`, whichever stage wrote it."""
    raw = _object(value)
    try:
        if "deployments" in raw:
            return Deployments(list(raw["deployments"]))
        if "tenant_runs" in raw:
            return TenantCosts(list(raw["tenant_runs"]))
        if "failed_runs" in raw:
            return FailedRuns(list(raw["failed_runs"]), dict(raw.get("traffic") or {}))
        return ClosedRuns(int(raw["partition"]), int(raw["watermark"]), list(raw["runs"]),
                          int(raw.get("processed_ts") or 0))
    except (KeyError, TypeError, ValueError) as error:
        raise InvalidMessage(f"not a run result: {error!r}") from None


# The table each kind of row of a metrics result lands in.
RESULT_TABLES = {
    "metrics": "agent_metrics", "drift": "drift", "failure_clusters": "failure_clusters",
    "failure_cluster_agents": "failure_cluster_agents", "runs": "runs", "canaries": "canaries",
}


@dataclass(slots=True)
class MetricResults(_Message):
    """`trackside.metric-results`, metrics stage -> sink: rows for the tables of
    `RESULT_TABLES`, and the processors' dead letters (`dead_letter`), which the sink lands and
    sends to the DLQ topic like its own. One per input message, even empty: `stage` handled
    its input `partition` up to `processed_ts` (Kafka timestamp, ms), for the pipeline watch."""

    metrics: list[dict] = field(default_factory=list)
    drift: list[dict] = field(default_factory=list)
    failure_clusters: list[dict] = field(default_factory=list)
    failure_cluster_agents: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)
    canaries: list[dict] = field(default_factory=list)
    dead_letters: list[dict] = field(default_factory=list)
    stage: str = "compute_metrics"
    partition: int = 0
    processed_ts: int = 0

    @property
    def has_rows(self) -> bool:
        return any(getattr(self, key) for key in (*RESULT_TABLES, "dead_letters"))

    def rows_by_table(self) -> dict[str, list[dict]]:
        return {table: getattr(self, key) for key, table in RESULT_TABLES.items() if getattr(self, key)}

    @classmethod
    def decode(cls, value: bytes) -> MetricResults:
        raw = _object(value)
        try:
            return cls(**{key: list(raw.get(key) or []) for key in (*RESULT_TABLES, "dead_letters")},
                       stage=str(raw.get("stage") or "compute_metrics"), partition=int(raw.get("partition") or 0),
                       processed_ts=int(raw.get("processed_ts") or 0))
        except (TypeError, ValueError) as error:
            raise InvalidMessage(f"not a metrics result: {error!r}") from None


def dead_letter(topic: str, partition: int, offset: int, key: bytes | None, payload: bytes, error: str,
                received_at: int) -> dict:
    """A dead letter as it travels in a `MetricResults` (bytes as base64); `received_dead_letter`
    turns it back into the sink's row."""
    return {"topic": topic, "partition": partition, "offset": offset, "error": error, "received_at": received_at,
            "key": base64.b64encode(key or b"").decode(), "payload": base64.b64encode(payload).decode()}


def received_dead_letter(row: dict) -> tuple[str, int, int, bytes, bytes, str, int]:
    """(topic, partition, offset, key, payload, error, received_at) of a travelling dead letter."""
    return (str(row["topic"]), int(row["partition"]), int(row["offset"]), base64.b64decode(row["key"]),
            base64.b64decode(row["payload"]), str(row["error"]), int(row["received_at"]))


def _object(value: bytes | None) -> dict:
    try:
        raw = orjson.loads(value or b"")
    except orjson.JSONDecodeError as error:
        raise InvalidMessage(f"not JSON: {error}") from None
    if not isinstance(raw, dict):
        raise InvalidMessage(f"a JSON object expected, got {type(raw).__name__}")
    return raw
