"""Faust's aiokafka transport: a configurable consumer long-poll wait, and the producer's turns.

Faust creates its worker consumer with a fixed ``fetch_max_wait_ms=1500``.
Apache Kafka answers a fetch as soon as data arrives, so there the value only
bounds idle polls. The embedded broker (tansu) holds every fetch for the full
wait, which would leave each request sitting in the broker for about half a
second; the local stack therefore sets ``STREAMRANK_FETCH_MAX_WAIT_MS`` to a
few milliseconds. This subclass is the one place that setting takes effect.
"""

from __future__ import annotations

import asyncio
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka

# Event-loop turns aiokafka's sender task takes to write a message handed to it: waking,
# draining its batches, starting the produce request. One more, in case a version adds one.
PRODUCER_TURNS = 4


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


async def let_producer_send() -> None:
    """Give the event loop the turns in which aiokafka writes what was just sent.

    ``send`` only queues a message; the producer's own task writes it to the broker a few
    turns of the loop later. An agent with the next message already waiting would work on
    that first, and the message sent would wait for it (after a burst, for every one of
    them). Await this after a send whose latency counts.
    """
    for _ in range(PRODUCER_TURNS):
        await asyncio.sleep(0)
