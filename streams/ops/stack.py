"""`trackside up`: the embedded stack (broker, store sink, faust workers) in one foreground process.
Start and stop order, and worker restarts: streams/ops/README.md, "The stack"."""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import threading
import time

from streams import telemetry
from streams.ops.broker import Child, embedded_broker, ensure_topics, port_free, wait_for_broker
from streams.errors import BrokerError, ConfigError, TracksideError
from streams.ops.forward import build_targets, run_forwarders

FORWARDER_SETTINGS = ("alertmanager_url", "alert_webhook_url", "alert_webhook_token")
from streams.ingest.sink import StoreSink
from streams.runtime import tune_gc
from streams.settings import Settings
from streams.store.clickhouse import QueryService, Store, open_store

log = logging.getLogger(__name__)

WORKER_READY = b"[^Worker]: Ready"


class Stack:
    """The running parts of `trackside up`; use as a context manager or call start/stop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.broker: Child | None = None
        self.store: Store | None = None
        self.service: QueryService | None = None
        self.sink: StoreSink | None = None
        self.workers: list[Child] = []
        self._sink_thread: threading.Thread | None = None
        self.metrics: telemetry.MetricsServer | None = None
        self._forwarder_thread: threading.Thread | None = None
        self._forwarder_stop = threading.Event()
        self._lock_file = None
        self._started = False

    # Start.

    def start(self, *, ready_timeout: float = 90.0) -> None:
        settings = self.settings
        settings.policy()  # a bad policy file stops here, not in every worker
        settings.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        # Before any metric is used here and before the workers start (they inherit it).
        metrics_dir = self._prepare_metrics() if settings.metrics_port else None
        targets = build_targets(settings)  # a bad URL stops here
        if settings.embedded:
            if not port_free(settings.embedded_port):
                raise BrokerError(
                    f"port {settings.embedded_port} is taken by another program; "
                    "set TRACKSIDE_EMBEDDED_PORT to a free port"
                )
            self.broker = embedded_broker(settings)
            self.broker.start()
        wait_for_broker(settings)
        created = ensure_topics(settings)
        if created:
            log.info("created topics: %s", ", ".join(created))

        self.store = open_store(settings)
        applied = self.store.migrate()
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        if self.store.embedded:
            self.service = QueryService(self.store, settings.run_dir)
            self.service.start()

        tune_gc()
        self.sink = StoreSink(settings, self.store,
                              broker_pid=self.broker.process.pid if self.broker is not None else None)
        self._sink_thread = threading.Thread(target=self._run_sink, name="store-sink", daemon=True)
        self._sink_thread.start()
        if targets:
            self._forwarder_thread = threading.Thread(target=self._run_forwarder, name="alert-forwarder", daemon=True)
            self._forwarder_thread.start()
        if settings.metrics_port:
            try:
                self.metrics = telemetry.start_metrics_server(settings.metrics_port, metrics_dir, settings.metrics_host)
            except OSError as error:  # e.g. a second stack on this machine: it runs, without /metrics
                log.warning("no /metrics: cannot listen on %s:%d (%s); set TRACKSIDE_METRICS_PORT",
                            settings.metrics_host, settings.metrics_port, error)

        self.workers = [self._worker(index) for index in range(settings.workers)]
        for worker in self.workers:
            worker.start()
        self._wait_ready(ready_timeout)
        if self.broker is not None:
            self.sink.wake_assemblers()  # the fresh broker redelivers nothing: runs come back from the store
        self._started = True

    def _lock(self) -> None:
        # flock is released by the kernel when the holder dies, even by kill -9: no stale locks.
        self._lock_file = open(self.settings.run_dir / "up.lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another `trackside up` is running on {self.settings.data_dir}; "
                "stop it or set TRACKSIDE_DATA_DIR"
            ) from None

    def _worker(self, index: int) -> Child:
        command = [sys.executable, "-m", "streams", "worker", "--without-web", "--loglevel", "info"]
        # The workers see exactly this stack's settings, however they were made (the demo
        # changes the data dir and port of the environment's).
        # the forwarder runs here, not in the workers: its credentials stay in this process
        env = {**os.environ, **self.settings.to_env(exclude=FORWARDER_SETTINGS), "PYTHONUNBUFFERED": "1"}
        for name in FORWARDER_SETTINGS:
            env.pop(f"TRACKSIDE_{name.upper()}", None)
        return Child(f"worker-{index}", command, self.settings.run_dir, self.settings.data_dir / "logs", env)

    def _prepare_metrics(self):  # noqa: ANN202
        try:
            return telemetry.prepare_multiproc_dir(self.settings.run_dir / "metrics")
        except RuntimeError as error:  # metrics already used in this process (a second Stack)
            log.warning("/metrics shows this process only: %s", error)
            return None

    def _run_forwarder(self) -> None:
        run_forwarders(self.settings, self._forwarder_stop)

    def _run_sink(self) -> None:
        try:
            self.sink.run()
        except Exception:
            log.exception("the store sink stopped")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        offsets = {worker.name: worker.log_file.stat().st_size for worker in self.workers}
        pending = set(offsets)
        while pending or not self.sink.assigned.is_set():
            for worker in self.workers:
                if worker.name in pending:
                    with open(worker.log_file, "rb") as log_file:
                        log_file.seek(offsets[worker.name])
                        if WORKER_READY in log_file.read():
                            pending.discard(worker.name)
                if not worker.alive:
                    raise TracksideError(f"{worker.name} exited at start; see {worker.log_file}")
            if not self._sink_thread.is_alive():
                raise TracksideError("the store sink exited at start; see the log above")
            if time.monotonic() > deadline:
                raise TracksideError(f"not ready after {timeout:.0f} s (waiting for: {', '.join(sorted(pending)) or 'sink'})")
            time.sleep(0.1)

    @property
    def ready_line(self) -> str:
        return f"trackside ready bootstrap={self.settings.bootstrap_servers} store={self.settings.store_url_redacted}"

    # Run.

    def supervise(self, stop: threading.Event) -> None:
        """Keep the workers alive until `stop` is set."""
        while not stop.wait(1.0):
            for worker in self.workers:
                if not worker.alive:
                    log.warning("%s exited with code %s; restarting it", worker.name, worker.process.returncode)
                    telemetry.mark_process_dead(worker.process.pid)
                    worker.start()
            if self._sink_thread is not None and not self._sink_thread.is_alive():
                raise TracksideError("the store sink stopped; see the log above")

    # Stop.

    def stop(self) -> None:
        took: dict[str, float] = {}  # each step's seconds, in one log line at the end
        began = time.monotonic()

        def step(name: str) -> None:
            nonlocal began
            took[name] = time.monotonic() - began
            began = time.monotonic()

        for worker in self.workers:
            worker.stop()
        step("workers")
        if self._forwarder_thread is not None:
            self._forwarder_stop.set()
            self._forwarder_thread.join(30)
            step("forwarder")
        if self.metrics is not None:
            self.metrics.stop()
        if self.sink is not None and self._sink_thread is not None:
            if self.broker is not None and self._sink_thread.is_alive():
                # The embedded broker keeps nothing when it stops: land what it holds first.
                drain = self.sink.drain(self._sink_thread, self.settings.drain_seconds)
                if drain.emptied:
                    log.info("drained %d messages into the store in %.1f s", drain.landed, drain.seconds)
                elif drain.stuck:
                    log.warning("stopped draining after %.1f s: %s; %d landed, what the broker still holds is "
                                "lost with it", drain.seconds, drain.stuck, drain.landed)
                else:
                    log.warning("stopped draining after %.0f s (TRACKSIDE_DRAIN_SECONDS) with messages still "
                                "arriving: %d landed, what the broker still holds is lost with it",
                                drain.seconds, drain.landed)
            self.sink.stop.set()
            self._sink_thread.join(30)
            step("sink")
        if self.store is not None:
            if self.service is not None:
                self.service.stop()
                step("query service")
            try:
                killed = self.store.cancel_queries()
                if killed:
                    log.info("stopped %d query(ies) still running", killed)
            except Exception as error:  # a store that is down must not block the shutdown
                log.warning("could not stop the queries still running: %s", error)
            try:
                self.store.optimize()
            except Exception as error:  # a store that is down must not block the shutdown
                log.warning("could not merge duplicate rows at shutdown: %s", error)
            step("store merge")
            self.store.close()
        if self.broker is not None:
            self.broker.stop()
            step("broker")
        if self._lock_file is not None:
            self._lock_file.close()
        if took:
            log.info("stopped in %.1f s: %s", sum(took.values()),
                     ", ".join(f"{name} {seconds:.1f} s" for name, seconds in took.items()))

    def __enter__(self) -> "Stack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

