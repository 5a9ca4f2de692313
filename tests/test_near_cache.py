"""The near cache serves a value for at most its age limit and holds a bounded number."""

from __future__ import annotations

from engine.near_cache import NearCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_no_value_is_served_older_than_the_limit() -> None:
    clock = Clock()
    cache = NearCache(max_age_s=5.0, clock=clock)
    cache.put("a", 1)
    clock.now = 4.0
    cache.put("b", 2)  # late in the generation that "a" started
    assert cache.get_many(["a", "b", "c"]) == [1, 2, None]
    clock.now = 5.0  # "a" is 5 s old: both go, "b" a second old
    assert cache.get_many(["a", "b"]) == [None, None]
    cache.put("b", 3)
    clock.now = 9.9
    assert cache.get("b") == 3
    clock.now = 10.0
    assert cache.get("b") is None


def test_past_the_bound_a_new_generation_starts() -> None:
    cache = NearCache(max_age_s=5.0, max_entries=3, clock=Clock())
    cache.put_many((key, key) for key in "abc")
    assert len(cache) == 3
    cache.put("d", "d")
    assert len(cache) == 1 and cache.get_many(["a", "d"]) == [None, "d"]


def test_an_age_limit_of_zero_keeps_nothing() -> None:
    cache = NearCache(max_age_s=0.0, clock=Clock())
    cache.put("a", 1)
    assert cache.get("a") is None and len(cache) == 0
