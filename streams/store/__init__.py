"""ClickHouse: the client, migrations, the local query service, saved queries."""

from streams.store.clickhouse import (  # noqa: F401 (the package's public names)
    QueryService, RemoteStore, Store, open_store, query_store, running_service,
)
from streams.store.migrations import split_statements  # noqa: F401
