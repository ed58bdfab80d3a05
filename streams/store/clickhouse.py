"""The ClickHouse store: one client wrapper, the migration runner, and the local query service.
Who owns an embedded store and how reads are kept read-only: streams/store/README.md."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import clickhouse_connect
import orjson
import pyarrow as pa
from clickhouse_connect.driver.exceptions import DatabaseError

from streams.errors import StoreBusyError, StoreError
from streams.settings import Settings
from streams.store.migrations import MIGRATIONS, load_migrations, pending_migrations, render, split_statements

log = logging.getLogger(__name__)

# Tables whose rows are replaced by key: plain SELECTs see one row per key only with FINAL.
DEDUPLICATED = ("events", "runs", "agent_metrics", "dead_letters", "alerts", "rollbacks", "drift", "failure_clusters",
                "failure_cluster_agents", "controls")
# Every query run for a person applies FINAL to the tables that support it, so redelivered
# rows never show twice, whether or not the background merges have run yet; JSON output
# writes 64-bit integers as numbers.
QUERY_SETTINGS = {"final": 1, "output_format_json_quote_64bit_integers": 0}
SERVICE_FILE = "store-service.json"
# Kinds of statement (the first word of EXPLAIN AST) that only read.
READ_ONLY_STATEMENTS = ("SelectWithUnionQuery", "SelectQuery", "Show", "Describe", "Explain", "Exists")
# The connection for reads: ClickHouse refuses every write on it. (2, not 1: a query may still
# set its own settings, FINAL and output formats included, but never `readonly` itself.)
READER_SETTINGS = {"readonly": 2}


@dataclass(frozen=True)
class _Bound:
    """How a person's query may set one of its bounds (QueryLimits): tighter, never looser."""

    variable: str  # the setting of `up` that sets the bound
    tightest: int | None = None  # when a larger value is tighter (a nice value), the largest there is

    def allows(self, value: float, bound: int) -> bool:
        if self.tightest is not None:
            return bound <= value <= self.tightest
        return value > 0 and (bound == 0 or value <= bound)  # smaller is tighter; 0 is "no bound"

    def allowed(self, bound: int) -> str:
        if self.tightest is not None:
            return f"{bound} to {self.tightest}"
        return f"at most {bound}" if bound else "above 0"


