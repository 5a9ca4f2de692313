"""Item-to-item similarity from engagements: it finds planted pairs, stays bounded, and tells
the current session from the older history."""

from __future__ import annotations

import random

import numpy as np
import pytest

from engine.features import FeatureConfig, item_key, read_items
from engine.item_similarity import (
    SIMILARITY_FEATURES,
    SimilarityConfig,
    engagement_reads,
    engagement_writes,
    neighbour_key,
    recent_anchors,
    recent_items_read,
    recent_with_anchors,
    recent_write,
    similarity_features,
)
from engine.messages import Interaction
from engine.store import HashRead, MemoryStore, trim_limit


class Shop:
    """A MemoryStore fed engagements the way the feedback path will feed them."""

    def __init__(self, config: SimilarityConfig | None = None) -> None:
        self.config = config or SimilarityConfig()
        self.store = MemoryStore(clock=lambda: self.now)
        self.now = 0.0
        self.events = 0

    def engage(self, user: str, item: str, ts: float, kind: str = "click") -> None:
        self.now = ts
        self.events += 1
        (recent,) = self.store.read(engagement_reads(user, self.config))
        event = Interaction(f"e-{self.events}", user, item, kind, ts=ts)
        writes = [*engagement_writes(event, recent, self.config), *recent_write(event)]
        assert self.store.apply(writes, once=f"ev:{event.event_id}")

    def features(self, user: str, candidates: list[str], now: float) -> np.ndarray:
        features = FeatureConfig(co_engagement=self.config)
        (reply,) = self.store.read([recent_items_read(user, features)])
        _, anchors, replies = recent_with_anchors(reply, now, self.config)
        assert len(replies) == 2 * len(anchors) <= 2 * self.config.anchors
        items = read_items(self.store, candidates)
        return similarity_features(candidates, items, anchors, replies, now, self.config)

    def neighbours(self, item: str) -> dict[str, float]:
        (fields,) = self.store.read([HashRead(neighbour_key(item))])
        return {k: float(v) for k, v in fields.items() if k != "_t"}


def planted_pairs(shop: Shop, sessions: int, items: int = 200, seed: int = 7) -> None:
    """Each session engages a pair (i, i + items/2), in either order, among random others."""
    rng = random.Random(seed)
    half = items // 2
    ts = 0.0
    for s in range(sessions):
        i = rng.randrange(half)
        pair = [f"i-{i}", f"i-{i + half}"]
        rng.shuffle(pair)
        noise = [f"i-{rng.randrange(items)}" for _ in range(3)]
        visit = [noise[0], pair[0], noise[1], pair[1], noise[2]]
        for n, item in enumerate(visit):
            kind = rng.choice(["click", "click", "click", "add_to_cart", "purchase"])
            shop.engage(f"u-{s}", item, ts + 60.0 * n, kind)
        ts += 600.0


def test_similarity_recovers_planted_co_engaged_pairs() -> None:
    shop = Shop()
    planted_pairs(shop, sessions=3000)
    items = [f"i-{n}" for n in range(200)]
    found = 0
    for n in range(200):
        # a newcomer who engaged only item n: the candidate most similar to it
        user, now = f"probe-{n}", shop.now + 10.0
        shop.engage(user, f"i-{n}", now)
        x = shop.features(user, items, now + 1.0)
        assert x.shape == (200, len(SIMILARITY_FEATURES))
        assert x[n, 1] == 0.0  # an item is not its own neighbour
        found += items[int(np.argmax(x[:, 1]))] == f"i-{(n + 100) % 200}"
    assert found >= 0.9 * 200, found


def test_similarity_is_a_cosine() -> None:
    shop = Shop()
    for user in ("u-1", "u-2", "u-3"):
        shop.engage(user, "phone", 100.0)
        shop.engage(user, "case", 160.0)
    shop.engage("u-4", "phone", 200.0)
    shop.engage("u-5", "case", 200.0, "purchase")
    shop.engage("u-6", "phone", 300.0)
    x = shop.features("u-6", ["case", "charger"], now=300.0)
    # co(phone, case) = 3 clicks of case after phone; n_phone = 5, n_case = 3 + 5
    # (as of slightly different reference times: a 7-day half-life moves the 5th digit)
    assert x[0, 1] == pytest.approx(3 / np.sqrt(5 * 8), rel=1e-4)
    assert x[1].tolist() == [0.0, 0.0]


def test_new_users_and_unknown_items_score_zero() -> None:
    shop = Shop()
    shop.engage("u-1", "a", 0.0)
    shop.engage("u-1", "b", 10.0)
    assert shop.features("stranger", ["a", "b"], 20.0).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert shop.features("u-1", ["zzz"], 20.0).tolist() == [[0.0, 0.0]]
    assert shop.features("u-1", [], 20.0).shape == (0, 2)


