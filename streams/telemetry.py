"""Prometheus metrics of every Trackside process, served by one `/metrics` endpoint.
Multiprocess mode, lazy creation and what counters count: streams/ops/README.md, "Metrics"."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    values,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.exposition import start_http_server

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"

_SIZE_BUCKETS = (1, 5, 10, 50, 100, 500, 1000, 2000, 5000, 10000, 20000, 50000)
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_DELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

# name -> (class, help, options). The attribute name is the Python name; the metric name
# is the first element of options["name"].
_DEFINITIONS: dict[str, tuple[type, str, str, dict[str, Any]]] = {
    # Ingest and store sink (thread of `trackside up`, streams/ingest/sink.py).
    "EVENTS_INGESTED": (Counter, "trackside_events_ingested",
                        "Valid agent events landed in the events table", {}),
    "DEAD_LETTERS": (Counter, "trackside_dead_letters",
                     "Messages sent to the dead-letter table and topic, by the topic they came from",
                     {"labelnames": ("source_topic",)}),
    "SINK_BATCH_MESSAGES": (Histogram, "trackside_sink_batch_messages",
                            "Messages per poll of the store sink", {"buckets": _SIZE_BUCKETS}),
    "SINK_BATCH_SECONDS": (Histogram, "trackside_sink_batch_seconds",
                           "Wall time to handle one poll of the store sink: validate, land, produce, commit",
                           {"buckets": _SECONDS_BUCKETS}),
    "SINK_INFLIGHT_MESSAGES": (Gauge, "trackside_sink_inflight_messages",
                               "Messages the store sink has polled and not yet committed (its backlog in hand)",
                               {"multiprocess_mode": "livesum"}),
    "SINK_LAST_COMMIT": (Gauge, "trackside_sink_last_commit_timestamp_seconds",
                         "Wall time of the store sink's last successful offset commit",
                         {"multiprocess_mode": "livemax"}),
    "SINK_COMMIT_FAILURES": (Counter, "trackside_sink_commit_failures",
                             "Offset commits of the store sink that failed (the batch is redelivered)", {}),
    "INGEST_DELAY_SECONDS": (Histogram, "trackside_ingest_delay_seconds",
                             ("Per polled batch and topic: landed wall time minus the Kafka timestamp of its "
                              "oldest message (publish to landed; not event time, which may be anything)"),
                             {"labelnames": ("topic",), "buckets": _DELAY_BUCKETS}),
    "STORE_INSERT_SECONDS": (Histogram, "trackside_store_insert_seconds",
                             "Duration of one successful insert into the store, by table",
                             {"labelnames": ("table",), "buckets": _SECONDS_BUCKETS}),
    "STORE_ROWS": (Counter, "trackside_store_rows", "Rows inserted into the store, by table",
                   {"labelnames": ("table",)}),
    "STORE_RETRIES": (Counter, "trackside_store_retries",
                      "Inserts the store refused and that are retried, by table", {"labelnames": ("table",)}),
    "STORE_RETRYING": (Gauge, "trackside_store_retrying",
                       "1 while the store refuses writes and the sink is retrying, else 0",
                       {"multiprocess_mode": "livemax"}),
    "BROKER_RESIDENT_BYTES": (Gauge, "trackside_broker_resident_bytes",
                              "Resident memory of the embedded broker (it keeps every message in memory)",
                              {"multiprocess_mode": "livemax"}),
    "BROKER_RECYCLES": (Counter, "trackside_broker_recycles",
                        "Times the embedded broker was drained and started afresh past TRACKSIDE_BROKER_MEMORY_BYTES", {}),
    "STAGE_LAG_SECONDS": (Gauge, "trackside_stage_lag_seconds",
                          ("Per processor stage: age of the oldest message handed to it that it has not processed "
                           "(0 when caught up), as the store sink sees it"),
                          {"labelnames": ("stage",), "multiprocess_mode": "livemax"}),
    "STAGE_LAST_MESSAGE_AGE_SECONDS": (Gauge, "trackside_stage_last_message_age_seconds",
                                       "Per processor stage: age of the newest input message it has processed",
                                       {"labelnames": ("stage",), "multiprocess_mode": "livemax"}),
    "HANDOVER_FAILURES": (Counter, "trackside_handover_failures",
                          ("Messages of the store sink (event batches, deployments, dead letters) the broker or "
                           "the producer refused; they are produced again and no offset moves past them"),
                          {"labelnames": ("topic",)}),
    "HANDOVER_RETRYING": (Gauge, "trackside_handover_retrying",
                          "1 while the broker refuses messages of the store sink and it retries, else 0",
                          {"multiprocess_mode": "livemax"}),
    # Processors (faust workers, streams/processors/app.py).
    "ALERTS": (Counter, "trackside_alerts", "Alerts produced to trackside.alerts, by kind and status",
               {"labelnames": ("kind", "status")}),
    "ROLLBACKS": (Counter, "trackside_rollbacks", "Rollback decisions produced to trackside.rollbacks", {}),
    "RUNS_CLOSED": (Counter, "trackside_runs_closed", "Runs closed by the run assembler, by outcome",
                    {"labelnames": ("outcome",)}),
    "PROCESSOR_MESSAGE_SECONDS": (Histogram, "trackside_processor_message_seconds",
                                  "Wall time a faust agent takes for one batch message, by agent",
                                  {"labelnames": ("agent",), "buckets": _SECONDS_BUCKETS}),
    "STAGE_FAILURES": (Counter, "trackside_stage_failures",
                       "Messages whose handling raised in a processor stage and went to the dead letters, by stage",
                       {"labelnames": ("stage",)}),
    "STATE_REBUILD_SECONDS": (Histogram, "trackside_state_rebuild_seconds",
                              "Wall time to rebuild a partition's state from the store when a worker takes it",
                              {"labelnames": ("stage",), "buckets": _SECONDS_BUCKETS}),
    # Alert forwarder (streams/ops/forward.py).
    "FORWARDER_DELIVERIES": (Counter, "trackside_forwarder_deliveries",
                             "Alerts handed to a target, by target and result (delivered, rejected)",
                             {"labelnames": ("target", "result")}),
    "FORWARDER_RETRIES": (Counter, "trackside_forwarder_retries",
                          "Requests a target refused (connection error, 5xx, 429) and that are retried",
                          {"labelnames": ("target",)}),
    "FORWARDER_RETRYING": (Gauge, "trackside_forwarder_retrying",
                           "1 while a target refuses and the forwarder backs off, else 0",
                           {"labelnames": ("target",), "multiprocess_mode": "livemax"}),
    "FORWARDER_REQUEST_SECONDS": (Histogram, "trackside_forwarder_request_seconds",
                                  "Duration of one HTTP request to a target, whatever its answer",
                                  {"labelnames": ("target",), "buckets": _SECONDS_BUCKETS}),
    "FORWARDER_INVALID": (Counter, "trackside_forwarder_invalid",
                          "Messages of trackside.alerts that are not alerts, skipped", {}),
    "FORWARDER_ACTIVE_ALERTS": (Gauge, "trackside_forwarder_active_alerts",
                                "Firing alerts the forwarder keeps alive in Alertmanager by re-sending them",
                                {"multiprocess_mode": "livemax"}),
}

_lock = threading.Lock()
_created: dict[str, Any] = {}
_created_multiprocess: bool | None = None


def _create() -> dict[str, Any]:
    """Create every metric once, in the mode the environment says now."""
    global _created_multiprocess
    with _lock:
        if _created:
            return _created
        multiprocess = bool(os.environ.get(ENV))
        if multiprocess and not getattr(values.ValueClass, "_multiprocess", False):
            # prometheus_client was imported before the variable was set: pick again.
            values.ValueClass = values.get_value_class()
        for attribute, (kind, name, documentation, options) in _DEFINITIONS.items():
            _created[attribute] = kind(name, documentation, registry=REGISTRY, **options)
        _created_multiprocess = multiprocess
        # Later look-ups find the module attributes directly, without __getattr__.
        globals().update(_created)
        return _created


def __getattr__(name: str) -> Any:  # PEP 562: the metrics come into being on first use
    if name in _DEFINITIONS:
        return _create()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prepare_multiproc_dir(path: str | os.PathLike) -> Path:
    """Empty (or create) the multiprocess directory and set PROMETHEUS_MULTIPROC_DIR.

    Call it in the parent before any metric is used and before starting the children,
    which must inherit `os.environ`. Only `*.db` files are removed.
    """
    directory = Path(path).resolve()
    if _created_multiprocess is False:
        raise RuntimeError(
            "the Trackside metrics were already created in single-process mode; "
            "call prepare_multiproc_dir before any metric is used"
        )
    if _created_multiprocess and os.environ.get(ENV) != str(directory):
        raise RuntimeError(f"the metrics already write to {os.environ.get(ENV)}, not {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    if not _created_multiprocess:
        for stale in directory.glob("*.db"):
            stale.unlink(missing_ok=True)
    os.environ[ENV] = str(directory)
    return directory


def mark_process_dead(pid: int, multiproc_dir: str | os.PathLike | None = None) -> None:
    """Forget the live gauges of a child that exited (call before restarting it)."""
    path = multiproc_dir if multiproc_dir is not None else os.environ.get(ENV)
    if path:
        _multiprocess.mark_process_dead(pid, str(path))


class MetricsServer:
    """The running `/metrics` endpoint; `stop()` ends it."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host, self.port = server.server_address[:2]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_metrics_server(
    port: int, multiproc_dir: str | os.PathLike | None = None, host: str = "127.0.0.1"
) -> MetricsServer:
    """Serve `/metrics` on host:port (port 0: any free port) in a daemon thread.

    With `multiproc_dir`, the endpoint sums the files of every process writing there
    (multiprocess mode); without it, this process's metrics. Raises OSError when the port
    is taken: the caller decides whether that is fatal.
    """
    if multiproc_dir is not None:
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry, path=str(multiproc_dir))
    else:
        _create()
        registry = REGISTRY
    server, thread = start_http_server(port, addr=host, registry=registry)
    running = MetricsServer(server, thread)
    log.info("metrics at %s", running.url)
    return running
