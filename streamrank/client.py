"""A reference search-layer client: produce requests and feedback, consume ranked results.

It is what a search layer does against streamrank, written once for the tests,
the benchmarks and the simulator: requests and interactions keyed by user id,
results matched back to their request by ``request_id``.

    async with SearchLayerClient("127.0.0.1:9092", topic_prefix="shop-") as client:
        result = await client.rank({"request_id": "r-1", "user_id": "u-1",
                                    "candidates": [{"item_id": "i-1"}, {"item_id": "i-2"}]})
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition


class SearchLayerClient:
    def __init__(
        self,
        bootstrap: str,
        topic_prefix: str = "",
        *,
        fetch_max_wait_ms: int = 5,
        linger_ms: int = 0,
        **client_kwargs: Any,
    ) -> None:
        """``client_kwargs`` go to both the producer and the consumer (aiokafka keyword
        arguments: ``security_protocol``, ``ssl_context``, ``sasl_*``... as
        ``streams.settings.Settings.kafka_auth()`` returns them)."""
        self.bootstrap = bootstrap
        self.prefix = topic_prefix
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, linger_ms=linger_ms, **client_kwargs
        )
        # See streams/transport.py: a short wait because the embedded broker holds long polls.
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=fetch_max_wait_ms,
            **client_kwargs,
        )
        self._pending: dict[str, asyncio.Future] = {}
        self.dead_letters: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.results: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader: asyncio.Task | None = None

    def topic(self, name: str) -> str:
        return self.prefix + name

    async def start(self) -> SearchLayerClient:
        await self._producer.start()
        await self._consumer.start()
        partitions = []
        for name in ("ranked-results", "dead-letters"):
            for _ in range(100):  # the worker creates its topics at start-up
                ids = self._consumer.partitions_for_topic(self.topic(name))
                if ids:
                    break
                await self._consumer._client.force_metadata_update()
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"topic {self.topic(name)} does not exist; is a worker up?")
            partitions += [TopicPartition(self.topic(name), p) for p in sorted(ids)]
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)
        for tp in partitions:  # resolve positions now, so no result produced after this is missed
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read())
        return self

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._consumer.stop()
        await self._producer.stop()

    async def __aenter__(self) -> SearchLayerClient:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def send_request(self, request: dict[str, Any]) -> asyncio.Future:
        """Produce a search request; the returned future resolves to its ranked result."""
        future = asyncio.get_running_loop().create_future()
        self._pending[request["request_id"]] = future
        await self.send_raw("search-requests", orjson.dumps(request), request["user_id"])
        return future

    async def rank(self, request: dict[str, Any], timeout: float = 15.0) -> dict[str, Any]:
        """Produce a search request and wait for its ranked result."""
        future = await self.send_request(request)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(request["request_id"], None)

    async def interact(self, interaction: dict[str, Any]) -> None:
        await self.send_raw("interactions", orjson.dumps(interaction), interaction["user_id"])

    async def catalog(self, item: dict[str, Any]) -> None:
        await self.send_raw("catalog", orjson.dumps(item), item["item_id"])

    async def send_raw(self, topic: str, value: bytes, key: str | None = None) -> None:
        await self._producer.send(
            self.topic(topic), value, key=None if key is None else key.encode()
        )

    async def flush(self) -> None:
        await self._producer.flush()

    async def _read(self) -> None:
        dead_letters = self.topic("dead-letters")
        async for message in self._consumer:
            body = orjson.loads(message.value)
            if message.topic == dead_letters:
                self.dead_letters.put_nowait(body)
                continue
            future = self._pending.pop(body.get("request_id"), None)
            if future is not None and not future.done():
                future.set_result(body)
            else:
                self.results.put_nowait(body)
