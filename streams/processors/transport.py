"""What Trackside changes of faust: its aiokafka transport with a short fetch wait (broker URL
scheme `trackside://`), and a worker that neither starts nor stops with a second's sleep.
Why: streams/processors/README.md, "The transport"."""

from __future__ import annotations

import asyncio

import faust
from faust.tables.manager import TableManager as FaustTableManager
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


class TableManager(FaustTableManager):
    async def on_start(self) -> None:
        # faust's sleeps a second first, for tables declared late; the app declares none
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


class Worker(faust.Worker):
    async def _sentinel_task(self) -> None:
        # mode's sleeps a second after the loop has stopped, once every task is gathered
        await asyncio.sleep(0.05)
