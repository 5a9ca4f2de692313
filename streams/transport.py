"""Faust's aiokafka transport with a configurable consumer long-poll wait.

Faust creates its worker consumer with a fixed ``fetch_max_wait_ms=1500``.
Apache Kafka answers a fetch as soon as data arrives, so there the value only
bounds idle polls. The embedded broker (tansu) holds every fetch for the full
wait, which would leave each request sitting in the broker for about half a
second; the local stack therefore sets ``STREAMRANK_FETCH_MAX_WAIT_MS`` to a
few milliseconds. This subclass is the one place that setting takes effect.
"""

from __future__ import annotations

from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads this attribute when the consumer starts its fetcher.
        consumer._fetch_max_wait_ms = self.app.fetch_max_wait_ms
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_aiokafka.Transport):
    """The aiokafka transport, with the consumer above."""

    Consumer = _Consumer
