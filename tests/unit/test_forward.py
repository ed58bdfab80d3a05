"""The alert forwarder against a real local HTTP server playing Alertmanager and a webhook.

The Kafka side is fake here (messages with .value(), .error()...; a consumer that records
commits): tests/integration/test_forward.py runs it against a real broker.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import socket
import threading
import time
from datetime import datetime

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

from streams.ops.forward import (
    AlertForwarder,
    AlertmanagerTarget,
    Stopped,
    WebhookTarget,
    build_targets,
    decode,
    rfc3339,
)
from streams.settings import Settings
from tests.alert_receiver import AM_PATH, Receiver
from tests.waiting import wait_until

TOPIC = "trackside.alerts"
T0 = 1_714_564_800_000  # 2024-05-01T12:00:00Z


def alert(alert_id: str, status: str = "firing", *, kind: str = "loop", ts: int = T0, fingerprint: str = "fp-1",
          run_id: str = "run-1", action: str = "stop_run", severity: str = "critical") -> dict:
    body = {
        "alert_id": alert_id, "ts": ts, "kind": kind, "severity": severity, "status": status,
        "fingerprint": fingerprint, "agent_id": "coder", "agent_version": "v2", "run_id": run_id,
        "summary": f"{kind} {status}", "evidence": {"tool": "search", "repeats": 4, "window": "5m"},
    }
    if action:
        body["action"] = action
    return body


class FakeMessage:
    def __init__(self, value: bytes, offset: int, partition: int = 0, error: KafkaError | None = None) -> None:
        self._value, self._offset, self._partition, self._error = value, offset, partition, error

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes:
        return b""

    def error(self) -> KafkaError | None:
        return self._error

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset


class FakeConsumer:
    """Records commits; `committed()` answers what it was told."""

    def __init__(self, committed: dict[int, int] | None = None) -> None:
        self.commits: list[list[tuple[int, int]]] = []
        self.assigned: list[TopicPartition] = []
        self._committed = committed or {}

    def commit(self, offsets=None, asynchronous=True):
        assert asynchronous is False, "commits must be synchronous"
        self.commits.append(sorted((tp.partition, tp.offset) for tp in offsets))

    def committed(self, partitions, timeout=None):
        return [TopicPartition(tp.topic, tp.partition, self._committed.get(tp.partition, -1001)) for tp in partitions]

    def assign(self, partitions) -> None:
        self.assigned = list(partitions)


def messages(*alerts: dict, start: int = 0, partition: int = 0) -> list[FakeMessage]:
    return [FakeMessage(orjson.dumps(body), start + index, partition) for index, body in enumerate(alerts)]


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp() * 1000


@pytest.fixture
def receiver():
    with Receiver() as running:
        yield running


def forwarder(receiver: Receiver, *, resend: float = 60.0, token: str = "tok-secret-123", consumer=None,
              webhook_path: str = "/hooks/alerts", **options) -> AlertForwarder:
    options = {"retry_initial": 0.05, "retry_max": 0.4, "timeout": 5, **options}
    targets = [
        AlertmanagerTarget(receiver.url, resend_seconds=resend, **options),
        WebhookTarget(receiver.url + webhook_path, token, **options),
    ]
    return AlertForwarder(Settings(), targets, consumer=consumer or FakeConsumer())


def test_payloads_firing_then_resolved(receiver):
    consumer = FakeConsumer()
    fwd = forwarder(receiver, consumer=consumer)
    firing = alert("a1")
    before = time.time() * 1000
    counts = fwd.process(messages(firing))
    assert counts["alertmanager_delivered"] == 1 and counts["webhook_delivered"] == 1

    (posted,) = receiver.am_alerts()
    assert posted["labels"] == {
        "alertname": "trackside_loop", "severity": "critical", "agent_id": "coder", "agent_version": "v2",
        "fingerprint": "fp-1", "run_id": "run-1",
    }
    assert posted["annotations"]["summary"] == "loop firing"
    assert posted["annotations"]["action"] == "stop_run"
    assert posted["annotations"]["alert_id"] == "a1"
    evidence = posted["annotations"]["evidence"]
    assert json.loads(evidence) == firing["evidence"] and " " not in evidence  # compact JSON
    assert posted["startsAt"] == "2024-05-01T12:00:00.000Z"
    # Kept alive by re-posting: endsAt is 4 resend intervals ahead of now.
    assert before + 230_000 < parse_time(posted["endsAt"]) < time.time() * 1000 + 250_000
    assert "generatorURL" not in posted
    (am_request,) = receiver.on(AM_PATH)
    assert am_request.headers["Content-Type"] == "application/json"

    (hook,) = receiver.on("/hooks/alerts")
    assert hook.body == orjson.dumps(firing)  # the alert as it is on the topic
    assert hook.headers["Content-Type"] == "application/json"
    assert hook.headers["Idempotency-Key"] == "a1"
    assert hook.headers["Authorization"] == "Bearer tok-secret-123"

    resolved = alert("a2", "resolved", ts=T0 + 90_000, action="")
    fwd.process(messages(resolved, start=1))
    first, second = receiver.am_alerts()
    assert second["labels"] == first["labels"]  # the same alert for Alertmanager
    assert second["startsAt"] == "2024-05-01T12:00:00.000Z"
    assert second["endsAt"] == "2024-05-01T12:01:30.000Z"  # resolved at its ts
    assert "action" not in second["annotations"]
    assert receiver.on("/hooks/alerts")[1].headers["Idempotency-Key"] == "a2"
    assert consumer.commits == [[(0, 1)], [(0, 2)]]
    assert fwd.targets[0].firing == {}


def test_resolved_in_the_future_ends_now_and_empty_labels_are_left_out(receiver):
    fwd = forwarder(receiver, resend=0)
    future = int(time.time() * 1000) + 3_600_000
    fwd.process(messages(alert("b1", run_id="", ts=T0), alert("b2", "resolved", run_id="", ts=future, action="")))
    firing, resolved = receiver.am_alerts()
    assert "run_id" not in firing["labels"]
    assert "endsAt" not in firing  # resend off: Alertmanager's resolve_timeout applies
    assert parse_time(resolved["endsAt"]) <= time.time() * 1000
    assert resolved["startsAt"] == firing["startsAt"]
    # One request per batch for Alertmanager, in topic order; one per alert for the webhook.
    assert len(receiver.on(AM_PATH)) == 1 and len(receiver.on("/hooks/alerts")) == 2


def test_generator_url_template(receiver):
    target = AlertmanagerTarget(receiver.url, generator_url="https://grafana.example/d/t?var-agent={agent_id}&run={run_id}")
    fwd = AlertForwarder(Settings(), [target], consumer=FakeConsumer())
    fwd.process(messages(alert("g1", run_id="run 1/x")))
    (posted,) = receiver.am_alerts()
    assert posted["generatorURL"] == "https://grafana.example/d/t?var-agent=coder&run=run%201%2Fx"


def test_retries_with_backoff_until_the_target_accepts(receiver, caplog):
    receiver.answer(AM_PATH, 503, 503, 200)
    receiver.answer("/hooks/alerts", (429, {"Retry-After": "0.2"}, b"slow down"), 500, 200)
    consumer = FakeConsumer()
    fwd = forwarder(receiver, consumer=consumer)
    with caplog.at_level(logging.INFO, logger="streams.ops.forward"):
        counts = fwd.process(messages(alert("r1")))
    assert counts["alertmanager_delivered"] == 1 and counts["webhook_delivered"] == 1
    am = receiver.on(AM_PATH)
    assert len(am) == 3
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(am)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1  # 0.05 s, then doubled
    hook = receiver.on("/hooks/alerts")
    assert len(hook) == 3
    assert hook[1].at - hook[0].at >= 0.2  # Retry-After honoured
    assert all(request.headers["Idempotency-Key"] == "r1" for request in hook)
    assert consumer.commits == [[(0, 1)]]
    assert "alertmanager http://127.0.0.1" in caplog.text and "refuses (HTTP 503" in caplog.text
    assert "answers again after 2 refused attempts" in caplog.text


def test_connection_refused_is_retried_until_the_target_listens():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = WebhookTarget(f"http://127.0.0.1:{port}/hook", retry_initial=0.05, retry_max=0.2)
    consumer = FakeConsumer()
    fwd = AlertForwarder(Settings(), [target], consumer=consumer)
    result = {}
    worker = threading.Thread(target=lambda: result.update(fwd.process(messages(alert("c1")))))
    worker.start()
    wait_until(lambda: target._failures, 10, "two refused attempts", done=lambda failures: failures >= 2)
    assert consumer.commits == []  # nothing committed while the target refuses
    with Receiver(port) as receiver:
        worker.join(10)
        assert result["webhook_delivered"] == 1
        assert len(receiver.on("/hook")) == 1
    assert consumer.commits == [[(0, 1)]]
    assert target._failures == 0


def test_a_400_is_logged_and_skipped(receiver, caplog):
    # Alertmanager refuses the request of two alerts, then, one by one, the first only.
    refusal = (400, {}, b"start time must be before end time")
    receiver.answer(AM_PATH, refusal, refusal, 200)
    receiver.answer("/hooks/alerts", (400, {}, b"bad alert"), 200)
    consumer = FakeConsumer()
    fwd = forwarder(receiver, consumer=consumer)
    with caplog.at_level(logging.INFO, logger="streams.ops.forward"):
        counts = fwd.process(messages(alert("x1", fingerprint="fp-x"), alert("x2", fingerprint="fp-y")))
    assert counts["alertmanager_rejected"] == 1 and counts["alertmanager_delivered"] == 1
    assert counts["webhook_rejected"] == 1 and counts["webhook_delivered"] == 1
    assert len(receiver.on(AM_PATH)) == 3 and len(receiver.on("/hooks/alerts")) == 2  # no retries
    assert consumer.commits == [[(0, 2)]]  # the stream goes on
    rejected = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(rejected) == 2
    assert "alertmanager" in rejected[0].getMessage() and "x1" in rejected[0].getMessage()
    assert "HTTP 400: start time must be before end time" in rejected[0].getMessage()
    assert "webhook" in rejected[1].getMessage() and "x1" in rejected[1].getMessage()
    # Only the accepted one is kept alive.
    assert list(fwd.targets[0].firing) == ["fp-y"]


def test_secrets_are_not_in_logs(caplog):
    token, password, key = "tok-VERY-secret", "pw-VERY-secret", "T000/B000/KEY-VERY-secret"
    with Receiver() as receiver:
        echo = lambda request_path: b"you sent " + request_path.encode()
        receiver.answer(f"/services/{key}", (503, {}, echo(f"/services/{key} Bearer {token}")),
                        (400, {}, echo(f"/services/{key} {token}")))
        basic = base64.b64encode(f"admin:{password}".encode()).decode()
        receiver.answer(AM_PATH, (500, {}, f"Authorization: Basic {basic}".encode()), (400, {}, password.encode()))
        settings = Settings(
            alertmanager_url=f"http://admin:{password}@127.0.0.1:{receiver.port}",
            alert_webhook_url=f"{receiver.url}/services/{key}", alert_webhook_token=token,
        )
        targets = build_targets(settings)
        for target in targets:
            target.retry_initial = 0.01
        fwd = AlertForwarder(Settings(), targets, consumer=FakeConsumer())
        with caplog.at_level(logging.DEBUG):
            fwd.process(messages(alert("s1")))
        am_request = receiver.on(AM_PATH)[0]
        assert am_request.headers["Authorization"] == f"Basic {basic}"  # the password is used...
        assert receiver.on(f"/services/{key}")[0].headers["Authorization"] == f"Bearer {token}"
    text = caplog.text + repr(settings) + str(settings.model_dump())
    for secret in (token, password, key, basic):
        assert secret not in text  # ...and never shown
    assert f"http://127.0.0.1:{receiver.port}" in caplog.text  # the target is named by its origin
    assert "HTTP 400" in caplog.text


def test_bad_settings_do_not_show_the_secret():
    from streams.errors import ConfigError

    for url in ("ftp://user:hunter2@example.com/key", "http://user:hunter2@example.com:99999/key"):
        with pytest.raises(ConfigError) as raised:
            build_targets(Settings(alert_webhook_url=url))
        assert "hunter2" not in str(raised.value) and "TRACKSIDE_ALERT_WEBHOOK_URL" in str(raised.value)
    with pytest.raises(ConfigError, match="TRACKSIDE_ALERT_GENERATOR_URL"):
        build_targets(Settings(alert_webhook_url="http://x/", alert_generator_url="http://x/{nope}"))


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("TRACKSIDE_ALERTMANAGER_URL", "http://am:9093/")
    monkeypatch.setenv("TRACKSIDE_ALERT_WEBHOOK_URL", "https://hooks.example/x")
    monkeypatch.setenv("TRACKSIDE_ALERT_WEBHOOK_TOKEN", "t")
    monkeypatch.setenv("TRACKSIDE_ALERTMANAGER_RESEND_SECONDS", "0")
    am, hook = build_targets(Settings())
    assert am.endpoint.url == "http://am:9093/api/v2/alerts" and not am.needs_history
    assert hook.endpoint.url == "https://hooks.example/x" and hook.endpoint.headers == {"Authorization": "Bearer t"}
    monkeypatch.delenv("TRACKSIDE_ALERTMANAGER_URL")
    monkeypatch.delenv("TRACKSIDE_ALERT_WEBHOOK_URL")
    assert build_targets(Settings()) == []


def test_not_alerts_and_consumer_errors_are_skipped_and_committed(receiver, caplog):
    consumer = FakeConsumer()
    fwd = forwarder(receiver, consumer=consumer)
    batch = [
        FakeMessage(b"not json", 0),
        FakeMessage(orjson.dumps({"alert_id": "z", "status": "maybe"}), 1),
        FakeMessage(orjson.dumps(alert("ok1")), 2),
        FakeMessage(b"", 3, partition=1, error=KafkaError(KafkaError._PARTITION_EOF)),
        FakeMessage(orjson.dumps(alert("ok2", fingerprint="fp-2")), 7, partition=1),
    ]
    with caplog.at_level(logging.INFO, logger="streams.ops.forward"):
        counts = fwd.process(batch)
    assert counts["invalid"] == 2 and counts["webhook_delivered"] == 2
    assert [request.headers["Idempotency-Key"] for request in receiver.on("/hooks/alerts")] == ["ok1", "ok2"]
    assert consumer.commits == [[(0, 3), (1, 8)]]
    assert "trackside.alerts:0:0 is not an alert" in caplog.text


def test_stop_while_retrying_leaves_the_batch_uncommitted(receiver):
    receiver.answer("/hooks/alerts", *[503] * 100)
    consumer = FakeConsumer()
    fwd = forwarder(receiver, consumer=consumer)
    stop = threading.Event()
    fwd._stop = stop
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(Stopped):
        fwd.process(messages(alert("p1")))
    assert time.monotonic() - started < 2
    assert consumer.commits == []


def test_restart_replays_below_the_committed_offset_and_reposts_what_fires(receiver):
    """After a restart the partition is read from the start: what is below the committed
    offset is not delivered again, but the alerts still firing are re-posted to Alertmanager."""
    consumer = FakeConsumer(committed={0: 3})
    fwd = forwarder(receiver, consumer=consumer)
    fwd._on_assign(consumer, [TopicPartition(TOPIC, 0)])
    assert [(tp.partition, tp.offset) for tp in consumer.assigned] == [(0, OFFSET_BEGINNING)]
    old = messages(
        alert("o1", fingerprint="fp-a"), alert("o2", fingerprint="fp-b"),
        alert("o3", "resolved", fingerprint="fp-a", ts=T0 + 1000, action=""),
    )
    counts = fwd.process(old + messages(alert("n1", fingerprint="fp-c"), start=3))
    assert counts["replayed"] == 3 and counts["webhook_delivered"] == 1
    assert [r.headers["Idempotency-Key"] for r in receiver.on("/hooks/alerts")] == ["n1"]
    assert [a["annotations"]["alert_id"] for a in receiver.am_alerts()] == ["n1"]
    assert consumer.commits == [[(0, 4)]]
    fwd._tick()  # the replay is done: the firing ones are re-posted, the resolved one is not
    reposted = receiver.on(AM_PATH)[-1].json()
    assert sorted(a["labels"]["fingerprint"] for a in reposted) == ["fp-b", "fp-c"]
    assert all(parse_time(a["endsAt"]) > time.time() * 1000 for a in reposted)
    fwd._tick()  # not due again yet
    assert len(receiver.on(AM_PATH)) == 2
    # A replayed batch alone commits nothing (never move a committed offset back).
    consumer.commits.clear()
    fwd._on_assign(consumer, [TopicPartition(TOPIC, 0)])
    fwd.process(old)
    assert consumer.commits == []


def test_resend_failure_does_not_block_and_revoked_partitions_are_forgotten(receiver):
    fwd = forwarder(receiver, consumer=FakeConsumer())
    fwd.process(messages(alert("k1", fingerprint="fp-k")) + messages(alert("k2", fingerprint="fp-l"), partition=1))
    am = fwd.targets[0]
    am._next_resend = 0
    receiver.answer(AM_PATH, 503)
    fwd._tick()  # one attempt, no backoff loop
    assert len(receiver.on(AM_PATH)) == 2
    fwd._on_revoke(None, [TopicPartition(TOPIC, 1)])
    assert list(am.firing) == ["fp-k"]


def test_decode_and_rfc3339():
    assert decode(orjson.dumps(alert("d1"))) is not None
    assert decode(b"[]") is None and decode(None) is None
    assert decode(orjson.dumps({**alert("d2"), "ts": True})) is None
    assert decode(json.dumps({**alert("d3"), "ts": 10**20}).encode()) is None
    assert rfc3339(T0 + 7) == "2024-05-01T12:00:00.007Z"


def test_no_target_is_a_config_error():
    from streams.errors import ConfigError

    with pytest.raises(ConfigError):
        AlertForwarder(Settings(), [])
