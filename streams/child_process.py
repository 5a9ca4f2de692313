"""A helper process of the worker: one spawned child that runs functions of a module.

The worker keeps its event loop for Kafka and rankings; CPU-heavy work that needs no
loop (applying interactions, learning, training the deep model) runs in a child on
another core. The child is started on first use (spawned: no fork of a running event
loop) and again after it dies (a second after, if it died within the last second: no
tight loop of children that cannot start); a call it was running when it died raises
``BrokenProcessPool`` for the caller to redo what that call would have done.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

log = logging.getLogger("streamrank")
T = TypeVar("T")


class ChildProcess:
    """``await child.call(function, *args)`` runs ``function`` in the child, one call at a time,
    in the order called."""

    def __init__(self, name: str, initializer: Callable[..., None], initargs: tuple = ()) -> None:
        self.name = name
        self.initializer = initializer
        self.initargs = initargs
        self._pool: ProcessPoolExecutor | None = None
        self._answered = False
        self._died_at = -1e9

    @property
    def started(self) -> bool:
        """Whether the child runs and has answered a call (it is past its start-up)."""
        return self._pool is not None and self._answered

    async def call(self, function: Callable[..., T], *args: object) -> T:
        if self._pool is None:
            if time.monotonic() - self._died_at < 1.0:
                await asyncio.sleep(1.0)
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=self.initializer,
                initargs=self.initargs,
            )
        try:
            answer = await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)
        except BrokenProcessPool:
            log.error("the %s process died; the next call starts another", self.name)
            self._pool, self._answered, self._died_at = None, False, time.monotonic()
            raise
        self._answered = True
        return answer

    async def start(self) -> None:
        """Start the child now (spawning and importing take a second or two), not on the
        first call."""
        await self.call(os.getpid)

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool, self._answered = None, False
