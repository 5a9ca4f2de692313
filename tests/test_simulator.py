"""The simulated shop: repeatable, valid messages, position-biased clicks, learnable tastes."""

from __future__ import annotations

import doctest
import heapq

import numpy as np
import orjson
import pytest

import streamrank.live_view
import streamrank.simulator
from engine.experiments import assign_variant
from engine.features import catalog_writes
from engine.feedback import Feedback
from engine.messages import parse_catalog_item, parse_interaction, parse_search_request
from engine.ranking import CONTROL, Ranker
from engine.store import MemoryStore
from models.online_ctr import LinearCTR
from models.online_learner import OnlineLearner, SnapshotWatcher
from streamrank.simulator import Simulator


def page(item_ids: list[str]) -> dict:
    """A ranked result showing the items in this order."""
    return {"items": [{"item_id": i, "rank": n} for n, i in enumerate(item_ids, start=1)]}


def retrieved(request: dict) -> list[str]:
    return [c["item_id"] for c in request["candidates"]]


def clicks(events: list[dict]) -> int:
    return sum(1 for e in events if e["type"] == "click")


@pytest.mark.parametrize("module", [streamrank.simulator, streamrank.live_view])
def test_docstring_examples(module) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0


def test_same_seed_same_shop_requests_and_feedback() -> None:
    a, b, other = Simulator(seed=7), Simulator(seed=7), Simulator(seed=8)
    assert a.catalog_messages() == b.catalog_messages()
    assert a.catalog_messages() != other.catalog_messages()
    for n in range(200):
        ra, rb = a.next_request(now=float(n)), b.next_request(now=float(n))
        assert ra == rb
        assert a.feedback(ra, page(retrieved(ra)), now=n) == b.feedback(rb, page(retrieved(rb)), n)
    assert [s.user_id for s in a.shoppers] == [s.user_id for s in b.shoppers]


def test_feedback_does_not_change_the_requests_that_follow() -> None:
    """Whatever the ranker shows (and so however the shoppers react), the traffic is the same:
    two runs of a seed differ only where their rankings differ."""
    a, b = Simulator(seed=3), Simulator(seed=3)
    for _ in range(100):
        ra, rb = a.next_request(), b.next_request()
        assert ra == rb
        a.feedback(ra, page(retrieved(ra)))
        b.feedback(rb, page(retrieved(rb)[::-1]))


def test_catalog_messages_are_valid_and_varied() -> None:
    sim = Simulator(seed=1)
    items = [parse_catalog_item(orjson.dumps(m)) for m in sim.catalog_messages()]
    assert len({i.item_id for i in items}) == len(items) == len(sim.catalog)
    categories = {i.category for i in items}
    assert len(categories) >= 10
    assert all(i.brand and i.title and i.price and i.price > 0 and i.available for i in items)
    # Brands span categories; prices spread within a category.
    brand_categories: dict[str, set[str]] = {}
    for item in items:
        brand_categories.setdefault(item.brand, set()).add(item.category)
    assert max(len(c) for c in brand_categories.values()) >= 3
    running = [i.price for i in items if i.category == "shoes/running"]
    assert max(running) / min(running) > 2.0


def test_requests_are_valid_and_match_their_query() -> None:
    sim = Simulator(seed=1)
    categories = dict(zip(sim.catalog.queries, sim.catalog.categories, strict=True))
    item_category = {m["item_id"]: m["category"] for m in sim.catalog_messages()}
    ids = set()
    for n in range(300):
        body = sim.next_request(now=1000.0 + n)
        request = parse_search_request(orjson.dumps(body))
        ids.add(request.request_id)
        assert 20 <= len(request.candidates) <= 60
        assert request.k == 20 and request.ts == 1000.0 + n
        scores = [c.score for c in request.candidates]
        assert scores == sorted(scores, reverse=True)  # the retrieval order
        wanted = categories[request.query]
        on_query = [item_category[c.item_id] == wanted for c in request.candidates]
        assert sum(on_query) >= 0.6 * len(on_query)
    assert len(ids) == 300


def test_interactions_are_valid_tied_to_the_request_and_unique() -> None:
    sim = Simulator(seed=2)
    prices = {m["item_id"]: m["price"] for m in sim.catalog_messages()}
    event_ids: set[str] = set()
    kinds: dict[str, int] = {}
    for n in range(400):
        request = sim.next_request(now=float(n))
        shown = retrieved(request)[:20]
        events = sim.feedback(request, page(shown), now=n + 0.1)
        times = [e["ts"] for e in events]
        assert times == sorted(times) and all(t > n + 0.1 for t in times)
        clicked: set[str] = set()
        for event in events:
            interaction = parse_interaction(orjson.dumps(event))
            assert interaction.user_id == request["user_id"]
            assert interaction.request_id == request["request_id"]
            assert shown[interaction.position - 1] == interaction.item_id
            if interaction.type == "click":
                clicked.add(interaction.item_id)
            else:
                assert interaction.item_id in clicked  # carts and purchases follow a click
            if interaction.type == "purchase":
                assert interaction.value == prices[interaction.item_id]
            event_ids.add(interaction.event_id)
            kinds[interaction.type] = kinds.get(interaction.type, 0) + 1
    assert len(event_ids) == sum(kinds.values())
    assert kinds["click"] > kinds["add_to_cart"] > kinds["purchase"] > 0


