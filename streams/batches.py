"""Apply a stream's messages in batches while the next ones keep arriving.

Faust's ``Stream.take`` stops reading while the agent handles a batch: nothing new
is turned into events until the batch is done, and then the agent waits up to
``within`` for a batch to fill, a timer that wakes the worker even when idle. Here
the agent keeps reading while one task applies what has arrived, at most
``max_batch`` messages at a time: the work of reading the next batch overlaps the
wait on Redis for this one, a lone click is applied at once, and under load the
batches fill by themselves.

``apply`` may finish a batch later: it returns an awaitable that completes when the
batch is applied (the interactions are prepared while the batch before commits).
Messages are acked only once their batch is applied, in arrival order, so a worker
that dies mid-batch leaves the batch to be delivered again (at least once; the
appliers claim each event once).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import faust
from faust.types import EventT

log = logging.getLogger("streamrank")

Apply = Callable[[list[bytes]], Awaitable[Awaitable[object] | None]]


async def apply_in_batches(stream: faust.StreamT, apply: Apply, max_batch: int) -> None:
    """Feed ``stream``'s values to ``apply`` in batches of at most ``max_batch``, in order.

    ``apply(values)`` returns ``None`` when the batch is applied, or an awaitable that
    completes when it is; the next batch is handed over before that. At most
    ``2 * max_batch`` messages wait unapplied before the agent stops reading: the broker
    keeps the rest.
    """
    stream = stream.noack()
    limit = 2 * max_batch
    arrived: list[EventT] = []
    more = asyncio.Event()  # something arrived
    room = asyncio.Event()  # a batch was taken off `arrived`

    async def acked(batch: list[EventT], applied: Awaitable[object] | None) -> None:
        if applied is not None:
            await applied
        for event in batch:
            await stream.ack(event)

    async def applier() -> None:
        finishing: tuple[list[EventT], Awaitable[object] | None] | None = None
        while True:
            if not arrived:
                if finishing is not None:
                    await acked(*finishing)
                    finishing = None
                    continue  # more may have arrived meanwhile
                more.clear()
                await more.wait()
                continue
            batch = arrived[:max_batch]
            del arrived[:max_batch]
            room.set()
            applying = await apply([event.value for event in batch])
            if finishing is not None:
                await acked(*finishing)
            finishing = (batch, applying)

    async def logged() -> None:
        try:
            await applier()
        except Exception:
            # Logged now: the agent raises it only when the next message arrives.
            log.exception("applying a batch of %s failed", stream)
            raise

    applying = asyncio.ensure_future(logged())
    try:
        async for event in stream.events():
            arrived.append(event)
            more.set()
            while len(arrived) >= limit and not applying.done():
                room.clear()
                taken = asyncio.ensure_future(room.wait())
                await asyncio.wait([taken, applying], return_when=asyncio.FIRST_COMPLETED)
                taken.cancel()
            if applying.done():
                applying.result()  # the applier's error, raised in the agent
    finally:
        applying.cancel()
