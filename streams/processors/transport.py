"""faust's aiokafka transport with a short fetch wait (broker URL scheme `trackside://`).
Why: streams/processors/README.md, "The transport"."""

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
