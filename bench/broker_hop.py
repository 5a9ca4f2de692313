"""The raw broker hop: one produce -> consume, with no app in between.

This is the floor for every end-to-end latency measured on the same broker and machine:
judge the worker's latency as a ratio to it, measured in the same run (DESIGN.md).

    python bench/broker_hop.py [--n 2000] [--rate 100] [--payload-bytes 512]

starts its own local broker and prints the distribution; `measure_raw_hop` is importable
for benchmarks that bring their own broker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import sys
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamrank.localstack import create_topic  # noqa: E402

# run id, sequence number, send time (perf_counter: producer and consumer share a process)
_HEADER = struct.Struct("!16sQd")


async def measure_raw_hop(
    bootstrap: str,
    topic: str,
    n: int = 2000,
    rate: float = 100.0,
    payload_bytes: int = 512,
    *,
    warmup: int = 20,
    new_topic: bool = True,
) -> list[float]:
    """Produce `n` messages at a steady `rate` per second; return each one's hop in ms.

    The hop is from just before `send()` to the moment the consumer's `getmany()` returns the
    message. The consumer is assigned partition 0 and positioned before the first message is
    sent, so no group join or rebalance is measured. The first `warmup` messages (connection
    set-up, first fetch) are sent but not counted.
    """
    if payload_bytes < _HEADER.size:
        raise ValueError(f"payload_bytes must be at least {_HEADER.size}")
    if new_topic:
        await create_topic(bootstrap, topic)
    run_id = os.urandom(16)
    total = warmup + n
    padding = b"x" * (payload_bytes - _HEADER.size)
    partition = TopicPartition(topic, 0)

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # tansu does not end a long poll when data arrives: every fetch waits out
        # fetch_max_wait_ms, so a long wait would be measured as hop latency. Apache Kafka
        # answers as soon as data arrives.
        fetch_max_wait_ms=5,
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await consumer.start()
    await producer.start()
    try:
        consumer.assign([partition])
        await consumer.position(partition)  # resolved now, not on the first fetch
        latencies: list[float] = []
        received = 0

        async def consume() -> None:
            nonlocal received
            while received < total:
                batches = await consumer.getmany(partition, timeout_ms=100)
                now = time.perf_counter()
                for message in batches.get(partition, []):
                    if message.value is None or len(message.value) < _HEADER.size:
                        continue
                    rid, seq, sent = _HEADER.unpack_from(message.value)
                    if rid != run_id:
                        continue  # an earlier run on the same topic
                    received += 1
                    if seq >= warmup:
                        latencies.append((now - sent) * 1000.0)

        consumer_task = asyncio.create_task(consume())
        try:
            start = time.perf_counter()
            for seq in range(total):
                delay = start + seq / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent = time.perf_counter()
                # send() only enqueues; awaiting the ack would throttle the steady rate.
                await producer.send(topic, _HEADER.pack(run_id, seq, sent) + padding, key=b"k")
            await producer.flush()
            await asyncio.wait_for(consumer_task, timeout=30.0)
        except TimeoutError:
            raise RuntimeError(f"only {received} of {total} messages came back") from None
        finally:
            consumer_task.cancel()
        return latencies
    finally:
        await producer.stop()
        await consumer.stop()


def main(argv: list[str] | None = None) -> None:
    from streamrank.localstack import Broker

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="messages measured")
    parser.add_argument("--rate", type=float, default=100.0, help="messages per second")
    parser.add_argument("--payload-bytes", type=int, default=512)
    args = parser.parse_args(argv)

    with Broker() as broker:
        latencies = asyncio.run(
            measure_raw_hop(
                broker.bootstrap,
                "bench-raw-hop",
                n=args.n,
                rate=args.rate,
                payload_bytes=args.payload_bytes,
            )
        )
    from bench._common import summarize

    stats = summarize(latencies)
    print(f"raw broker hop (tansu, aiokafka), {args.rate:g} msg/s, {args.payload_bytes} B")
    print(f"{'n':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8}")
    print(
        f"{int(stats['n']):>6} {stats['p50']:>8.2f} {stats['p90']:>8.2f} {stats['p99']:>8.2f} "
        f"{stats['max']:>8.2f} {stats['mean']:>8.2f}"
    )


if __name__ == "__main__":
    main()
