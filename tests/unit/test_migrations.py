"""The migration runner (issue 11.6) on an in-process chdb: it refuses to start with no migration
or with a landed migration that changed, and fills `{database}`/`{on_cluster}` as literal tokens."""

import uuid

import pytest

from streams.errors import StoreError
from streams.store.clickhouse import Store
from streams.store.migrations import load_migrations, render

NOTES = "CREATE TABLE IF NOT EXISTS {database}.notes {on_cluster} (id UInt32) ENGINE = MergeTree ORDER BY id;\n"
MORE = "CREATE TABLE IF NOT EXISTS {database}.more (a UInt8) ENGINE = Memory;\n"
WITH_BRACES = """-- A migration with braces of its own.
CREATE TABLE IF NOT EXISTS {database}.notes {on_cluster}
(
    id UInt32,
    body String DEFAULT '{}' COMMENT 'JSON such as {"a": {"b": 1}}'
)
ENGINE = MergeTree ORDER BY id;
"""


@pytest.fixture(scope="module")
def chdb_path(tmp_path_factory):
    # chdb hosts one store path per process: every test of this module uses this one.
    return tmp_path_factory.mktemp("chdb")


@pytest.fixture
def store(chdb_path):
    opened = Store(f"chdb://{chdb_path}", f"test_{uuid.uuid4().hex[:12]}")
    yield opened
    opened.close()


def test_the_shipped_migrations_are_found_in_order():
    migrations = load_migrations()
    assert [migration.version for migration in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].name == "0001_create_tables"


def test_no_migration_found_stops_before_anything_is_created(store, tmp_path):
    with pytest.raises(StoreError, match="no migration found"):
        store.migrate(tmp_path)
    assert store.command(f"EXISTS DATABASE {store.database}") == 0


def test_a_changed_landed_migration_stops_start_up_naming_the_file(store, tmp_path):
    (tmp_path / "0001_create_notes.sql").write_text(NOTES)
    assert store.migrate(tmp_path) == ["0001_create_notes"]
    (tmp_path / "0001_create_notes.sql").write_text(NOTES.replace("id UInt32", "id UInt64"))
    (tmp_path / "0002_more.sql").write_text(MORE)
    with pytest.raises(StoreError, match=r"0001_create_notes\.sql changed after it was applied"):
        store.migrate(tmp_path)
    assert store.command(f"EXISTS TABLE {store.database}.more") == 0


def test_an_unchanged_store_applies_only_the_new_migrations(store, tmp_path):
    (tmp_path / "0001_create_notes.sql").write_text(NOTES)
    assert store.migrate(tmp_path) == ["0001_create_notes"]
    (tmp_path / "0002_more.sql").write_text(MORE)
    assert store.migrate(tmp_path) == ["0002_more"]
    assert store.migrate(tmp_path) == []


def test_braces_in_a_migration_are_kept_and_only_the_placeholders_filled(store, tmp_path):
    (tmp_path / "0001_create_notes.sql").write_text(WITH_BRACES)
    store.migrate(tmp_path)
    store.command(f"INSERT INTO {store.database}.notes (id) VALUES (1)")
    assert store.query_rows(f"SELECT body FROM {store.database}.notes") == [("{}",)]
    comment = store.query_rows(
        "SELECT comment FROM system.columns WHERE database = {db:String} AND table = 'notes' AND name = 'body'",
        {"db": store.database},
    )
    assert comment == [('JSON such as {"a": {"b": 1}}',)]


def test_render_fills_the_tokens_once():
    assert render("CREATE DATABASE {database} {on_cluster} -- '{x}'", database="a{on_cluster}", on_cluster="ON CLUSTER c") == (
        "CREATE DATABASE a{on_cluster} ON CLUSTER c -- '{x}'"
    )


def test_the_embedded_store_gives_back_what_its_allocator_holds_free(store):
    """`up` calls this every 10 s: chdb takes the command (a store that refused it would keep
    a heavy query's freed memory for as long as jemalloc decides)."""
    store.client.command("SELECT uniqExact(number) FROM numbers(2000000) FORMAT Null")
    store.release_memory()
    assert store.client.command("SELECT count() FROM numbers(3)") == 3  # and goes on answering
