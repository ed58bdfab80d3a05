"""The alert forwarder with the real embedded broker (Tansu) and a real local HTTP server.

Nothing about Kafka is faked: alerts are produced with confluent-kafka to
`trackside.alerts`, the forwarder consumes them in its group, commits, is stopped and
started again.
"""

from __future__ import annotations

import threading
from collections import Counter

import orjson
import pytest
from confluent_kafka import Producer
from pydantic import SecretStr
from streams.ops.broker import embedded_broker, ensure_topics, wait_for_broker
from streams.settings import Settings

from streams.ops.forward import GROUP, AlertForwarder, AlertmanagerTarget, WebhookTarget
from tests.alert_receiver import AM_PATH, Receiver
from tests.conftest import free_port, unconsumed
from tests.waiting import wait_until

HOOK = "/hook"
T0 = 1_714_564_800_000


@pytest.fixture
def settings(tmp_path):
    settings = Settings(data_dir=tmp_path, embedded_port=free_port(), partitions=2)
    broker = embedded_broker(settings)
    broker.start()
    try:
        wait_for_broker(settings)
        ensure_topics(settings)
        yield settings
    finally:
        broker.stop()


def alert(alert_id: str, fingerprint: str, status: str = "firing", ts: int = T0) -> dict:
    return {
        "alert_id": alert_id, "ts": ts, "kind": "drift", "severity": "warning", "status": status,
        "fingerprint": fingerprint, "agent_id": "coder", "agent_version": "v2", "run_id": "",
        "summary": f"drift {status}", "evidence": {"feature": "steps", "p_value": 0.001},
    }


def produce(settings: Settings, *alerts: dict) -> None:
    producer = Producer(settings.kafka_config)
    for body in alerts:
        producer.produce("trackside.alerts", key=body["fingerprint"].encode(), value=orjson.dumps(body))
    assert producer.flush(15) == 0


class Running:
    """A forwarder in a thread: started, then stopped the way `trackside up` would."""

    def __init__(self, settings: Settings, receiver: Receiver, resend: float) -> None:
        targets = [
            AlertmanagerTarget(receiver.url, resend_seconds=resend, retry_initial=0.05),
            WebhookTarget(receiver.url + HOOK, "token", retry_initial=0.05),
        ]
        self.forwarder = AlertForwarder(settings, targets, poll_seconds=0.2)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.forwarder.run(self.stop)
        except BaseException as error:  # noqa: BLE001 (reported by close)
            self.error = error

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        assert self.error is None, self.error


def wait_until_forwarded(settings: Settings) -> None:
    """Wait until the forwarder has committed every alert on the topic: it posted all it will."""
    wait_until(lambda: unconsumed(settings.kafka_config, GROUP, "trackside.alerts"), 30,
               "the forwarder to commit every alert", done=lambda lags: not lags)


def hook_ids(receiver: Receiver) -> list[str]:
    return [request.headers["Idempotency-Key"] for request in receiver.on(HOOK)]


def test_restart_delivers_new_alerts_once(settings):
    """Resend off: the plain path, resuming at the committed offsets."""
    first = [alert(f"a{i}", f"fp-{i % 3}") for i in range(6)]
    second = [alert(f"b{i}", f"fp-{i % 3}", "resolved", T0 + 60_000) for i in range(3)]
    with Receiver() as receiver:
        produce(settings, *first)
        running = Running(settings, receiver, resend=0)
        try:
            wait_until(lambda: hook_ids(receiver), 60, "6 webhook posts", done=lambda ids: len(ids) >= 6)
        finally:
            running.close()
        assert Counter(hook_ids(receiver)) == Counter(body["alert_id"] for body in first)

        produce(settings, *second)
        running = Running(settings, receiver, resend=0)
        try:
            wait_until(lambda: hook_ids(receiver), 60, "9 webhook posts", done=lambda ids: len(ids) >= 9)
            # A re-delivery of the first batch would come before the commit of the last alert.
            wait_until_forwarded(settings)
        finally:
            running.close()

    expected = Counter(body["alert_id"] for body in first + second)
    assert Counter(hook_ids(receiver)) == expected  # every alert once, none again
    assert Counter(posted["annotations"]["alert_id"] for posted in receiver.am_alerts()) == expected
    resolved = [posted for posted in receiver.am_alerts() if posted["annotations"]["alert_id"].startswith("b")]
    assert all(posted["endsAt"] == "2024-05-01T12:01:00.000Z" for posted in resolved)


def test_restart_rebuilds_the_firing_alerts_without_delivering_them_again(settings):
    """Resend on (the default): after a restart the topic is read from the start to learn
    which alerts still fire; those are re-posted to Alertmanager to keep them alive, the
    resolved ones are not, and the webhook sees nothing old."""
    with Receiver() as receiver:
        produce(settings, alert("x1", "fp-a"), alert("x2", "fp-b"), alert("x3", "fp-a", "resolved", T0 + 1000))
        running = Running(settings, receiver, resend=60)
        try:
            wait_until(lambda: hook_ids(receiver), 60, "3 webhook posts", done=lambda ids: len(ids) >= 3)
        finally:
            running.close()
        before = len(receiver.on(AM_PATH))

        produce(settings, alert("y1", "fp-c"))
        running = Running(settings, receiver, resend=60)
        try:
            def reposted() -> set[str]:
                return {posted["labels"]["fingerprint"] for request in receiver.on(AM_PATH)[before:]
                        for posted in request.json()}

            wait_until(lambda: (hook_ids(receiver), reposted()), 60, "4 webhook posts and fp-b, fp-c re-posted",
                       done=lambda seen: len(seen[0]) >= 4 and seen[1] >= {"fp-b", "fp-c"})
            wait_until_forwarded(settings)
        finally:
            running.close()
        assert running.forwarder.stats["replayed"] == 3

    assert Counter(hook_ids(receiver)) == Counter(["x1", "x2", "x3", "y1"])
    after = [posted for request in receiver.on(AM_PATH)[before:] for posted in request.json()]
    assert {posted["labels"]["fingerprint"] for posted in after} == {"fp-b", "fp-c"}  # fp-a was resolved
    assert all("endsAt" in posted for posted in after)


def test_a_refusing_webhook_holds_back_no_alertmanager_delivery(settings):
    """One consumer group per target: the webhook's outage does not block Alertmanager."""
    from streams.ops.forward import run_forwarders

    with Receiver() as receiver:
        both = settings.model_copy(update={
            "alertmanager_url": SecretStr(receiver.url), "alertmanager_resend_seconds": 0.0,
            "alert_webhook_url": SecretStr(f"http://127.0.0.1:{free_port()}{HOOK}"),  # nobody listens
        })
        stop = threading.Event()
        thread = threading.Thread(target=run_forwarders, args=(both, stop), daemon=True)
        thread.start()
        try:
            def posted() -> list[str]:
                return sorted(a["annotations"]["alert_id"] for r in receiver.on(AM_PATH) for a in r.json())

            produce(settings, alert("a1", "f1"), alert("a2", "f2"))
            wait_until(posted, 30, "a1 and a2 posted", done=lambda ids: ids == ["a1", "a2"])
            # the webhook is still being retried with the first batch; later alerts reach Alertmanager
            produce(settings, alert("a3", "f3"))
            wait_until(posted, 30, "a1, a2 and a3 posted", done=lambda ids: ids == ["a1", "a2", "a3"])
        finally:
            stop.set()
            thread.join(30)
        assert not thread.is_alive()
