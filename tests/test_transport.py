"""The producer's turns (streams.transport.let_producer_send) against the real broker."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streamrank.localstack import Broker, create_topic
from streams.transport import let_producer_send

RANKING_S = 0.5  # a long ranking that holds the event loop


class Reader(threading.Thread):
    """A consumer on its own thread and event loop: when did each value arrive?"""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic = bootstrap, topic
        self.arrived: dict[bytes, float] = {}
        self.ready, self.done = threading.Event(), threading.Event()

    def run(self) -> None:
        asyncio.run(self._read())

    async def _read(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=5,  # tansu does not end a long poll when data arrives
        )
        await consumer.start()
        try:
            consumer.assign([TopicPartition(self.topic, 0)])
            while not self.done.is_set():
                batches = await consumer.getmany(timeout_ms=20)
                for records in batches.values():
                    for record in records:
                        self.arrived[record.value] = time.monotonic()
                        self.ready.set()
        finally:
            await consumer.stop()


async def _sent_during_a_long_ranking(bootstrap: str, topic: str, turns: bool) -> float:
    """Seconds by which the message reached a reader before the ranking after its send ended
    (negative: after)."""
    await create_topic(bootstrap, topic)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    reader = Reader(bootstrap, topic)
    reader.start()
    try:
        await producer.send_and_wait(topic, b"warm-up", partition=0)
        assert await asyncio.to_thread(reader.ready.wait, 10)
        delivered = await producer.send(topic, b"result", partition=0)
        if turns:
            await let_producer_send()
        time.sleep(RANKING_S)  # the next request's ranking: the loop does nothing else
        ranking_ended = time.monotonic()
        await asyncio.wait_for(delivered, 10)
        deadline = time.monotonic() + 10
        while b"result" not in reader.arrived and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return ranking_ended - reader.arrived[b"result"]
    finally:
        reader.done.set()
        await asyncio.to_thread(reader.join, 10)
        await producer.stop()


@pytest.mark.parametrize("turns", [True, False], ids=["with turns", "without"])
def test_a_sent_result_leaves_before_the_next_ranking(
    broker: Broker, topic_prefix: str, turns: bool
) -> None:
    """With the turns, the result is on the broker while the loop is busy ranking the next
    request; without them, it leaves only when that ranking ends (what the turns are for)."""
    ahead = asyncio.run(
        _sent_during_a_long_ranking(broker.bootstrap, f"{topic_prefix}turns", turns)
    )
    if turns:
        assert ahead > RANKING_S / 2
    else:
        assert ahead < 0
