"""`trackside sql` without --write only reads (issue 11.7, SPEC §1): one statement per call, run on a
connection ClickHouse itself will not let write, and no table function that reaches files, the
network or other servers; with `up` running (through its query service) and with the store closed
(the command opens chdb itself). Whatever text it is given, the store stays as it was."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams import cli
from streams.errors import StoreError
from streams.store.clickhouse import HARMLESS_TABLE_FUNCTIONS, open_store, query_store, running_service
from tests.conftest import RunningStack

pytestmark = pytest.mark.integration

# The measured attacks of issue 11.7: each one changed the store.
SMUGGLED = [
    "SELECT 1; DROP TABLE trackside.events",
    "SELECT 1;\nTRUNCATE TABLE trackside.runs",
    "WITH 1 AS x SELECT x; DROP DATABASE trackside",
]
READS = ["SELECT 1", "WITH 1 AS x SELECT x", "SELECT count() FROM trackside.runs", "SHOW TABLES FROM trackside",
         "(SELECT 1)", "SELECT ';' AS semicolon", "SELECT n FROM trackside.probe ORDER BY n"]
WRITES = [
    "DROP TABLE trackside.probe", "DROP TABLE IF EXISTS trackside.runs", "TRUNCATE TABLE trackside.probe",
    "TRUNCATE trackside.runs", "DROP DATABASE trackside", "INSERT INTO trackside.probe VALUES (99)",
    "INSERT INTO trackside.probe SELECT number FROM numbers(3)", "ALTER TABLE trackside.probe DELETE WHERE 1",
    "DELETE FROM trackside.probe WHERE 1", "ALTER TABLE trackside.probe ADD COLUMN x UInt8",
    "RENAME TABLE trackside.probe TO trackside.renamed", "DETACH TABLE trackside.runs",
    "CREATE TABLE trackside.extra (a UInt8) ENGINE = Memory", "CREATE DATABASE extra",
    "EXCHANGE TABLES trackside.probe AND trackside.runs",
]
# Whitespace and comments ClickHouse skips between tokens; a line comment ends its line.
GAPS = ["", " ", "\n", "\t", "\r\n", "  \n\t ", "/* ; */", "/* /* nested */ ; */", "-- ;\n", "# ;\n", "\u00a0"]

gap = st.lists(st.sampled_from(GAPS), max_size=3).map("".join)
write = st.sampled_from(WRITES).flatmap(lambda text: st.sampled_from([text, text.lower()]))
separator = st.builds(lambda a, semicolons, b: a + ";" * semicolons + b, gap, st.integers(1, 2), gap)
# Every text holds at least one statement that writes: each must be refused as a whole.
smuggled = st.one_of(
    st.builds(lambda a, read, sep, w, end: a + read + sep + w + end, gap, st.sampled_from(READS), separator, write,
              st.sampled_from(["", ";", ";\n", "; -- bye\n"])),
    st.builds(lambda a, w, b: a + w + b, gap, write, gap),
    st.builds(lambda w, sep, read: w + sep + read, write, separator, st.sampled_from(READS)),
    st.builds(lambda r1, s1, r2, s2, w: r1 + s1 + r2 + s2 + w, st.sampled_from(READS), separator,
              st.sampled_from(READS), separator, write),
)


def seed(running: RunningStack) -> None:
    """Rows in `runs` and a table of our own, written through `trackside sql --write`."""
    for statement in (
        "CREATE TABLE trackside.probe (n UInt32) ENGINE = MergeTree ORDER BY n",
        "INSERT INTO trackside.probe SELECT number FROM numbers(5)",
        "INSERT INTO trackside.runs (run_id, agent_id, agent_version) SELECT 'seeded-run', 'agent', 'v1'",
    ):
        running.cli("sql", "--write", statement)


def snapshot(settings) -> tuple:
    """Databases, tables and each table's row count, read through the path `trackside sql` takes."""
    store = query_store(settings)
    try:
        databases = sorted(row["name"] for row in store.query_json("SELECT name FROM system.databases"))
        tables = [row["name"] for row in store.query_json("SELECT name FROM system.tables WHERE database = 'trackside'")]
        counts = store.query_json(
            " UNION ALL ".join(f"SELECT '{name}' AS name, count() AS rows FROM trackside.`{name}`" for name in tables)
        )
    finally:
        store.close()
    return databases, sorted((row["name"], int(row["rows"])) for row in counts)


def trackside_sql(running: RunningStack, text: str) -> int:
    """`trackside sql TEXT` (no --write) in this process, as the command line runs it."""
    env = {key: value for key, value in running.env.items() if key.startswith("TRACKSIDE_")}
    with mock.patch.dict(os.environ, env):
        return cli.main(["sql", text])


@pytest.fixture(scope="module")
def seeded(stack):
    seed(stack)
    assert stack.count("SELECT count() FROM trackside.probe") == 5
    return stack


@pytest.fixture(scope="module")
def closed(tmp_path_factory) -> RunningStack:
    """A seeded stack that is not running: `trackside sql` opens its chdb itself."""
    running = RunningStack(tmp_path_factory.mktemp("closed"))
    running.start()
    seed(running)
    assert running.stop() == 0
    return running


