"""Security (issue 6.5): secrets only through settings and never shown; Kafka security options
reach every client; SQL is built from parameters; tool arguments are hashed by default."""

import ast
import logging
from pathlib import Path

import faust
import orjson
import pytest
from pydantic import SecretStr, ValidationError

from streams.processors.app import broker_credentials
from streams.errors import StoreError
from streams.contracts.events import parse
from streams.settings import Settings
from streams.store.clickhouse import Store

SECRET = "s3cret-Pa55word"
ROOT = Path(__file__).parents[2]


def secure_settings(**changes) -> Settings:
    return Settings(
        bootstrap="kafka-1:9093,kafka-2:9093", kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="trackside", kafka_sasl_password=SECRET,
        clickhouse_url=f"https://analyst:{SECRET}@ch.example:8443/trackside", **changes,
    )


def test_secrets_are_secret_strings_and_never_printed():
    settings = secure_settings()
    for name in ("kafka_sasl_password", "kafka_ssl_key_password", "clickhouse_url"):
        assert isinstance(getattr(settings, name), SecretStr), name
    assert SECRET not in repr(settings) and SECRET not in str(settings)
    assert SECRET not in settings.model_dump_json()


def test_kafka_security_reaches_confluent_kafka_faust_and_the_workers(monkeypatch):
    settings = secure_settings()
    config = settings.kafka_config  # every confluent-kafka client is built from it
    assert config["security.protocol"] == "SASL_SSL" and config["sasl.mechanism"] == "SCRAM-SHA-512"
    assert config["sasl.username"] == "trackside" and config["sasl.password"] == SECRET
    credentials = broker_credentials(settings)  # faust's (aiokafka's) form of the same
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.username, credentials.password, credentials.mechanism.value) == (
        "trackside", SECRET, "SCRAM-SHA-512")
    assert credentials.ssl_context is not None
    # the workers are separate processes: they get every setting through their environment
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    assert Settings().kafka_config == config


def test_a_store_error_never_shows_the_url_password(caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StoreError) as error:
        Store(f"http://analyst:{SECRET}@127.0.0.1:1/trackside", "trackside")
    assert SECRET not in str(error.value) and SECRET not in caplog.text


def test_names_written_into_sql_must_be_plain_identifiers():
    for name in ("database", "cluster"):
        with pytest.raises(ValidationError, match="plain identifier"):
            Settings(**{name: "x; DROP TABLE runs"})
    assert Settings(cluster="").cluster == "" and Settings(cluster="main_1").cluster == "main_1"


# Values that may be spliced into SQL text: column lists and names fixed in the code, and the
# database and cluster settings, which are checked identifiers (above). A user's own query
# (`trackside sql`) is passed whole, never joined with anything but these.
ALLOWED_IN_SQL = {"_EVENT_COLUMNS", "_RUN_COLUMNS", "_PARTITION_EVENTS", "self.database", "table", "on_cluster", "sql", "database",
                  "settings.database"}
SQL_START = ("SELECT", "INSERT", "CREATE", "OPTIMIZE", "ALTER", "DROP", "EXPLAIN", "DELETE", "SET", "USE", "SYSTEM")


def test_sql_is_built_from_parameters_not_by_joining_input():
    offenders = []
    for path in sorted((ROOT / "streams").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.JoinedStr):
                continue
            text = "".join(part.value for part in node.values if isinstance(part, ast.Constant))
            if not text.lstrip().upper().startswith(SQL_START):
                continue
            for part in node.values:
                if isinstance(part, ast.FormattedValue) and ast.unparse(part.value) not in ALLOWED_IN_SQL:
                    offenders.append(f"{path.name}:{node.lineno} {ast.unparse(part.value)}")
    assert offenders == []


def test_tool_arguments_are_stored_hashed_unless_configured():
    event = {"event_id": "e", "ts": 1793491200000, "type": "tool_call", "run_id": "r", "agent_id": "a",
             "agent_version": "v1", "tool": "charge_card", "args": {"card": "4111 1111 1111 1111"}}
    stored = parse(orjson.dumps(event))
    assert stored["args"] == "" and len(stored["args_hash"]) >= 16 and "4111" not in orjson.dumps(stored).decode()
    assert "4111" in parse(orjson.dumps(event), keep_raw_args=True)["args"]
    assert Settings().store_raw_tool_args is False


def test_the_workers_do_not_get_the_forwarders_credentials(tmp_path, monkeypatch):
    from streams.ops.stack import Stack

    monkeypatch.setenv("TRACKSIDE_ALERT_WEBHOOK_TOKEN", SECRET)
    settings = Settings(data_dir=tmp_path, alert_webhook_url=f"https://hooks.example/{SECRET}",
                        kafka_sasl_password=SECRET)
    env = Stack(settings)._worker(0).env
    assert SECRET not in env.get("TRACKSIDE_ALERT_WEBHOOK_URL", "") + env.get("TRACKSIDE_ALERT_WEBHOOK_TOKEN", "")
    assert env["TRACKSIDE_KAFKA_SASL_PASSWORD"] == SECRET  # what the workers do need, they get