def test_neighbour_hashes_stay_bounded_as_the_catalog_grows() -> None:
    config = SimilarityConfig(neighbours=10)
    shop = Shop(config)
    rng = random.Random(3)
    sizes = []
    for catalog in (100, 1000, 5000):
        for s in range(2000):
            # every session engages the hub, its usual partner, and a random other item
            user, ts = f"u-{catalog}-{s}", shop.now + 600.0
            shop.engage(user, "hub", ts)
            if s % 2 == 0:
                shop.engage(user, "partner", ts + 30.0)
            shop.engage(user, f"i-{rng.randrange(catalog)}", ts + 60.0)
        sizes.append(len(shop.neighbours("hub")))
    assert all(size <= trim_limit(config.neighbours) for size in sizes), sizes
    # thousands of one-off partners did not push out the one engaged in half the sessions
    hub = shop.neighbours("hub")
    assert max(hub, key=hub.__getitem__) == "partner"
    largest = max(len(shop.neighbours(f"i-{n}")) for n in range(0, 5000, 7))
    assert largest <= trim_limit(config.neighbours)


def test_session_and_history_are_told_apart_by_the_time_gap() -> None:
    shop = Shop()
    # others teach the pairs: boots go with socks, tents with stoves
    for n in range(5):
        shop.engage(f"o-{n}", "boots", 100.0 * n)
        shop.engage(f"o-{n}", "socks", 100.0 * n + 30.0)
        shop.engage(f"p-{n}", "tent", 100.0 * n + 60.0)
        shop.engage(f"p-{n}", "stove", 100.0 * n + 90.0)
    # our shopper looked at boots yesterday and at a tent now
    day = 86400.0
    shop.engage("u-1", "boots", day)
    shop.engage("u-1", "tent", 2 * day)
    socks, stove = shop.features("u-1", ["socks", "stove"], 2 * day + 600.0)
    assert socks[0] == 0.0 and socks[1] > 0.0  # like yesterday's boots: history only
    assert stove[0] > 0.0 and stove[1] == stove[0]  # like the tent of this session
    # once the session has paused for longer than the gap, it is all history
    later = shop.features("u-1", ["socks", "stove"], 2 * day + 600.0 + 1800.0)
    assert later[:, 0].tolist() == [0.0, 0.0] and (later[:, 1] > 0).all()


def test_recent_anchors_are_distinct_bounded_and_split_at_the_first_long_pause() -> None:
    config = SimilarityConfig(anchors=3, session_gap_s=100.0)
    recent = ["a\t1000", "b\t950", "a\t900", "c\t700", "d\t690", "e\t600"]
    anchors = recent_anchors(recent, now=1050.0, config=config)
    assert [(a.item_id, a.in_session) for a in anchors] == [
        ("a", True),
        ("b", True),
        ("c", False),  # 200 s after the previous engagement: an earlier session
    ]
    assert [a.in_session for a in recent_anchors(recent, 1200.0, config)] == [False] * 3
    assert recent_anchors([], 0.0, config) == []


def test_an_engagement_is_paired_with_what_came_since_its_last_time_within_the_window() -> None:
    config = SimilarityConfig(pair_window_s=3600.0, max_pairs=2)
    event = Interaction("e-1", "u-1", "x", "purchase", ts=10_000.0)

    def partners(recent: list[str]) -> list[str]:
        writes = engagement_writes(event, recent, config)
        assert writes[0].key == item_key("x") and writes[0].amounts == {"s|n": 5.0}
        if len(writes) == 1:
            return []
        mine, *theirs = writes[1:]
        assert mine.key == "i:x:n" and set(mine.amounts.values()) == {5.0}
        assert [(w.key, w.amounts) for w in theirs] == [
            (f"i:{p}:n", {"x": 5.0}) for p in mine.amounts
        ]
        assert all(w.keep == config.neighbours for w in writes[1:])
        return list(mine.amounts)

    assert partners(["a\t9000", "b\t8000", "c\t7000"]) == ["a", "b"]  # the newest 2
    assert partners(["a\t9000", "a\t8900", "c\t8700"]) == ["a", "c"]
    assert partners(["a\t9000", "x\t8800", "c\t8700"]) == []  # x again: paired before
    assert partners(["a\t6000"]) == []  # more than an hour before
    assert partners(["x\t9999"]) == []  # clicking the same item again pairs nothing
    assert partners([]) == []
    back_and_forth = Shop()
    for n, item in enumerate(["a", "b", "a", "b", "a", "b"]):
        back_and_forth.engage("u-1", item, 10.0 * n)
    assert back_and_forth.neighbours("a") == {"b": 1.0}  # once, not five times
    assert back_and_forth.neighbours("b") == {"a": 1.0}
