"""The worker's helper processes: started on demand, replaced when one dies."""

from __future__ import annotations

import asyncio
import os
import signal
from concurrent.futures.process import BrokenProcessPool

import pytest

from streams.child_process import ChildProcess


def test_a_child_that_dies_is_replaced_on_the_next_call() -> None:
    async def scenario() -> None:
        child = ChildProcess("test", os.getpid)
        assert not child.started
        await child.start()
        first = await child.call(os.getpid)
        assert child.started and first != os.getpid()
        assert await child.call(os.getpid) == first  # one process, kept
        with pytest.raises(BrokenProcessPool):
            await child.call(os.kill, first, signal.SIGKILL)
        assert not child.started
        second = await child.call(os.getpid)
        assert second not in (first, os.getpid())
        child.stop()
        assert not child.started

    asyncio.run(scenario())
