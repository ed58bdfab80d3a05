"""`trackside up`: the embedded stack (broker, store sink, faust workers) in one foreground process.
Start and stop order, and worker restarts: streams/ops/README.md, "The stack"."""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import threading
import time
from typing import Callable

from streams import telemetry
from streams.ops.broker import (Child, embedded_broker, ensure_topics, free_port, port_free, resident_bytes,
                                wait_for_broker)
from streams.ops.frontdoor import FrontDoor
from streams.errors import BrokerError, ConfigError, TracksideError
from streams.ops.forward import build_targets, run_forwarders
from streams.ingest.sink import StoreSink
from streams.runtime import release_memory, tune_gc
from streams.settings import Settings
from streams.store.clickhouse import QueryService, Store, open_store

log = logging.getLogger(__name__)

FORWARDER_SETTINGS = ("alertmanager_url", "alert_webhook_url", "alert_webhook_token")
WORKER_READY = b"[^Worker]: Ready"
RELEASE_MEMORY_EVERY_S = 10  # `up` gives back the memory it holds free this often


class Stack:
    """The running parts of `trackside up`; use as a context manager or call start/stop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.front_door: FrontDoor | None = None  # the embedded broker's public port
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
        self._metrics_dir = None
        self._targets: list = []
        self._started = False
        self.console = None  # streams.console.app.ConsoleServer, when it listens
        self._observers: list = []  # of every sink this stack starts: the console's live view

    # Start.

    def start(self, *, ready_timeout: float = 90.0) -> None:
        settings = self.settings
        settings.policy()  # a bad policy file stops here, not in every worker
        settings.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        # Before any metric is used here and before the workers start (they inherit it).
        self._metrics_dir = self._prepare_metrics() if settings.metrics_port else None
        self._targets = build_targets(settings)  # a bad URL stops here
        if settings.embedded:
            if not port_free(settings.embedded_port):
                raise BrokerError(
                    f"port {settings.embedded_port} is taken by another program; "
                    "set TRACKSIDE_EMBEDDED_PORT to a free port"
                )
            self.front_door = FrontDoor(settings.embedded_port, free_port(), settings.data_dir / "logs" / "front-door.log")
            self.front_door.start()
        self._start_broker()

        self.store = open_store(settings)
        applied = self.store.migrate()
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        if self.store.embedded:
            self.service = QueryService(self.store, settings.run_dir)
            self.service.start()
        tune_gc()
        if settings.metrics_port:
            try:
                self.metrics = telemetry.start_metrics_server(settings.metrics_port, self._metrics_dir,
                                                              settings.metrics_host)
            except OSError as error:  # e.g. a second stack on this machine: it runs, without /metrics
                log.warning("no /metrics: cannot listen on %s:%d (%s); set TRACKSIDE_METRICS_PORT",
                            settings.metrics_host, settings.metrics_port, error)
        self._start_pipeline(ready_timeout)
        self._start_console()
        self._started = True

    def _start_console(self) -> None:
        """The web console and JSON API (SPEC §10), reading the store as Trackside (no person's
        limits) and following the topics; a taken port is a warning, as for /metrics."""
        if not self.settings.console_port:
            return
        from streams.console.app import ConsoleServer

        store = self.store
        # its live view fed by the sink in this process, which has every event at hand already
        console = ConsoleServer(self.settings, lambda sql, params: store.query_json(sql, params, person=False),
                                live="fed")
        if console.start():
            self._observers.append(console.live)
            self.console = console
            log.info("console on %s", console.url)

    def _start_broker(self) -> None:
        """The embedded broker behind the front door (or nothing, with an external one); then the topics."""
        if self.front_door is not None:
            self.broker = embedded_broker(self.settings, self.front_door.private_port)
            self.broker.start()
        wait_for_broker(self.settings)
        created = ensure_topics(self.settings)
        if created:
            log.info("created topics: %s", ", ".join(created))

    def _start_pipeline(self, ready_timeout: float) -> None:
        """The store sink, the alert forwarder and the workers, on a broker and a store that are up."""
        self.sink = StoreSink(self.settings, self.store, observers=self._observers,
                              broker_pid=self.broker.process.pid if self.broker is not None else None)
        self._sink_thread = threading.Thread(target=self._run_sink, name="store-sink", daemon=True)
        self._sink_thread.start()
        if self._targets:
            self._forwarder_stop.clear()
            self._forwarder_thread = threading.Thread(target=self._run_forwarder, name="alert-forwarder", daemon=True)
            self._forwarder_thread.start()
        self.workers = [self._worker(index) for index in range(self.settings.workers)]
        for worker in self.workers:
            worker.start()
        self._wait_ready(ready_timeout)
        if self.broker is not None:
            self.sink.wake_assemblers()  # the fresh broker redelivers nothing: runs come back from the store

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
        """Keep the workers alive, and the embedded broker's memory bounded, until `stop` is set."""
        ticks = 0
        while not stop.wait(1.0):
            ticks += 1
            if self._broker_too_big():
                self.recycle_broker()
            if ticks % RELEASE_MEMORY_EVERY_S == 0:
                self._release_memory()
            for worker in self.workers:
                if not worker.alive:
                    log.warning("%s exited with code %s; restarting it", worker.name, worker.process.returncode)
                    telemetry.mark_process_dead(worker.process.pid)
                    worker.start()
            if self._sink_thread is not None and not self._sink_thread.is_alive():
                raise TracksideError("the store sink stopped; see the log above")

    def _release_memory(self) -> None:
        """What `up` and its embedded store hold free goes back to the kernel: people's queries,
        merges, recycles and drains come in bursts, after which the process would stay at its
        high-water mark."""
        if self.store is not None:
            try:
                self.store.release_memory()
            except Exception as error:  # noqa: BLE001 (an embedded store that cannot purge still works)
                log.debug("could not release the store's free memory: %s", error)
        release_memory()

    # The broker's recycle.

    def _broker_too_big(self) -> bool:
        bound = self.settings.broker_memory_bytes
        held = resident_bytes(self.broker.process.pid) if bound and self.broker is not None else None
        return held is not None and held > bound

    def recycle_broker(self) -> None:
        """Start the embedded broker afresh, its memory back to nothing, losing no event: agents
        are shut out at the front door (their clients keep what they send and retry), the sink
        lands everything the broker holds, then a new broker takes the agents back and the
        pipeline restarts on it as after a clean restart of `up`."""
        began = time.monotonic()
        held = resident_bytes(self.broker.process.pid) or 0
        self.front_door.shut_out_agents()
        drained = self._stop_pipeline(self._step_timer())
        self.broker.stop()
        self._start_broker()
        self.front_door.let_agents_in()
        shut_out = time.monotonic() - began
        self._start_pipeline(ready_timeout=90.0)
        telemetry.BROKER_RECYCLES.inc()
        log.info("recycled the embedded broker at %.0f MB: %s; agents shut out for %.1f s, pipeline back after "
                 "%.1f s", held / 1e6, drained, shut_out, time.monotonic() - began)

    # Stop.

    @staticmethod
    def _step_timer() -> Callable[[str], None]:
        """step(name) records the seconds since the previous step in `step.took`."""
        began = time.monotonic()
        took: dict[str, float] = {}

        def step(name: str) -> None:
            nonlocal began
            took[name] = time.monotonic() - began
            began = time.monotonic()

        step.took = took
        return step

    def _stop_pipeline(self, step: Callable[[str], None]) -> str:
        """Stop the workers and the forwarder, then the sink, which first lands what the embedded
        broker holds; returns what the drain did, in words."""
        for worker in self.workers:
            worker.stop()
        step("workers")
        if self._forwarder_thread is not None:
            self._forwarder_stop.set()
            self._forwarder_thread.join(30)
            step("forwarder")
        said = ""
        if self.sink is not None and self._sink_thread is not None:
            if self.broker is not None and self._sink_thread.is_alive():
                # The embedded broker keeps nothing when it stops: land what it holds first.
                drain = self.sink.drain(self._sink_thread, self.settings.drain_seconds)
                if drain.emptied:
                    said = f"drained {drain.landed} messages into the store in {drain.seconds:.1f} s"
                    log.info("%s", said)
                elif drain.stuck:
                    said = (f"stopped draining after {drain.seconds:.1f} s: {drain.stuck}; {drain.landed} landed, "
                            "what the broker still holds is lost with it")
                    log.warning("%s", said)
                else:
                    said = (f"stopped draining after {drain.seconds:.0f} s (TRACKSIDE_DRAIN_SECONDS) with messages "
                            f"still arriving: {drain.landed} landed, what the broker still holds is lost with it")
                    log.warning("%s", said)
            self.sink.stop.set()
            self._sink_thread.join(30)
            step("sink")
        return said

    def stop(self) -> None:
        step = self._step_timer()
        if self.front_door is not None and self.broker is not None:
            # agents keep what they send and retry; the broker runs dry and the drain ends
            self.front_door.shut_out_agents()
        if self.console is not None:
            self._observers.remove(self.console.live)
            self.console.stop()
            self.console = None
            step("console")
        self._stop_pipeline(step)
        if self.metrics is not None:
            self.metrics.stop()
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
        if self.front_door is not None:
            self.front_door.stop()
        if self._lock_file is not None:
            self._lock_file.close()
        if step.took:
            log.info("stopped in %.1f s: %s", sum(step.took.values()),
                     ", ".join(f"{name} {seconds:.1f} s" for name, seconds in step.took.items()))

    def __enter__(self) -> "Stack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

