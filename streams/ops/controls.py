"""Issuing controls (SPEC §9) on `trackside.controls`: what `trackside stop / pause / resume` run."""

from __future__ import annotations

import orjson
from confluent_kafka import Producer

from streams.contracts import topics
from streams.contracts.controls import subject_of
from streams.errors import BrokerError
from streams.settings import Settings


def issue(settings: Settings, control: dict, timeout: float = 30.0) -> None:
    """Put `control` on the topic, keyed by its subject; returns once the broker has it
    (BrokerError if it refused it or did not answer in `timeout` seconds)."""
    failed: list[str] = []
    producer = Producer({**settings.kafka_config, "acks": "all", "client.id": "trackside-controls"})
    producer.produce(topics.CONTROLS.name, value=orjson.dumps(control), key=subject_of(control).encode(),
                     on_delivery=lambda error, _message: error is not None and failed.append(str(error)))
    if producer.flush(timeout) or failed:
        raise BrokerError(f"the control is not on {topics.CONTROLS.name}: "
                          f"{failed[0] if failed else f'no answer from the broker in {timeout:.0f} s'}")
