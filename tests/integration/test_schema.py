"""The running stack's schema agrees with the code: tables and Arrow schemas, topics, migrations."""

import pytest
from confluent_kafka.admin import AdminClient

from streams.contracts import tables, topics
from streams.store.migrations import load_migrations

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("table", sorted(tables.BY_TABLE))
def test_arrow_schema_lists_the_table_columns_in_order(stack, table):
    columns = [
        row["name"] for row in stack.query(
            "SELECT name FROM system.columns WHERE database = 'trackside' AND table = {table:String} ORDER BY position",
            {"table": table},
        )
    ]
    assert columns == tables.BY_TABLE[table].names


def test_every_table_of_the_contract_exists(stack):
    names = {row["name"] for row in stack.query("SELECT name FROM system.tables WHERE database = 'trackside'")}
    assert {"events", "runs", "agent_metrics", "drift", "failure_clusters", "alerts", "rollbacks", "dead_letters"} <= names


def test_every_registered_topic_exists_with_the_configured_partitions(stack):
    metadata = AdminClient({"bootstrap.servers": f"127.0.0.1:{stack.port}"}).list_topics(timeout=10)
    for topic in topics.ALL:
        assert topic.name in metadata.topics, topic.name
        assert len(metadata.topics[topic.name].partitions) == stack.settings.partitions


def test_every_migration_is_recorded(stack):
    applied = {row["name"] for row in stack.query("SELECT name FROM schema_migrations")}
    assert applied == {migration.name for migration in load_migrations()}