BOUNDS = {
    "max_execution_time": _Bound("TRACKSIDE_QUERY_MAX_SECONDS"),
    "max_memory_usage": _Bound("TRACKSIDE_QUERY_MAX_MEMORY_BYTES"),
    "max_threads": _Bound("TRACKSIDE_QUERY_MAX_THREADS"),
    "max_bytes_before_external_group_by": _Bound("TRACKSIDE_QUERY_SPILL_BYTES"),
    "max_bytes_before_external_sort": _Bound("TRACKSIDE_QUERY_SPILL_BYTES"),
    "os_thread_priority": _Bound("TRACKSIDE_QUERY_NICE", tightest=19),
}
BOUNDED_SETTING = re.compile(rf"\b({'|'.join(BOUNDS)})\s*=\s*([^,\s]+)", re.IGNORECASE)
# Statements remembered as read-only (the oldest forgotten first).
CHECKED_STATEMENTS = 1024
# Table functions a read may use: they make rows up or read this store's own tables. Every other
# one the connected ClickHouse knows (file, url, s3, remote, mysql, executable, python, ...)
# reaches files, the network, other servers or this process, and is refused; one that a later
# ClickHouse adds is refused too until it is judged harmless here.
HARMLESS_TABLE_FUNCTIONS = frozenset({
    "numbers", "numbers_mt", "zeros", "zeros_mt", "generate_series", "generateseries", "generaterandom",
    "primes", "values", "format", "null", "view", "viewifpermitted", "merge",
})
# Plain functions that read outside the store (`file(path)` returns a file's contents).
OUTSIDE_FUNCTIONS = frozenset({"file"})
AST_FUNCTION = re.compile(r"^\s*Function (\S+)", re.MULTILINE)
# formatQuery prints every clause on a line of its own, and escapes line breaks in literals.
INTO_OUTFILE = re.compile(r"^\s*INTO OUTFILE\b", re.MULTILINE)
FORMAT_QUERY_SCOPE = re.compile(r": In scope SELECT formatQuery\(.*(?=\. \()", re.DOTALL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class QueryLimits:
    """What one person's query may use (`trackside sql`, saved queries, the console): a heavy
    one is stopped with a clear error instead of starving the pipeline of cores and memory.

    Below its bound, a GROUP BY or ORDER BY past `spill_bytes` goes on in files (0: never): the
    soak's analyst query on 4 million synthetic events took +500 MB without, +115 MB with 100 MB, and
    twice as long. Its threads run at the nice value `nice`: the pipeline's threads come first
    when the cores are busy, the query takes what they leave (Linux; elsewhere ClickHouse
    ignores it)."""

    seconds: int = 60
    memory_bytes: int = 4_000_000_000
    threads: int = 1
    spill_bytes: int = 100_000_000
    nice: int = 10

    def settings(self) -> dict[str, int]:
        return {"max_execution_time": self.seconds, "max_memory_usage": self.memory_bytes, "max_threads": self.threads,
                "max_bytes_before_external_group_by": self.spill_bytes,
                "max_bytes_before_external_sort": self.spill_bytes, "os_thread_priority": self.nice}


class Store:
    """A clickhouse-connect client for one database; thread-safe (chdb is not re-entrant).

    Three clients on the one store (chdb included: each has its own session), each behind its
    own lock, so that none waits for another: the writer (the sink), the reader of Trackside's
    own reads (recovery), and the reader of people's queries, which runs under `QueryLimits`.
    """

    def __init__(self, url: str, database: str, *, cluster: str = "", limits: QueryLimits = QueryLimits()) -> None:
        self.database = database
        self.cluster = cluster
        self.limits = limits
        self._url = url
        self._lock = threading.RLock()  # the writer's
        self._read_lock = threading.RLock()  # Trackside's own reads: never wait for writes, nor writes for reads
        self._people_lock = threading.RLock()  # people's queries: a long one holds up no other client
        self._checked: dict[tuple[bool, str], None] = {}  # (person, statement) found read-only, newest last
        self.client = self._connect()
        self.reader = self._connect_reader()
        self.people = self._connect_reader(limits.settings())
        self._use_database()

    def _connect(self, settings: dict | None = None) -> Any:
        try:
            return clickhouse_connect.get_client(dsn=self._url, settings=settings)
        except Exception as error:  # clickhouse-connect raises several types; keep the URL's secret out
            raise StoreError(f"cannot open the store: {type(error).__name__}: {_scrub(str(error), self._url)}") from None

    def _connect_reader(self, limits: dict[str, int] | None = None) -> Any:
        """A client for reads: FINAL on, ClickHouse itself refuses writes on it, and `limits`."""
        settings = {**QUERY_SETTINGS, **(limits or {}), **READER_SETTINGS}
        if not self.embedded:  # a server takes a request's settings with the request, at no cost
            return self._connect(settings)
        # chdb applies per-query settings by reading, setting and restoring each one around every
        # query (~5 ms a query, measured); settings of the session itself cost nothing per query.
        # readonly last: after it, nothing changes it.
        reader = self._connect()
        for name, value in settings.items():
            reader.command(f"SET {name} = {int(value)}")
        return reader

    def _use_database(self) -> None:
        # Unqualified names (`SELECT count() FROM events`) then mean the Trackside tables.
        exists = self.client.command("SELECT count() FROM system.databases WHERE name = {db:String}", parameters={"db": self.database})
        if int(exists):
            self.client.database = self.reader.database = self.people.database = self.database

    def release_memory(self) -> None:
        """Embedded: give back to the kernel what ClickHouse's allocator (jemalloc) holds free. It
        keeps what a query or a merge freed for a while: two seconds after a heavy query a chdb
        process was still ~530 MB larger, given back at once by this (measured). A server
        manages its own."""
        if self.embedded:
            self.command("SYSTEM JEMALLOC PURGE")

    @property
    def embedded(self) -> bool:
        return self._url.startswith("chdb:")

    def command(self, sql: str, parameters: dict | None = None) -> Any:
        with self._lock:
            return self.client.command(sql, parameters=parameters)

    def query_rows(self, sql: str, parameters: dict | None = None) -> list[tuple]:
        with self._read_lock:
            return self.reader.query(sql, parameters=parameters).result_rows

    def query_arrow(self, sql: str, parameters: dict | None = None) -> pa.Table:
        with self._read_lock:
            return self.reader.query_arrow(sql, parameters=parameters)

    def query_raw(
        self, sql: str, fmt: str = "PrettyCompact", *, readonly: bool = True, parameters: dict | None = None,
        person: bool = True,
    ) -> bytes:
        """The result of any SQL in any ClickHouse output format, as the server writes it.

        `readonly` (the default): one statement that only reads the store, run on a reader:
        a person's (the default) under `self.limits`, Trackside's own (`person=False`) without.
        `parameters` bind `{name:Type}` placeholders server-side: values never become SQL text.
        """
        try:
            if readonly:
                with self._read_lock:
                    self._check_reads_only(sql, parameters, person)
                    if not person:
                        return self.reader.raw_query(sql, parameters=parameters, fmt=fmt)
                with self._people_lock:
                    return self.people.raw_query(sql, parameters=parameters, fmt=fmt)
            with self._lock:
                return self.client.raw_query(sql, parameters=parameters, settings=QUERY_SETTINGS, fmt=fmt)
        except StoreError:
            raise
        except Exception as error:  # the server's message is what the person needs
            raise StoreError(_scrub(str(error), self._url)) from None

    def query_json(self, sql: str, parameters: dict | None = None, *, person: bool = True) -> list[dict]:
        return _json_rows(self.query_raw(sql, "JSONEachRow", parameters=parameters, person=person))

    def query_lists(self, sql: str, parameters: dict | None = None, *, person: bool = True) -> Iterator[list]:
        """`query_json`'s rows as lists of values in the order of the columns, parsed one at a time
        as they are taken from the one response: no dict a row, nor a list of every row."""
        return _json_lines(self.query_raw(sql, "JSONCompactEachRow", parameters=parameters, person=person))

    def query_dicts(self, sql: str, parameters: dict | None = None, *, person: bool = True) -> Iterator[dict]:
        """`query_json`'s rows parsed one at a time as they are taken from the one response (read
        at once): no list of every row."""
        return _json_lines(self.query_raw(sql, "JSONEachRow", parameters=parameters, person=person))

    def _check_reads_only(self, sql: str, parameters: dict | None, person: bool = True) -> None:
        """Refuse, before it runs, what the reader would refuse too or what `readonly` lets through.

        ClickHouse's own parser reads the text (passed as a value, never as SQL): formatQuery
        refuses a second statement and prints the one statement plainly; its AST says what kind
        of statement it is and names every function it calls. A text found read-only once is
        not checked again (the console and pollers repeat theirs): parameters are values and
        cannot change what a statement is.
        """
        if (person, sql) in self._checked:
            return
        try:
            statement = self.reader.query("SELECT formatQuery({sql:String})", parameters={"sql": sql}).result_rows[0][0]
        except DatabaseError as error:
            if "Multi-statements are not allowed" in str(error):
                raise StoreError("read-only: one statement per call; nothing was run") from None
            # The text's own syntax error, without the formatQuery call around it.
            raise StoreError(_scrub(FORMAT_QUERY_SCOPE.sub("", str(error)), self._url)) from None
        ast = self.reader.raw_query(f"EXPLAIN AST {statement}", parameters=parameters).decode()
        kind = ast.split(maxsplit=1)[0]
        if not kind.startswith(READ_ONLY_STATEMENTS):
            raise StoreError(f"read-only: a {kind} statement changes the store; pass --write to run it")
        if INTO_OUTFILE.search(statement):
            raise StoreError("read-only: INTO OUTFILE writes a file; redirect the output of `trackside sql` instead")
        outside = sorted({name for name in AST_FUNCTION.findall(ast) if name.strip("`").lower() in self._outside_functions})
        if outside:
            calls = ", ".join(f"{name}()" for name in outside)
            raise StoreError(f"read-only: {calls} would read files, the network or other servers; a query reads the store only")
        if person:
            self._check_bounds(statement)
        self._checked[(person, sql)] = None
        if len(self._checked) > CHECKED_STATEMENTS:
            del self._checked[next(iter(self._checked))]

    def _check_bounds(self, statement: str) -> None:
        bounds = self.limits.settings()
        for name, value in BOUNDED_SETTING.findall(statement):
            setting, bound = BOUNDS[name.lower()], bounds[name.lower()]
            try:
                tight = setting.allows(float(value.strip("'")), bound)
            except ValueError:
                tight = False
            if not tight:
                raise StoreError(f"read-only: a query may tighten its own limits, not lift them: {name} = {value} "
                                 f"({setting.allowed(bound)}: {setting.variable} of `up`)")

    @cached_property
    def _outside_functions(self) -> frozenset[str]:
        """Lower-case names of the functions a read may not call (see HARMLESS_TABLE_FUNCTIONS)."""
        table_functions = {name.lower() for (name,) in self.reader.query("SELECT name FROM system.table_functions").result_rows}
        return frozenset(table_functions - HARMLESS_TABLE_FUNCTIONS | OUTSIDE_FUNCTIONS)

    def insert_arrow(self, table: str, data: pa.Table) -> None:
        if data.num_rows == 0:
            return
        with self._lock:
            self.client.insert_arrow(f"{self.database}.{table}", data)

    def cancel_queries(self) -> int:
        """Stop every query still running in an embedded store (at shutdown, once nothing
        writes: people's long queries would hold the stop up to their bound); returns how many.
        A server's queries are other clients' too: they are left alone."""
        if not self.embedded:
            return 0
        with self._lock:
            killed = self.client.query("KILL QUERY WHERE query NOT ILIKE 'KILL QUERY%' SYNC").result_rows
        return len(killed)

    def optimize(self) -> None:
        """Merge replaced rows away, so that even a reader without FINAL sees one row per key."""
        for table in DEDUPLICATED:
            with self._lock:
                self.client.command(f"OPTIMIZE TABLE {self.database}.{table} FINAL")

    def close(self) -> None:
        with self._lock, self._read_lock, self._people_lock:
            self.client.close()
            self.reader.close()
            self.people.close()

    # Migrations.

    def migrate(self, directory: Traversable = MIGRATIONS) -> list[str]:
        """Apply the migrations not applied yet, in order; returns the names applied.

        Refuses to start with no migration at all, or when a landed one has changed since.
        """
        migrations = load_migrations(directory)
        on_cluster = f"ON CLUSTER {self.cluster}" if self.cluster else ""
        self.command(f"CREATE DATABASE IF NOT EXISTS {self.database} {on_cluster}")
        self.command(
            f"CREATE TABLE IF NOT EXISTS {self.database}.schema_migrations {on_cluster} "
            "(version UInt32, name String, checksum String, applied_at DateTime64(3, 'UTC')) "
            "ENGINE = MergeTree ORDER BY version"
        )
        landed = dict(self.query_rows(f"SELECT version, checksum FROM {self.database}.schema_migrations"))
        applied = []
        for migration in pending_migrations(migrations, landed):
            for statement in split_statements(migration.text):
                self.command(render(statement, database=self.database, on_cluster=on_cluster))
            self.command(
                f"INSERT INTO {self.database}.schema_migrations VALUES "
                "({version:UInt32}, {name:String}, {checksum:String}, now64(3))",
                parameters={"version": migration.version, "name": migration.name, "checksum": migration.checksum},
            )
            applied.append(migration.name)
        self._use_database()
        return applied


def _scrub(message: str, url: str) -> str:
    password = re.match(r"^[a-z]+://[^:/@]+:([^@]+)@", url)
    return message.replace(password.group(1), "***") if password else message


# The query service of the process that owns an embedded store.


class QueryService:
    """Serves `Store.query_raw` on 127.0.0.1 to the other local processes of one data dir."""

    def __init__(self, store: Store, run_dir: Path) -> None:
        self.store = store
        self.path = run_dir / SERVICE_FILE
        self.token = secrets.token_hex(16)
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                if self.headers.get("X-Trackside-Token") != service.token:
                    self._reply(403, b"wrong token")
                    return
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                try:
                    body = service.store.query_raw(
                        request["sql"], request.get("format", "PrettyCompact"),
                        readonly=request.get("readonly") is not False, parameters=request.get("parameters"),
                        person=request.get("person") is not False,
                    )
                except Exception as error:
                    self._reply(400, str(error).encode())
                    return
                self._reply(200, body)

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # a short poll: `stop` waits for it (the default half second, at every stop)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="query-service", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": self._server.server_address[1], "token": self.token, "pid": os.getpid()}))
        tmp.chmod(0o600)
        tmp.replace(self.path)

    def stop(self) -> None:
        self.path.unlink(missing_ok=True)
        self._server.shutdown()
        self._server.server_close()


class RemoteStore:
    """Queries an embedded store through the query service of the process that owns it."""

    def __init__(self, port: int, token: str, *, person: bool = True) -> None:
        self._url = f"http://127.0.0.1:{port}/query"
        self._token = token
        self._person = person  # False: Trackside's own reads (recovery), not bounded by QueryLimits

    def query_raw(
        self, sql: str, fmt: str = "PrettyCompact", *, readonly: bool = True, parameters: dict | None = None
    ) -> bytes:
        request = urllib.request.Request(
            self._url,
            data=json.dumps({"sql": sql, "format": fmt, "readonly": readonly, "parameters": parameters,
                             "person": self._person}).encode(),
            headers={"X-Trackside-Token": self._token, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            raise StoreError(error.read().decode(errors="replace")) from None
        except OSError as error:
            raise StoreError(f"the query service of the running stack did not answer: {error}") from None

    def query_json(self, sql: str, parameters: dict | None = None) -> list[dict]:
        return _json_rows(self.query_raw(sql, "JSONEachRow", parameters=parameters))

    def query_lists(self, sql: str, parameters: dict | None = None) -> Iterator[list]:
        return _json_lines(self.query_raw(sql, "JSONCompactEachRow", parameters=parameters))

    def query_dicts(self, sql: str, parameters: dict | None = None) -> Iterator[dict]:
        return _json_lines(self.query_raw(sql, "JSONEachRow", parameters=parameters))

    def close(self) -> None:
        """Nothing to close: every query is a request of its own."""


def _json_rows(body: bytes) -> list[dict]:
    return list(_json_lines(body))


def _json_lines(body: bytes) -> Iterator:
    """Each line of a `...EachRow` body, parsed as it is taken, where it lies in the body (no
    bytes object a line; the body is one block, given back whole once done)."""
    view, start = memoryview(body), 0
    while start < len(body):
        end = body.find(b"\n", start)
        end = len(body) if end < 0 else end
        if end > start:
            yield orjson.loads(view[start:end])
        start = end + 1


def running_service(settings: Settings, *, person: bool = True) -> RemoteStore | None:
    """The query service of a live `trackside up` on this data dir, if there is one."""
    path = settings.run_dir / SERVICE_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not _pid_alive(info.get("pid", -1)):
        return None
    return RemoteStore(info["port"], info["token"], person=person)


def open_store(settings: Settings) -> Store:
    """Open the store for writing; an embedded one must not be open elsewhere."""
    if settings.store_is_embedded:
        if running_service(settings) is not None:
            raise StoreBusyError(
                f"the embedded store in {settings.data_dir} is open in a running `trackside up`; "
                "query it with `trackside sql`"
            )
        Path(settings.store_url.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
    return Store(settings.store_url, settings.database, cluster=settings.cluster, limits=settings.query_limits)


def query_store(settings: Settings, *, may_open: bool = True) -> Store | RemoteStore:
    """Something with `query_raw` for this settings' store, whether or not `up` runs.

    `may_open=False` is for processes of a running stack: they must never open its embedded
    store themselves (that would lock the owner out), only go through its query service, and
    their reads are Trackside's own (not bounded by `QueryLimits`).
    """
    if settings.store_is_embedded:
        remote = running_service(settings, person=may_open)
        if remote is not None:
            return remote
        if not may_open:
            raise StoreError(f"no query service of a running stack in {settings.run_dir}")
    return open_store(settings)