def test_clicks_are_position_biased() -> None:
    """The same items get fewer clicks further down the page, as the examination decays."""
    sim = Simulator(seed=4)
    rng = np.random.default_rng(0)
    shown = np.zeros(20)
    clicked = np.zeros(20)
    for _ in range(3000):
        request = sim.next_request()
        items = retrieved(request)[:20]
        rng.shuffle(items)  # every item equally likely at every position
        for event in sim.feedback(request, page(items)):
            if event["type"] == "click":
                clicked[event["position"] - 1] += 1
        shown[: len(items)] += 1
    rate = clicked / shown
    assert rate[0] > 1.5 * rate[4] > 0
    assert rate[:5].mean() > 2.0 * rate[15:].mean()
    # And in proportion to the examination probabilities.
    expected = sim.examination(np.arange(1, 21))
    ratio = (rate / rate[0]) / expected
    assert np.all(np.abs(ratio[:10] - 1.0) < 0.3)


def test_attractiveness_orders_the_clicks() -> None:
    """Ideal order > retrieval order > reversed ideal order, on the same searches."""
    sim = Simulator(seed=5)
    totals = {"ideal": 0, "retrieval": 0, "worst": 0}
    for _ in range(1000):
        request = sim.next_request()
        ideal = sim.ideal_order(request)
        for name, order in (("ideal", ideal), ("retrieval", retrieved(request))):
            totals[name] += clicks(sim.feedback(request, page(order)))
        totals["worst"] += clicks(sim.feedback(request, page(ideal[::-1])))
    assert totals["ideal"] > 1.3 * totals["retrieval"]
    assert totals["retrieval"] > 1.3 * totals["worst"]


def test_quality_brand_and_price_tastes_shape_attractiveness() -> None:
    sim = Simulator(seed=6)
    catalog = sim.catalog
    members = catalog.members[0]
    shopper = sim.shoppers[0]
    appeal = sim.attractiveness(shopper, members, query=0)
    assert np.corrcoef(catalog.quality[members], appeal)[0, 1] > 0.3
    # Off-query items appeal less than the query's own.
    others = np.flatnonzero(catalog.category_of != 0)
    assert sim.attractiveness(shopper, others, 0).mean() < appeal.mean()
    # Shoppers of one taste group agree more with each other than with other groups.
    items = np.arange(len(catalog))
    by_group: dict[int, list[np.ndarray]] = {}
    for s in sim.shoppers:
        if s.group is not None and len(by_group.get(s.group, [])) < 6:
            by_group.setdefault(s.group, []).append(
                np.log(sim.attractiveness(s, items, -1)) - catalog.quality
            )
    groups = [g for g in by_group.values() if len(g) >= 2]
    within = np.mean([np.corrcoef(g[0], g[1])[0, 1] for g in groups])
    pairs = zip(groups, groups[1:], strict=False)
    between = np.mean([np.corrcoef(a[0], b[0])[0, 1] for a, b in pairs])
    assert within > between + 0.3


def test_new_shoppers_arrive_over_time() -> None:
    sim = Simulator(seed=1, shoppers=100, new_shopper_share=0.1)
    users = [sim.next_request()["user_id"] for _ in range(2000)]
    assert len(sim.shoppers) > 100
    late = [u for u in users[1000:] if int(u.removeprefix("u-")) >= 100]
    assert 0.05 < len(set(late)) / 1000 < 0.2  # first seen after the start
    new_after = [s for s in sim.shoppers if s.joined > 1000]
    assert new_after and all(s.user_id in users for s in new_after)


def test_the_engine_learns_to_beat_the_retrieval_order_in_process() -> None:
    """The engine's ranker, feedback and online learner over an in-memory store, fed by the
    simulator the way the workers are (clicks arrive after their result, models are
    published while serving): personalized earns clearly more clicks per search."""
    sim = Simulator(seed=1)
    now = [1_000_000.0]
    store = MemoryStore(clock=lambda: now[0])
    ranker = Ranker(store, LinearCTR.prior(), clock=store.clock)
    feedback = Feedback(store)
    learner = OnlineLearner(store, warmup_examples=200)
    watcher = SnapshotWatcher(store)
    for message in sim.catalog_messages():
        store.apply(catalog_writes(parse_catalog_item(orjson.dumps(message)), feedback.features))
    pending: list[tuple[float, int, dict]] = []
    tallies = {"control": [0, 0], "personalized": [0, 0]}
    for n in range(1800):  # a minute at 30 requests/s
        now[0] = 1_000_000.0 + n / 30.0
        while pending and pending[0][0] <= now[0]:
            event = heapq.heappop(pending)[2]
            interaction = parse_interaction(orjson.dumps(event))
            plan = feedback.prepare(interaction)
            if feedback.commit(plan) and plan.examples:
                learner.learn(interaction.event_id, plan.examples)
        if n % 8 == 0:
            learner.publish_if_due(now=now[0])
            ranker.model = watcher.poll() or ranker.model
        body = sim.next_request(now=now[0])
        variant = assign_variant(body["user_id"], "streamrank", 0.5)
        ranking = ranker.rank(parse_search_request(orjson.dumps(body)), variant)
        ranker.remember(ranking)
        events = sim.feedback(body, orjson.loads(ranking.result.to_json()), now=now[0])
        tallies[variant][0] += 1
        tallies[variant][1] += clicks(events)
        for k, event in enumerate(events):
            heapq.heappush(pending, (event["ts"], n * 100 + k, event))
    control = tallies[CONTROL][1] / tallies[CONTROL][0]
    personalized = tallies["personalized"][1] / tallies["personalized"][0]
    assert ranker.model.version > 10
    assert personalized > 1.1 * control, (control, personalized)
