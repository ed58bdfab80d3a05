"""One frozen settings object, read from `TRACKSIDE_*` environment variables (SPEC §2)."""

from __future__ import annotations

import json
import os
import re
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.errors import ConfigError
from streams.detect.loops import LoopPolicy

if TYPE_CHECKING:
    from streams.detect.policy import Policy
    from streams.store.clickhouse import QueryLimits

# Kafka settings with a field of their own; any other TRACKSIDE_KAFKA_* variable is passed
# to librdkafka as is (TRACKSIDE_KAFKA_SOCKET_KEEPALIVE_ENABLE -> socket.keepalive.enable).
_KAFKA_FIELDS = {
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_username": "sasl.username",
    "sasl_password": "sasl.password",
    "ssl_ca_location": "ssl.ca.location",
    "ssl_certificate_location": "ssl.certificate.location",
    "ssl_key_location": "ssl.key.location",
    "ssl_key_password": "ssl.key.password",
}


class Settings(BaseSettings):
    """Everything Trackside can be told; every field has a working default."""

    model_config = SettingsConfigDict(env_prefix="TRACKSIDE_", frozen=True, extra="ignore")

    # Where things run.
    bootstrap: str = Field("", description="Kafka bootstrap servers; empty = the embedded broker")
    embedded_port: int = Field(19092, description="port of the embedded broker")
    clickhouse_url: SecretStr | None = Field(
        None, description="chdb:///path or http(s)://user:pass@host:8123/db; default chdb in the data dir"
    )
    data_dir: Path = Field(Path(".trackside"), description="where embedded state lives")
    database: str = Field("trackside", description="ClickHouse database")
    cluster: str = Field("", description="ClickHouse cluster for ON CLUSTER migrations; empty = none")

    # Kafka clients (SPEC §2: TRACKSIDE_KAFKA_*).
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = ""
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr = SecretStr("")
    kafka_ssl_ca_location: str = ""
    kafka_ssl_certificate_location: str = ""
    kafka_ssl_key_location: str = ""
    kafka_ssl_key_password: SecretStr = SecretStr("")
    session_timeout_ms: int = Field(6000, description="consumer group session timeout")

    # Topology.
    partitions: int = Field(4, ge=1, description="partitions of agent.events and of the internal topics")
    workers: int = Field(1, ge=1, description="faust worker processes started by `trackside up`")
    memory_report_seconds: int = Field(
        0, ge=0, description="a worker logs where its memory is this often (`streams.runtime.memory_report`; 0: never)")

    # Stream semantics (event time).
    window_seconds: int = Field(300, ge=1, description="tumbling window of agent_metrics")
    allowed_lateness_seconds: int = Field(120, ge=0, description="late runs within this are counted in their window")
    run_idle_timeout_seconds: int = Field(1800, ge=1, description="a run with no event for this long is closed as timeout")

    # Loop detection (streams/detect/loops.py).
    loop_repeats: int = Field(3, ge=2, description="identical tool calls (or cycle turns) in a row that make a loop")
    loop_max_period: int = Field(3, ge=2, description="longest cycle of tool calls looked for")
    loop_max_steps: int = Field(200, ge=1, description="steps (llm + tool calls) a run may take")
    loop_count_repeats: int = Field(
        5, ge=2, description="calls of one tool in a row whose arguments are unknown that make a suspected loop "
        "(a warning; fewer are pagination as much as a loop)")
    loop_stop_on_count: bool = Field(False, description="whether a suspected loop's alert asks to stop the run")
    loop_step_budgets: dict[str, int] = Field(
        default_factory=dict, description='per-agent step budgets, JSON: {"coder": 40}'
    )

    # Operations.
    metrics_port: int = Field(9464, ge=0, le=65535, description="Prometheus /metrics port of `up`; 0 = off")
    metrics_host: str = Field("127.0.0.1", description="address /metrics listens on (0.0.0.0 in a container)")
    console_port: int = Field(8765, ge=0, le=65535, description="web console and JSON API of `up` (SPEC §10); 0 = off")
    console_host: str = Field(
        "127.0.0.1", description="address the console listens on; beyond 127.0.0.1 it needs TRACKSIDE_CONSOLE_TOKEN")
    console_token: SecretStr = Field(
        SecretStr(""), description="bearer token of the console: every request needs it beyond 127.0.0.1, a POST always")

    # Alert forwarding (streams/ops/forward.py); no URL = no forwarder.
    alertmanager_url: SecretStr = Field(
        SecretStr(""), description="Alertmanager base URL (http://am:9093); user:pass@ = basic auth; empty = off")
    alertmanager_resend_seconds: float = Field(
        60.0, ge=0, description="re-post firing alerts this often (endsAt = now + 4x); 0 = post once")
    alert_webhook_url: SecretStr = Field(SecretStr(""), description="webhook URL to POST each alert to; empty = off")
    alert_webhook_token: SecretStr = Field(SecretStr(""), description="bearer token for the webhook; empty = none")
    alert_generator_url: str = Field(
        "", description="generatorURL template of Alertmanager alerts ({agent_id}, {run_id}, ...); empty = none")
    alert_retry_max_seconds: float = Field(30.0, gt=0, description="cap of the backoff while a target refuses")
    alert_http_timeout_seconds: float = Field(10.0, gt=0, description="timeout of one HTTP request to a target")

    # Lifecycle: canary analysis and budgets (streams/detect/policy.py, example: infra/policy.toml).
    policy_file: str = Field("", description="TOML policy file; empty: the built-in defaults")

    # People's queries (`trackside sql`, saved queries, the console): each one bounded.
    query_max_seconds: int = Field(60, ge=1, description="a person's query is stopped after this long")
    query_max_memory_bytes: int = Field(4_000_000_000, ge=1, description="memory one person's query may use")
    query_max_threads: int = Field(1, ge=1, description="threads one person's query may use (the pipeline keeps the rest)")
    query_spill_bytes: int = Field(
        100_000_000, ge=0, description="a person's GROUP BY or ORDER BY past this goes on in files; 0 = never")
    query_nice: int = Field(10, ge=0, le=19, description="nice value of a person's query threads: the pipeline's come first")

    # Ingest and sink.
    ingest_batch_max: int = Field(20000, ge=1, description="most messages the ingest stage takes in one poll")
    ingest_poll_seconds: float = Field(0.05, gt=0, description="longest wait of one poll")
    max_event_bytes: int = Field(1_000_000, ge=256, description="larger events go to the dead-letter topic")
    store_raw_tool_args: bool = Field(False, description="store tool arguments raw, not only hashed")
    otlp_hold_seconds: int = Field(
        300, ge=1, description="how long an OTLP span that names no agent waits for its run's span (then a dead letter)")
    otlp_hold_spans: int = Field(10_000, ge=1, description="most OTLP spans held waiting for their run's span")
    store_retry_max_seconds: float = Field(30.0, gt=0, description="cap of the backoff while the store refuses writes")
    handover_max_bytes: int = Field(
        500_000, ge=1024,
        description="largest batch message a stage hands to the next (the sink, the processors); a larger row travels alone")
    internal_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "lz4", description="compression of the messages Trackside's stages send (hand-overs, runs, alerts)")
    handover_retry_max_seconds: float = Field(
        30.0, gt=0, description="cap of the backoff while the broker refuses the sink's messages")
    drain_seconds: float = Field(
        30.0, ge=0, description="on stop, longest the sink keeps landing what the embedded broker holds")
    broker_memory_bytes: int = Field(
        2_000_000_000, ge=0,
        description="the embedded broker is recycled (drained into the store, started afresh) past this resident memory; 0 = never")
    broker_memory_alert_bytes: int = Field(
        3_000_000_000, ge=0, description="a `pipeline` alert when the embedded broker's resident memory passes this; 0 = off")
    pipeline_lag_alert_seconds: float = Field(
        60.0, gt=0, description="a processor stage this far behind what was handed to it raises a `pipeline` alert")

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("database", "cluster")
    @classmethod
    def _identifier(cls, value: str, info) -> str:  # noqa: ANN001 (pydantic's ValidationInfo)
        # both are written into SQL (no parameter can name a database): only plain names
        if (value or info.field_name == "database") and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"{info.field_name} must be a plain identifier")
        return value

    # Derived values.

    @property
    def embedded(self) -> bool:
        """True when Trackside runs its own broker."""
        return not self.bootstrap

    @property
    def bootstrap_servers(self) -> str:
        return self.bootstrap or f"127.0.0.1:{self.embedded_port}"

    @property
    def store_url(self) -> str:
        """The store's URL with its credentials: give it to clients, never print it."""
        if self.clickhouse_url is not None and self.clickhouse_url.get_secret_value():
            return self.clickhouse_url.get_secret_value()
        return f"chdb://{self.data_dir / 'clickhouse'}"

    @property
    def store_url_redacted(self) -> str:
        return redact_url(self.store_url)

    @property
    def query_limits(self) -> "QueryLimits":
        from streams.store.clickhouse import QueryLimits

        return QueryLimits(self.query_max_seconds, self.query_max_memory_bytes, self.query_max_threads,
                           self.query_spill_bytes, self.query_nice)

    @property
    def store_is_embedded(self) -> bool:
        return self.store_url.startswith("chdb:")

    @property
    def run_dir(self) -> Path:
        """Pid files and the address of the running store's query service."""
        return self.data_dir / "run"

    def to_env(self, exclude: tuple[str, ...] = ()) -> dict[str, str]:
        """These settings as TRACKSIDE_* variables: what a child process needs to see the same
        (but `exclude`: settings it has no use for, e.g. secrets of another component)."""
        env = {}
        for name in type(self).model_fields:  # fields only: cached properties are not settings
            if name in exclude:
                continue
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if value is None:
                continue
            env[f"TRACKSIDE_{name.upper()}"] = json.dumps(value) if isinstance(value, dict) else str(value)
        return env

    def policy(self) -> Policy:
        from streams.detect.policy import Policy

        return Policy.load(self.policy_file)

    def loop_policy(self) -> LoopPolicy:
        return LoopPolicy(self.loop_repeats, self.loop_max_period, self.loop_max_steps, dict(self.loop_step_budgets),
                          self.loop_count_repeats, self.loop_stop_on_count)

    @cached_property
    def kafka_config(self) -> dict[str, str]:
        """librdkafka settings shared by every confluent-kafka client."""
        config: dict[str, str] = {"bootstrap.servers": self.bootstrap_servers, "log.connection.close": False}
        for field, key in _KAFKA_FIELDS.items():
            value = getattr(self, f"kafka_{field}")
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if value:
                config[key] = value
        prefix = "TRACKSIDE_KAFKA_"
        for name, value in os.environ.items():
            suffix = name[len(prefix):].lower()
            if name.startswith(prefix) and suffix not in _KAFKA_FIELDS:
                config[suffix.replace("_", ".")] = value
        if config.get("security.protocol", "").upper() not in {
            "PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL",
        }:
            raise ConfigError(f"TRACKSIDE_KAFKA_SECURITY_PROTOCOL: unknown protocol {config['security.protocol']!r}")
        return config


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))
