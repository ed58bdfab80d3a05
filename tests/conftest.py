"""Shared fixtures: a real `trackside up` (embedded Tansu broker + chdb) on its own data dir and port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from streams.settings import Settings
from streams.store.clickhouse import running_service

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
        self.env = {
            **os.environ,
            "TRACKSIDE_DATA_DIR": str(data_dir),
            "TRACKSIDE_EMBEDDED_PORT": str(self.port),
            "TRACKSIDE_METRICS_PORT": str(self.metrics_port),
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
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output, "ab") as out:
            self.process = subprocess.Popen(
                [str(self.trackside), "up"], env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output.read_text(errors="replace").splitlines():
                if line.startswith("trackside ready "):
                    self.ready_line = line
            if getattr(self, "ready_line", None) and running_service(self.settings) is not None:
                return self.ready_line
            if self.process.poll() is not None:
                raise RuntimeError(f"trackside up exited:\n{self.output.read_text()[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"trackside up not ready:\n{self.output.read_text()[-3000:]}")

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

    def count(self, sql: str) -> int:
        """A one-number query (ClickHouse's JSON quotes 64-bit integers)."""
        (row,) = self.query(sql)
        return int(next(iter(row.values())))

    def wait_for_count(self, sql: str, expected: int, timeout: float = 90) -> int:
        deadline = time.monotonic() + timeout
        value = self.count(sql)
        while value != expected and time.monotonic() < deadline:
            time.sleep(0.3)
            value = self.count(sql)
        return value


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One stack per test module: event time is shared per partition, so modules must not mix."""
    running = RunningStack(tmp_path_factory.mktemp("stack"))
    running.start()
    yield running
    assert running.stop() == 0
