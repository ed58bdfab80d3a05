"""The alert forwarder: `trackside.alerts` to Prometheus Alertmanager and to a webhook.
What it posts, retries, commits and never logs: streams/ops/README.md, "The alert forwarder"."""

from __future__ import annotations

import base64
import functools
import http.client
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaException,
    TopicPartition,
)

from streams import telemetry
from streams.contracts import topics
from streams.errors import ConfigError
from streams.ingest.sink import consumer_config, without_errors
from streams.settings import Settings

log = logging.getLogger(__name__)

GROUP = "trackside-forwarder"
BATCH_MAX = 500
POLL_SECONDS = 0.5
RETRY_INITIAL_SECONDS = 0.5
# While a target keeps refusing, say so again at most this often.
RETRY_LOG_EVERY_S = 60.0
# Firing alerts re-posted to Alertmanager per request.
RESEND_CHUNK = 500
# A failed re-post is tried again after at most this long.
RESEND_RETRY_S = 10.0
USER_AGENT = "trackside-forwarder"
_MAX_TS_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


_GENERATOR_FIELDS = ("alert_id", "fingerprint", "kind", "agent_id", "agent_version", "run_id")


class Stopped(Exception):
    """The stop event was set while a target was being retried."""


# HTTP


@dataclass(frozen=True)
class Endpoint:
    """Where to POST, with its credentials as headers; `origin` is what logs may show."""

    url: str
    origin: str
    headers: dict[str, str]
    secrets: tuple[str, ...]

    @classmethod
    def parse(cls, url: str, *, path: str | None = None, token: str = "") -> Endpoint:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{host}:{parts.port}" if parts.port else host
        full_path = parts.path if path is None else path
        headers: dict[str, str] = {}
        secrets = []
        if token:
            headers["Authorization"] = f"Bearer {token}"
            secrets.append(token)
        elif parts.username is not None:
            user, password = unquote(parts.username), unquote(parts.password or "")
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            secrets += [password, headers["Authorization"].split()[1]]
        if parts.password:
            secrets.append(parts.password)
        # A webhook's path or query may be its key: never shown either.
        for part in (parts.path, parts.query):
            if len(part) >= 8:
                secrets.append(part)
        return cls(
            url=urlunsplit((parts.scheme, netloc, full_path, parts.query, "")),
            origin=f"{parts.scheme}://{netloc}",
            headers=headers,
            secrets=tuple(secret for secret in secrets if secret),
        )

    def scrub(self, text: str | bytes, limit: int = 300) -> str:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        text = " ".join(text.split())
        return text if len(text) <= limit else text[:limit] + "..."


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: they would carry the credentials elsewhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


@dataclass
class Answer:
    """A target's answer to one request: `status` None when there was no HTTP answer."""

    status: int | None
    body: bytes = b""
    retry_after: float | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status >= 500 or self.status in (408, 429)