@pytest.mark.parametrize("text", SMUGGLED)
def test_a_second_statement_is_refused_before_anything_runs(seeded, text):
    before = snapshot(seeded.settings)
    result = seeded.cli("sql", text, check=False)
    assert result.returncode == 2
    assert "one statement per call" in result.stderr.decode()
    assert snapshot(seeded.settings) == before


@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(text=smuggled)
def test_no_text_changes_the_running_store(seeded, text):
    before = snapshot(seeded.settings)
    assert trackside_sql(seeded, text) == 2
    assert snapshot(seeded.settings) == before


@settings(max_examples=20, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(text=smuggled)
def test_no_text_changes_the_closed_store(closed, text):
    before = snapshot(closed.settings)
    assert trackside_sql(closed, text) == 2
    assert snapshot(closed.settings) == before


def test_clickhouse_itself_refuses_writes_on_the_read_connection(closed):
    store = open_store(closed.settings)
    try:
        for statement in ("TRUNCATE TABLE trackside.probe", "INSERT INTO trackside.probe VALUES (7)",
                          "DROP TABLE trackside.probe", "SET readonly = 0"):
            with pytest.raises(DatabaseError, match="READONLY"):
                store.reader.raw_query(statement)
        with pytest.raises(StoreError, match="READONLY"):
            store.query_raw("SELECT 1 SETTINGS readonly = 0")
        assert store.query_rows("SELECT count() FROM trackside.probe") == [(5,)]
    finally:
        store.close()


def test_every_table_function_that_reaches_out_is_refused(seeded, tmp_path):
    service = running_service(seeded.settings)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for queries\n")
    names = [row["name"] for row in service.query_json("SELECT name FROM system.table_functions")]
    outside = sorted(name for name in names if name.lower() not in HARMLESS_TABLE_FUNCTIONS)
    assert {"file", "url", "s3", "hdfs", "remote", "remoteSecure", "mysql", "postgresql", "jdbc", "odbc",
            "executable", "cluster", "python"} <= set(outside)
    for name in outside:
        with pytest.raises(StoreError, match=rf"{name}\(\) would read files"):
            service.query_raw(f"SELECT * FROM {name}('{secret}', 'LineAsString')")
    for text in (
        f"SELECT file('{secret}')",
        f"SELECT * FROM numbers(1) JOIN file('{secret}', 'LineAsString') AS f ON 1",
        f"SELECT * FROM view(SELECT * FROM file('{secret}', 'LineAsString'))",
        f"SELECT 1 WHERE 1 IN (SELECT 1 FROM url('http://127.0.0.1:1/', 'LineAsString'))",
        f"DESCRIBE file('{secret}')",
        f"EXPLAIN PIPELINE SELECT * FROM file('{secret}', 'LineAsString')",
        f"SELECT * FROM `file`('{secret}', 'LineAsString')",
    ):
        with pytest.raises(StoreError, match=r"would read files"):
            service.query_raw(text)


def test_into_outfile_is_refused(seeded, tmp_path):
    target = tmp_path / "out.txt"
    for text in (f"SELECT 1 INTO OUTFILE '{target}'", f"EXPLAIN SELECT 1 INTO OUTFILE '{target}'"):
        assert trackside_sql(seeded, text) == 2
    assert not target.exists()


@pytest.mark.parametrize(("text", "fmt", "expected"), [
    ("SELECT sum(number) FROM numbers(10)", "TSV", b"45\n"),
    ("SELECT * FROM generate_series(1, 3)", "CSV", b"1\n2\n3\n"),
    ("SELECT format('{} {}', 'a', 'b') AS s", "JSONEachRow", b'{"s":"a b"}\n'),
    ("SELECT count() AS n FROM trackside.probe SETTINGS max_threads = 1, final = 1", "JSONEachRow", b'{"n":5}\n'),
    ("SELECT n FROM trackside.probe ORDER BY n LIMIT 2 OFFSET 1", "CSV", b"1\n2\n"),
    ("SELECT run_id FROM trackside.runs FINAL", "CSV", b'"seeded-run"\n'),
    ("-- a comment first\nWITH 2 AS x SELECT x * 2;  ", "TSV", b"4\n"),
    ("SELECT getSetting('final') AS final", "TSV", b"true\n"),
    ("SELECT 'a;b' /* ; */", "TSV", b"a;b\n"),
])
def test_reads_keep_their_settings_formats_and_functions(seeded, text, fmt, expected):
    assert running_service(seeded.settings).query_raw(text, fmt) == expected


def test_reads_in_pretty_formats_parameters_and_show(seeded):
    result = seeded.cli("sql", "SHOW TABLES FROM trackside")
    assert b"probe" in result.stdout and b"runs" in result.stdout
    assert b"\xe2\x94\x8c" in seeded.cli("sql", "SELECT 1 AS one").stdout  # PrettyCompact's box drawing
    rows = running_service(seeded.settings).query_json(
        "SELECT run_id FROM runs WHERE agent_id = {agent:String}", {"agent": "agent"})
    assert rows == [{"run_id": "seeded-run"}]


def test_write_still_writes(seeded):
    seeded.cli("sql", "--write", "CREATE TABLE trackside.written (a UInt8) ENGINE = Memory")
    seeded.cli("sql", "--write", "INSERT INTO trackside.written SELECT 1")
    assert seeded.count("SELECT count() FROM trackside.written") == 1
    seeded.cli("sql", "--write", "DROP TABLE trackside.written")
