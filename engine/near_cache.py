"""A short-lived, bounded cache of shared ranking state, in the ranking process.

Item attributes and counters and the position curve are aggregates over every
shopper: a value a few seconds old ranks as well as a
fresh one, while re-reading a hundred item hashes on every request would cost
more than everything else the ranker does. A shopper's own state is never
cached: their last click must count in their very next request. Values should
be plain tuples of numbers and strings: the garbage collector stops tracking
those, so a full cache does not lengthen its pauses.

>>> clock = [0.0]
>>> cache = NearCache(max_age_s=1.0, clock=lambda: clock[0])
>>> cache.put("i:7", {"clk": "3"})
>>> cache.get("i:7")
{'clk': '3'}
>>> clock[0] = 1.5
>>> cache.get("i:7") is None  # too old: read again
True
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any


class NearCache:
    """Values kept for ``max_age_s`` seconds; the least recently stored go past ``max_entries``."""

    def __init__(
        self,
        max_age_s: float = 1.0,
        max_entries: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_age_s = max_age_s
        self.max_entries = max_entries
        self._clock = clock
        # Re-stored keys move to the end; the first is the least recently stored. (A plain
        # dict would do, but finding its first key again and again after deletions from
        # the front walks every deleted slot.)
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def get(self, key: str) -> Any | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Iterable[str]) -> list[Any | None]:
        """The fresh value of each key, ``None`` where absent or too old (one clock read)."""
        now = self._clock()
        get = self._entries.get
        return [
            entry[1] if (entry := get(key)) is not None and entry[0] > now else None for key in keys
        ]

    def put(self, key: str, value: Any) -> None:
        self.put_many([(key, value)])

    def put_many(self, pairs: Iterable[tuple[str, Any]]) -> None:
        if self.max_age_s <= 0:
            return
        expires = self._clock() + self.max_age_s
        entries = self._entries
        for key, value in pairs:
            entries[key] = (expires, value)
            entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