def _retry_after(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else None
    except ValueError:  # an HTTP date: use our own backoff
        return None
    return seconds if seconds is not None and seconds >= 0 else None


def post(endpoint: Endpoint, body: bytes, headers: dict[str, str], timeout: float) -> Answer:
    """One POST, whatever happens: an Answer, never an exception for network trouble."""
    request = urllib.request.Request(
        endpoint.url, data=body, method="POST",
        headers={"Content-Type": "application/json", "User-Agent": USER_AGENT, **endpoint.headers, **headers},
    )
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return Answer(response.status, response.read(4096))
    except urllib.error.HTTPError as error:
        try:
            text = error.read(4096)
        except (OSError, http.client.HTTPException):
            text = b""
        finally:
            error.close()
        return Answer(error.code, text, _retry_after(error.headers.get("Retry-After") if error.headers else None))
    except (OSError, http.client.HTTPException) as error:  # URLError, refused, reset, timeout, bad status line
        reason = getattr(error, "reason", None) or error
        return Answer(None, error=f"{type(reason).__name__}: {reason}")


# Alerts


def decode(value: bytes | None) -> dict | None:
    """The alert of a message, or None when it is not one (SPEC §6)."""
    try:
        alert = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return None
    if not isinstance(alert, dict):
        return None
    ts = alert.get("ts")
    if (
        not isinstance(alert.get("alert_id"), str) or not alert["alert_id"]
        or not isinstance(alert.get("fingerprint"), str) or not alert["fingerprint"]
        or not isinstance(alert.get("kind"), str) or not alert["kind"]
        or alert.get("status") not in ("firing", "resolved")
        or isinstance(ts, bool) or not isinstance(ts, (int, float)) or not 0 <= ts <= _MAX_TS_MS
    ):
        return None
    return alert


def rfc3339(ms: float) -> str:
    """Epoch milliseconds as RFC 3339 UTC with milliseconds: 2024-05-01T12:00:00.000Z."""
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Item:
    """One message of the batch: its place, its bytes, its alert; `replay`: below the committed offset."""

    topic: str
    partition: int
    offset: int
    raw: bytes
    alert: dict
    replay: bool = False


# Targets


class HttpTarget:
    """What every target shares: an endpoint, retries with backoff, rate-limited logging."""

    name = "target"

    def __init__(self, endpoint: Endpoint, *, timeout: float = 10.0,
                 retry_initial: float = RETRY_INITIAL_SECONDS, retry_max: float = 30.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.retry_initial = retry_initial
        self.retry_max = max(retry_max, retry_initial)
        self._stop = threading.Event()
        # Set by the forwarder: waits `seconds`, doing the other targets' housekeeping,
        # and raises Stopped when the forwarder stops.
        self.wait: Callable[[float], None] = self._sleep
        self._failures = 0
        self._last_warning = 0.0

    @property
    def display(self) -> str:
        return f"{self.name} {self.endpoint.origin}"

    @property
    def needs_history(self) -> bool:
        """True when the target needs the alerts below the committed offsets after a restart."""
        return False

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise Stopped

    def _request(self, body: bytes, headers: dict[str, str] | None = None) -> Answer:
        started = time.monotonic()
        answer = post(self.endpoint, body, headers or {}, self.timeout)
        telemetry.FORWARDER_REQUEST_SECONDS.labels(self.name).observe(time.monotonic() - started)
        return answer

    def describe(self, answer: Answer) -> str:
        if answer.status is None:
            return self.endpoint.scrub(answer.error)
        text = self.endpoint.scrub(answer.body)
        return f"HTTP {answer.status}" + (f": {text}" if text else "")

    def send(self, body: bytes, headers: dict[str, str] | None = None) -> Answer:
        """POST until the target answers something other than a refusal; backs off meanwhile."""
        delay = self.retry_initial
        while True:
            answer = self._request(body, headers)
            if not answer.retryable:
                self._recovered()
                return answer
            self._failures += 1
            telemetry.FORWARDER_RETRIES.labels(self.name).inc()
            telemetry.FORWARDER_RETRYING.labels(self.name).set(1)
            pause = delay if answer.retry_after is None else min(max(answer.retry_after, delay), self.retry_max)
            wall = time.monotonic()
            if self._failures == 1 or wall - self._last_warning >= RETRY_LOG_EVERY_S:
                self._last_warning = wall
                log.warning("%s refuses (%s); attempt %d, retrying in %.2g s (backoff up to %g s)",
                            self.display, self.describe(answer), self._failures, pause, self.retry_max)
            self.wait(pause)
            delay = min(delay * 2, self.retry_max)

    def _recovered(self) -> None:
        if self._failures:
            log.warning("%s answers again after %d refused attempts", self.display, self._failures)
            self._failures = 0
            telemetry.FORWARDER_RETRYING.labels(self.name).set(0)

    def _rejected(self, alert: dict, answer: Answer) -> None:
        telemetry.FORWARDER_DELIVERIES.labels(self.name, "rejected").inc()
        log.error("%s rejected alert %s (kind=%s status=%s fingerprint=%s) with %s: skipped, not retried",
                  self.display, alert.get("alert_id"), alert.get("kind"), alert.get("status"),
                  alert.get("fingerprint"), self.describe(answer))

    # Hooks of the forwarder; only Alertmanager keeps state.

    def deliver(self, items: Sequence[Item]) -> list[bool]:
        raise NotImplementedError

    def replay(self, items: Sequence[Item]) -> None:
        """Learn from alerts delivered before the last commit, without sending them."""

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop what was learnt from partitions this forwarder no longer owns."""

    def partition_ready(self, partition: int) -> None:
        """The replay of a partition is done."""

    def tick(self, replaying: set[int]) -> None:
        """Periodic work between batches; `replaying`: partitions whose replay is not done."""


class WebhookTarget(HttpTarget):
    """POSTs each alert as it is, with `Idempotency-Key: <alert_id>`."""

    name = "webhook"

    def __init__(self, url: str, token: str = "", **options: Any) -> None:
        super().__init__(Endpoint.parse(url, token=token), **options)

    def deliver(self, items: Sequence[Item]) -> list[bool]:
        results = []
        for item in items:
            answer = self.send(item.raw, {"Idempotency-Key": item.alert["alert_id"]})
            if answer.ok:
                telemetry.FORWARDER_DELIVERIES.labels(self.name, "delivered").inc()
            else:
                self._rejected(item.alert, answer)
            results.append(answer.ok)
        return results


@dataclass
class _Firing:
    partition: int
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: float  # epoch ms
    generator_url: str = ""
    alert: dict = field(default_factory=dict)


class AlertmanagerTarget(HttpTarget):
    """Alertmanager API v2: posts, resolves with endsAt, and keeps firing alerts alive."""

    name = "alertmanager"

    def __init__(self, url: str, *, resend_seconds: float = 60.0, generator_url: str = "", **options: Any) -> None:
        parts = urlsplit(url)
        path = parts.path.rstrip("/")
        if not path.endswith("/api/v2/alerts"):
            path += "/api/v2/alerts"
        super().__init__(Endpoint.parse(url, path=path), **options)
        self.resend_seconds = resend_seconds
        self.generator_url = generator_url
        self.firing: dict[str, _Firing] = {}  # by fingerprint
        # What is delivered is fresh: the first re-post is due one interval from now
        # (or at once when a replay after a restart found firing alerts).
        self._next_resend = time.monotonic() + resend_seconds
        self._resend_failures = 0

    @property
    def needs_history(self) -> bool:
        return self.resend_seconds > 0

    # The shape of a postable alert.

    @staticmethod
    def labels(alert: dict) -> dict[str, str]:
        labels = {
            "alertname": f"trackside_{alert['kind']}",
            "severity": alert.get("severity"),
            "agent_id": alert.get("agent_id"),
            "agent_version": alert.get("agent_version"),
            "fingerprint": alert["fingerprint"],
            "run_id": alert.get("run_id"),
        }
        # Alertmanager drops empty labels; so do we, so that they never differ.
        return {key: str(value) for key, value in labels.items() if value not in (None, "")}

    @staticmethod
    def annotations(alert: dict) -> dict[str, str]:
        evidence = alert.get("evidence")
        annotations = {
            "summary": alert.get("summary"),
            "evidence": orjson.dumps(evidence, option=orjson.OPT_SORT_KEYS).decode() if evidence is not None else "",
            "action": alert.get("action"),
            "alert_id": alert["alert_id"],
        }
        return {key: str(value) for key, value in annotations.items() if value not in (None, "")}

    def _generator(self, alert: dict) -> str:
        if not self.generator_url:
            return ""
        return self.generator_url.format(**{name: quote(str(alert.get(name) or ""), safe="") for name in _GENERATOR_FIELDS})

    def _resend_ends_at(self, starts_at: float, now: int) -> float:
        return max(now, starts_at) + 4 * self.resend_seconds * 1000

    def postable(self, alert: dict, firing: dict[str, _Firing], partition: int, now: int) -> tuple[dict, _Firing | None]:
        """The postable alert for `alert` given the firing ones; and the new firing entry (None: resolved)."""
        known = firing.get(alert["fingerprint"])
        annotations = self.annotations(alert)
        generator = self._generator(alert)
        if alert["status"] == "firing":
            entry = _Firing(partition, self.labels(alert), annotations, alert["ts"], generator, alert)
            if known is not None and known.labels == entry.labels:
                entry.starts_at = min(known.starts_at, entry.starts_at)  # still the same episode
            body = {"labels": entry.labels, "annotations": annotations, "startsAt": rfc3339(entry.starts_at)}
            if self.resend_seconds > 0:
                body["endsAt"] = rfc3339(self._resend_ends_at(entry.starts_at, now))
            if generator:
                body["generatorURL"] = generator
            return body, entry
        # Resolved: the labels it fired with, so that Alertmanager finds it; ends now at the latest.
        ends_at = min(alert["ts"], now)
        labels = known.labels if known is not None else self.labels(alert)
        starts_at = min(known.starts_at if known is not None else ends_at, ends_at)
        body = {"labels": labels, "annotations": annotations, "startsAt": rfc3339(starts_at), "endsAt": rfc3339(ends_at)}
        if generator:
            body["generatorURL"] = generator
        return body, None

    @staticmethod
    def _apply(firing: dict[str, _Firing], alert: dict, entry: _Firing | None) -> None:
        if entry is None:
            firing.pop(alert["fingerprint"], None)
        else:
            firing[alert["fingerprint"]] = entry

    # Hooks.

    def deliver(self, items: Sequence[Item]) -> list[bool]:
        if not items:
            return []
        now = now_ms()
        staged = dict(self.firing)
        bodies = []
        for item in items:
            body, entry = self.postable(item.alert, staged, item.partition, now)
            self._apply(staged, item.alert, entry)
            bodies.append(body)
        answer = self.send(orjson.dumps(bodies))
        if answer.ok:
            self.firing = staged
            telemetry.FORWARDER_DELIVERIES.labels(self.name, "delivered").inc(len(items))
            self._gauge()
            return [True] * len(items)
        if len(items) == 1:
            self._rejected(items[0].alert, answer)
            return [False]
        # Alertmanager stored the valid ones and refused the others: find those, one by one.
        log.warning("%s refused a request of %d alerts (%s); posting them one by one",
                    self.display, len(items), self.describe(answer))
        results = []
        for item in items:
            body, entry = self.postable(item.alert, self.firing, item.partition, now_ms())
            answer = self.send(orjson.dumps([body]))
            if answer.ok:
                self._apply(self.firing, item.alert, entry)
                telemetry.FORWARDER_DELIVERIES.labels(self.name, "delivered").inc()
            else:
                self._rejected(item.alert, answer)
            results.append(answer.ok)
        self._gauge()
        return results

    def replay(self, items: Sequence[Item]) -> None:
        for item in items:
            _, entry = self.postable(item.alert, self.firing, item.partition, now_ms())
            self._apply(self.firing, item.alert, entry)
        if items:
            self._gauge()

    def forget(self, partitions: Iterable[int]) -> None:
        gone = set(partitions)
        self.firing = {key: entry for key, entry in self.firing.items() if entry.partition not in gone}
        self._gauge()

    def partition_ready(self, partition: int) -> None:
        self._next_resend = 0.0  # re-post what the replay found, now

    def tick(self, replaying: set[int]) -> None:
        """Re-post the firing alerts when due: one attempt, never blocking the stream."""
        if self.resend_seconds <= 0 or time.monotonic() < self._next_resend:
            return
        entries = [(key, entry) for key, entry in self.firing.items() if entry.partition not in replaying]
        if not entries:
            self._next_resend = time.monotonic() + self.resend_seconds
            return
        now = now_ms()
        failed = None
        for start in range(0, len(entries), RESEND_CHUNK):
            chunk = entries[start:start + RESEND_CHUNK]
            bodies = [self._resend_body(entry, now) for _, entry in chunk]
            answer = self._request(orjson.dumps(bodies))
            if answer.ok:
                continue
            if answer.retryable:
                failed = answer
                break
            # Refused for good: find which ones and stop re-posting those.
            for key, entry in chunk:
                single = self._request(orjson.dumps([self._resend_body(entry, now)]))
                if not single.ok and not single.retryable:
                    log.error("%s refuses the firing alert %s on re-post (%s); no longer re-posted",
                              self.display, entry.alert.get("alert_id"), self.describe(single))
                    self.firing.pop(key, None)
        if failed is not None:
            self._resend_failures += 1
            if self._resend_failures == 1:
                log.warning("%s: re-posting %d firing alerts failed (%s); trying again in %.0f s",
                            self.display, len(entries), self.describe(failed), min(RESEND_RETRY_S, self.resend_seconds))
            self._next_resend = time.monotonic() + min(RESEND_RETRY_S, self.resend_seconds)
        else:
            if self._resend_failures:
                log.warning("%s: firing alerts re-posted again after %d failed attempts", self.display,
                            self._resend_failures)
            self._resend_failures = 0
            self._next_resend = time.monotonic() + self.resend_seconds
        self._gauge()

    def _resend_body(self, entry: _Firing, now: int) -> dict:
        body = {"labels": entry.labels, "annotations": entry.annotations, "startsAt": rfc3339(entry.starts_at),
                "endsAt": rfc3339(self._resend_ends_at(entry.starts_at, now))}
        if entry.generator_url:
            body["generatorURL"] = entry.generator_url
        return body

    def _gauge(self) -> None:
        telemetry.FORWARDER_ACTIVE_ALERTS.set(len(self.firing))


def _check_url(variable: str, url: str) -> str:
    """The URL, or ConfigError naming the variable only: a validation error would quote the
    input, password and all."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (a bad port raises)
    except ValueError:
        raise ConfigError(f"{variable}: bad port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{variable}: must be an http:// or https:// URL with a host")
    return url


def build_targets(settings: Settings) -> list[HttpTarget]:
    """The targets the settings configure (none when no URL is set); ConfigError on a bad setting."""
    template = settings.alert_generator_url
    if template:
        try:
            template.format(**{name: "x" for name in _GENERATOR_FIELDS})
        except (KeyError, IndexError, ValueError) as error:
            raise ConfigError(f"TRACKSIDE_ALERT_GENERATOR_URL: unknown placeholder or bad template ({error!r}); "
                              f"known: {', '.join(f'{{{name}}}' for name in _GENERATOR_FIELDS)}") from None
    options = {"timeout": settings.alert_http_timeout_seconds, "retry_max": settings.alert_retry_max_seconds}
    targets: list[HttpTarget] = []
    if settings.alertmanager_url.get_secret_value().strip():
        url = _check_url("TRACKSIDE_ALERTMANAGER_URL", settings.alertmanager_url.get_secret_value().strip())
        targets.append(AlertmanagerTarget(
            url, resend_seconds=settings.alertmanager_resend_seconds,
            generator_url=settings.alert_generator_url, **options))
    if settings.alert_webhook_url.get_secret_value().strip():
        url = _check_url("TRACKSIDE_ALERT_WEBHOOK_URL", settings.alert_webhook_url.get_secret_value().strip())
        targets.append(WebhookTarget(
            url, settings.alert_webhook_token.get_secret_value(), **options))
    return targets


# The forwarder


def run_forwarders(settings: Settings, stop: threading.Event, restart_after: float = 5.0) -> None:
    """One forwarder per configured target, each in its own thread and consumer group
    (`trackside-forwarder-<target>`), so a target that refuses holds back no other; each is
    restarted (its state rebuilt from the topic) if it fails. Returns once `stop` is set."""

    def forward(name: str) -> None:
        while not stop.is_set():
            try:
                (target,) = [t for t in build_targets(settings) if t.name == name]
                AlertForwarder(settings, [target], group=f"{GROUP}-{name}").run(stop)
            except Exception:
                log.exception("the %s forwarder failed; restarting it in %.0f s", name, restart_after)
                stop.wait(restart_after)

    threads = [threading.Thread(target=forward, args=(target.name,), name=f"forward-{target.name}", daemon=True)
               for target in build_targets(settings)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class AlertForwarder:
    """Consumes `trackside.alerts` and delivers every alert to its targets; see streams/ops/README.md."""

    def __init__(self, settings: Settings, targets: Sequence[HttpTarget], *, group: str = GROUP,
                 consumer: Any = None, batch_max: int = BATCH_MAX, poll_seconds: float = POLL_SECONDS) -> None:
        if not targets:
            raise ConfigError("no alert target: set TRACKSIDE_ALERTMANAGER_URL and/or TRACKSIDE_ALERT_WEBHOOK_URL")
        names = [target.name for target in targets]
        if len(set(names)) != len(names):
            raise ConfigError(f"two targets with one name: {names}")
        self.settings = settings
        self.targets = list(targets)
        self.group = group
        self.batch_max = batch_max
        self.poll_seconds = poll_seconds
        self.stats: Counter[str] = Counter()
        self._consumer = consumer
        self._stop = threading.Event()
        for target in self.targets:
            target.wait = functools.partial(self._pause, target)
        self._rewind = any(target.needs_history for target in self.targets)
        # Per assigned partition: the committed offset at assignment (below: replay only).
        self._skip_below: dict[int, int] = {}
        # Partitions whose replay is not done yet: their firing alerts are not re-posted.
        self._replaying: set[int] = set()
        # Per partition: the offset last committed (never commit below it).
        self._committed: dict[int, int] = {}

    # The loop.

    def run(self, stop: threading.Event) -> None:
        """Consume and deliver until `stop` is set."""
        self._stop = stop
        if self._consumer is None:
            self._consumer = Consumer(consumer_config(self.settings, self.group))
        consumer = self._consumer
        consumer.subscribe([topics.ALERTS.name], on_assign=self._on_assign, on_revoke=self._on_revoke)
        log.info("forwarding %s (group %s) to %s", topics.ALERTS.name, self.group,
                 ", ".join(target.display for target in self.targets))
        try:
            while not stop.is_set():
                messages = consumer.consume(self.batch_max, self.poll_seconds)
                if messages:
                    self.process(messages)
                elif self._replaying:
                    self._caught_up()
                self._tick()
        except Stopped:
            log.info("forwarder stopped while a target was refusing: the batch in hand is delivered at the next start")
        finally:
            consumer.close()
            log.info("forwarder stopped: %s", {key: value for key, value in self.stats.items() if value} or "nothing forwarded")

    def process(self, messages: Sequence[Any]) -> dict[str, int]:
        """Deliver one poll's messages to every target, then commit their offsets.

        Returns this batch's counts: `<target>_delivered`, `<target>_rejected`, `invalid`, `replayed`.
        """
        counts: Counter[str] = Counter({"invalid": 0, "replayed": 0})
        for target in self.targets:
            counts[f"{target.name}_delivered"] = counts[f"{target.name}_rejected"] = 0
        items: list[Item] = []
        offsets: dict[tuple[str, int], int] = {}
        for message in without_errors(messages):
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            offsets[(topic, partition)] = max(offsets.get((topic, partition), -1), offset + 1)
            replay = offset < self._skip_below.get(partition, -1)
            if partition in self._replaying and offset >= self._skip_below.get(partition, 0) - 1:
                self._replay_done(partition)
            alert = decode(message.value())
            if alert is None:
                if not replay:
                    counts["invalid"] += 1
                    telemetry.FORWARDER_INVALID.inc()
                    log.error("%s:%d:%d is not an alert (SPEC §6): skipped", topic, partition, offset)
                continue
            items.append(Item(topic, partition, offset, message.value(), alert, replay))
        replayed = [item for item in items if item.replay]
        fresh = [item for item in items if not item.replay]
        counts["replayed"] = len(replayed)
        for target in self.targets:
            target.replay(replayed)
        for target in self.targets:
            results = target.deliver(fresh)
            counts[f"{target.name}_delivered"] += sum(results)
            counts[f"{target.name}_rejected"] += len(results) - sum(results)
        self._commit(offsets)
        self.stats.update(counts)
        if fresh or counts["invalid"]:
            log.info("forwarded %d alerts: %s", len(fresh), ", ".join(
                f"{target.name} {counts[f'{target.name}_delivered']} delivered"
                + (f" {counts[f'{target.name}_rejected']} rejected" if counts[f"{target.name}_rejected"] else "")
                for target in self.targets) + (f"; {counts['invalid']} not alerts" if counts["invalid"] else ""))
        return dict(counts)

    def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        commit = [TopicPartition(topic, partition, offset) for (topic, partition), offset in offsets.items()
                  if offset > self._committed.get(partition, -1)]
        if not commit or self._consumer is None:
            return
        try:
            self._consumer.commit(offsets=commit, asynchronous=False)
        except KafkaException as error:
            # The batch comes again after a rebalance or restart: harmless, see streams/ops/README.md.
            log.warning("offset commit failed, the batch will be delivered again: %s", error)
            self.stats["commit_failures"] += 1
            return
        for tp in commit:
            self._committed[tp.partition] = tp.offset

    # Waiting and housekeeping.

    def _pause(self, busy: HttpTarget, seconds: float) -> None:
        """Wait while `busy` is refused, doing the other targets' housekeeping; Stopped on stop."""
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._stop.wait(min(remaining, 1.0)):
                raise Stopped
            self._tick(busy)

    def _tick(self, busy: HttpTarget | None = None) -> None:
        for target in self.targets:
            if target is not busy:
                target.tick(self._replaying)

    # Partition assignment: rewind to rebuild the targets' state.

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._committed.pop(tp.partition, None)
        if not self._rewind:
            return  # start at the committed offsets
        try:
            committed = consumer.committed(partitions, timeout=15)
        except KafkaException as error:
            log.warning("cannot read the committed offsets (%s): starting at them, without the firing alerts "
                        "delivered before", error)
            return
        start = []
        for tp in committed:
            if tp.error is None and tp.offset >= 0:
                self._skip_below[tp.partition] = tp.offset
                self._committed[tp.partition] = tp.offset
                if tp.offset > 0:
                    self._replaying.add(tp.partition)
            start.append(TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING))
        consumer.assign(start)
        if self._replaying:
            log.info("reading %s from the start of partitions %s to learn the firing alerts",
                     topics.ALERTS.name, sorted(self._replaying))

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        gone = [tp.partition for tp in partitions]
        for partition in gone:
            self._skip_below.pop(partition, None)
            self._replaying.discard(partition)
            self._committed.pop(partition, None)
        for target in self.targets:
            target.forget(gone)

    def _replay_done(self, partition: int) -> None:
        self._replaying.discard(partition)
        for target in self.targets:
            target.partition_ready(partition)

    def _caught_up(self) -> None:
        # An empty poll: nothing more to read for now, so no replay is pending (e.g. the
        # message before the committed offset is gone with retention or was a control record).
        for partition in list(self._replaying):
            self._replay_done(partition)
