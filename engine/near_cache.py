"""A short-lived, bounded cache of shared ranking state, in the ranking process.

Item attributes and counters and the position curve are aggregates over every
shopper: a value a few seconds old ranks as well as a fresh one, while
re-reading a hundred item hashes on every request would cost more than
everything else the ranker does. A shopper's own state is never cached: their
last click must count in their very next request. Values should be plain tuples
of numbers and strings: the garbage collector stops tracking those, so a full
cache does not lengthen its pauses.

Values are kept by generation: a generation starts with the first value put
after the last one ended, and all its values are dropped together ``max_age_s``
later, so none is served older than that. A look-up is then a plain dict look-up
(no time stamp per value to read and compare), which matters at a hundred
look-ups a request. Past ``max_entries`` the generation ends early.

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

import math
import time
from collections.abc import Callable, Iterable
from typing import Any


class NearCache:
    """Values kept for at most ``max_age_s`` seconds; a generation ends early once it holds
    ``max_entries``."""

    def __init__(
        self,
        max_age_s: float = 1.0,
        max_entries: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_age_s = max_age_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, Any] = {}
        self._ends = -math.inf  # when the current generation's values are dropped

    def get(self, key: str) -> Any | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Iterable[str]) -> list[Any | None]:
        """The value of each key, ``None`` where absent or too old (one clock read)."""
        if self._entries and self._clock() >= self._ends:
            self._entries = {}
        return list(map(self._entries.get, keys))

    def put(self, key: str, value: Any) -> None:
        self.put_many([(key, value)])

    def put_many(self, pairs: Iterable[tuple[str, Any]]) -> None:
        if self.max_age_s <= 0:
            return
        now = self._clock()
        if now >= self._ends or len(self._entries) >= self.max_entries:
            self._entries, self._ends = {}, now + self.max_age_s
        self._entries.update(pairs)

    def __len__(self) -> int:
        return len(self._entries)
