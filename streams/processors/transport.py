"""faust's aiokafka transport with a short fetch wait (broker URL scheme `trackside://`).

faust hard-codes aiokafka's `fetch_max_wait_ms=1500`. Brokers that do not answer a fetch
as soon as data arrives (Tansu among them) then hold every hop through faust for up to
1.5 s; 50 ms keeps a processor's latency at tens of milliseconds for little extra polling.
Registered through the `faust.transports` entry point in pyproject.toml.
"""

from __future__ import annotations

from faust.transport.drivers import aiokafka as driver

FETCH_MAX_WAIT_MS = 50


class ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):  # noqa: ANN001, ANN202 (faust's signature)
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read by aiokafka when the consumer starts
        return consumer


class Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(driver.Transport):
    Consumer = Consumer
