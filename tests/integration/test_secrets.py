"""A secret given to Trackside never shows in its logs, its tables or its error messages."""

import os
import subprocess

import orjson
import pytest

from jobs.simulate import FleetConfig, simulate
from tests.conftest import BIN, RunningStack

pytestmark = pytest.mark.integration

SECRET = "s3cret-Pa55word-9f1c"


def test_secrets_stay_out_of_logs_tables_and_errors(tmp_path):
    stack = RunningStack(tmp_path / "stack", {
        "TRACKSIDE_KAFKA_SASL_USERNAME": "trackside",
        "TRACKSIDE_KAFKA_SASL_PASSWORD": SECRET,  # unused by the embedded broker, but given
        "TRACKSIDE_KAFKA_SSL_KEY_PASSWORD": SECRET,
    })
    stack.start()
    try:
        events = list(simulate(FleetConfig(seed=3, runs=40)))
        lines = b"\n".join(orjson.dumps(e) for e in events) + b"\nnot json\n"
        stack.cli("publish", "-", input=lines, check=False)
        assert stack.wait_for_count("SELECT count() FROM dead_letters", 1) == 1
        stack.cli("sql", "SELECT count() FROM no_such_table", check=False)
        dumped = b""
        for (table,) in [(row["name"],) for row in stack.query("SELECT name FROM system.tables "
                                                              "WHERE database = 'trackside'")]:
            dumped += stack.cli("sql", f"SELECT * FROM {table}", "--format", "JSONEachRow").stdout
        assert len(dumped) > 10_000, "the tables were read"
        assert SECRET.encode() not in dumped
    finally:
        assert stack.stop() == 0
    assert SECRET not in stack.output.read_text(errors="replace"), "the secret is in the logs of up"
    for log in stack.data_dir.rglob("*.log"):
        assert SECRET not in log.read_text(errors="replace"), log

    # an error that involves the secret (a store that cannot be reached) does not print it
    env = {**os.environ, "TRACKSIDE_DATA_DIR": str(tmp_path / "other"),
           "TRACKSIDE_CLICKHOUSE_URL": f"http://analyst:{SECRET}@127.0.0.1:1/trackside"}
    failed = subprocess.run([str(BIN / "trackside"), "sql", "SELECT 1"], env=env, capture_output=True, timeout=60)
    assert failed.returncode != 0 and b"cannot" in failed.stderr
    assert SECRET.encode() not in failed.stdout + failed.stderr
