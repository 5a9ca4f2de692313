"""Simulated shoppers for a simulated shop: search requests in, clicks and purchases out.

A stand-in for a real search layer and its users, realistic enough to learn from and to
trust as a test of learning. Plain synchronous code, seeded and repeatable, that knows
nothing of Kafka: ``streamrank up`` sends what it produces through the broker like any
producer would, and unit tests drive the engine with it in-process.

The world:

- a :class:`Catalog` of items, each with a category, a brand, a price, a latent vector and
  a *quality* (how appealing it is to everyone);
- :class:`Shopper` s with latent tastes: favourite categories, loved and disliked brands, a
  price tier (budget or premium, relative to each category's typical price) and a latent
  vector. Most shoppers belong to a taste group and share its tastes, give or take; others
  are loners; a share of the traffic comes from new shoppers arriving over time;
- a search request is a shopper's query for one category (chosen by the shopper's taste),
  whose candidates are mostly items of that category in a *noisy relevance order*, the way a
  text search engine would retrieve them: it knows the query, hardly the quality, and
  nothing of the shopper;
- clicks follow a *position-based model*: a shopper examines the item shown at position
  ``p`` with probability ``p ** -position_decay`` and, if examined, clicks it with the
  item's true :meth:`Simulator.attractiveness` for that shopper. Add-to-carts and purchases
  (``value`` = the price) follow some clicks.

The attractiveness is made of things that the engine's features can learn: item quality
(item click-through rates), brand and category tastes (the user's brand and category
shares), the price tier (the user's price level) and a small latent part no feature sees.
The retrieval order knows the category, a little of the quality and none of the tastes, so a
ranking that learns them beats it: that is the learning that ``streamrank up`` shows.

>>> sim = Simulator(seed=1)
>>> len(sim.catalog_messages()), sim.catalog_messages()[0]["category"]
(600, 'shoes/running')
>>> request = sim.next_request(now=1000.0)
>>> request["query"], len(request["candidates"]), request["k"], request["candidates"][0]
('headphones', 35, 20, {'item_id': 'i-146', 'score': 22.089})

A ranked result is a page of items; the shoppers react to it with clicks and more. Shown in
the retrieval order or in the order of their true attractiveness (which a ranker can only
learn), the same searches get very different numbers of clicks:

>>> def page(item_ids):
...     return {"items": [{"item_id": i, "rank": n} for n, i in enumerate(item_ids, 1)]}
>>> clicks = {"retrieval": 0, "ideal": 0}
>>> for _ in range(1000):
...     request = sim.next_request()
...     retrieved = [c["item_id"] for c in request["candidates"]]
...     for name, order in (("retrieval", retrieved), ("ideal", sim.ideal_order(request))):
...         events = sim.feedback(request, page(order))
...         clicks[name] += sum(event["type"] == "click" for event in events)
>>> {name: count / 1000 for name, count in clicks.items()}  # clicks per search
{'retrieval': 1.117, 'ideal': 1.982}

The same seed gives the same shop, the same shoppers and the same requests; the feedback
to a request depends only on the seed, the request and the order it was shown in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Catalog", "Item", "Shopper", "Simulator"]

#: (category, the query shoppers type for it, typical price)
CATEGORIES: tuple[tuple[str, str, float], ...] = (
    ("shoes/running", "running shoes", 95.0),
    ("kitchen/coffee", "coffee maker", 70.0),
    ("electronics/audio", "headphones", 80.0),
    ("sports/yoga", "yoga mat", 30.0),
    ("garden/tools", "garden tools", 40.0),
    ("shoes/boots", "boots", 110.0),
    ("kitchen/knives", "kitchen knife", 50.0),
    ("electronics/cameras", "cameras", 150.0),
    ("sports/camping", "tent", 120.0),
    ("garden/lighting", "solar lights", 35.0),
    ("shoes/sandals", "sandals", 45.0),
    ("kitchen/pans", "frying pan", 45.0),
    ("electronics/cables", "usb cable", 15.0),
    ("sports/cycling", "bike helmet", 60.0),
    ("garden/furniture", "garden chair", 90.0),
    ("toys/puzzles", "jigsaw puzzle", 25.0),
)
BRANDS: tuple[str, ...] = (
    "acme", "borealis", "cobalt", "dune", "ember", "fjord", "granite", "halcyon",
    "indigo", "juniper", "kestrel", "lumen", "monsoon", "nimbus", "onyx", "pioneer",
    "quartz", "ridge", "sierra", "tundra", "umbra", "vertex", "willow", "zephyr",
)  # fmt: skip
_MODELS = ("one", "pro", "lite", "max", "air", "classic", "go", "plus", "mini", "x")


@dataclass(frozen=True, slots=True)
class Item:
    """One product: what the catalog says of it, and what only the simulation knows."""

    item_id: str
    category: int  # index into Catalog.categories
    brand: int  # index into Catalog.brands
    price: float
    title: str
    quality: float  # appeal to every shopper, in log-odds
    vector: np.ndarray = field(repr=False)  # latent traits, unit length


class Catalog:
    """Items in categories, with brands and prices; :meth:`messages` is the ``catalog`` feed.

    Parameters
    ----------
    rng
        Where the randomness comes from (a ``numpy.random.Generator``).
    n_categories
        How many of :data:`CATEGORIES` the shop sells (at most 16).
    items_per_category
        Items in each category.
    brands_per_category
        Each category carries this many of the brands (a brand spans several categories).
    dim
        Length of the latent vectors.

    >>> catalog = Catalog(np.random.default_rng(0), n_categories=2, items_per_category=3)
    >>> [(m["item_id"], m["category"]) for m in catalog.messages()][2:4]
    [('i-2', 'shoes/running'), ('i-3', 'kitchen/coffee')]
    >>> sorted(catalog.messages()[3])
    ['available', 'brand', 'category', 'item_id', 'price', 'title']
    """

    def __init__(
        self,
        rng: np.random.Generator,
        *,
        n_categories: int = 12,
        items_per_category: int = 50,
        brands_per_category: int = 6,
        dim: int = 8,
        quality_spread: float = 1.0,
    ) -> None:
        if not 1 <= n_categories <= len(CATEGORIES):
            raise ValueError(f"n_categories must be within 1..{len(CATEGORIES)}")
        chosen = CATEGORIES[:n_categories]
        self.categories: tuple[str, ...] = tuple(c[0] for c in chosen)
        self.queries: tuple[str, ...] = tuple(c[1] for c in chosen)
        self.base_prices = np.array([c[2] for c in chosen])
        self.brands: tuple[str, ...] = BRANDS
        self.dim = dim
        items: list[Item] = []
        self.brands_of: list[np.ndarray] = []
        for c in range(n_categories):
            brands = rng.choice(len(BRANDS), size=brands_per_category, replace=False)
            self.brands_of.append(brands)
            # A few big brands and a tail: Zipf-like shares of the category's items.
            shares = 1.0 / np.arange(1, brands_per_category + 1)
            for _ in range(items_per_category):
                brand = int(rng.choice(brands, p=shares / shares.sum()))
                tier = rng.normal(0.0, 0.45)  # log price relative to the category's typical
                price = round(float(self.base_prices[c] * math.exp(tier)), 2)
                vector = rng.normal(size=dim)
                n = len(items)
                title = f"{BRANDS[brand]} {self.queries[c]} {_MODELS[n % len(_MODELS)]}"
                items.append(
                    Item(
                        item_id=f"i-{n}",
                        category=c,
                        brand=brand,
                        price=max(price, 1.0),
                        title=title,
                        quality=float(rng.normal(0.0, quality_spread)),
                        vector=vector / np.linalg.norm(vector),
                    )
                )
        self.items: tuple[Item, ...] = tuple(items)
        self.by_id = {item.item_id: n for n, item in enumerate(self.items)}
        self.category_of = np.array([i.category for i in self.items])
        self.brand_of = np.array([i.brand for i in self.items])
        self.quality = np.array([i.quality for i in self.items])
        self.log_price = np.log(np.array([i.price for i in self.items]))
        self.vectors = np.stack([i.vector for i in self.items])
        self.members = [np.flatnonzero(self.category_of == c) for c in range(n_categories)]

    def __len__(self) -> int:
        return len(self.items)

    def messages(self) -> list[dict[str, Any]]:
        """One message per item for the ``catalog`` topic (DESIGN.md, "Catalog item")."""
        return [
            {
                "item_id": item.item_id,
                "category": self.categories[item.category],
                "brand": self.brands[item.brand],
                "price": item.price,
                "title": item.title,
                "available": True,
            }
            for item in self.items
        ]


@dataclass(slots=True)
class Shopper:
    """A shopper's latent tastes (the simulation's secret; the engine sees only behaviour)."""

    user_id: str
    group: int | None  # taste group; None for a loner
    category_taste: np.ndarray  # log-odds bonus per category; also what they search for
    brand_taste: np.ndarray  # log-odds bonus per brand
    price_tier: float  # preferred log price relative to a category's typical price
    vector: np.ndarray
    activity: float  # relative rate of searching
    joined: int  # the request count when they arrived (0: there from the start)


@dataclass(frozen=True, slots=True)
class _Taste:
    category: np.ndarray
    brand: np.ndarray
    price_tier: float
    vector: np.ndarray


class Simulator:
    """Shoppers searching a shop: :meth:`next_request` and :meth:`feedback` to its result.

    Parameters
    ----------
    seed
        Everything follows from it: catalog, shoppers, requests and feedback.
    shoppers
        Shoppers there at the start.
    new_shopper_share
        Share of requests that come from a shopper never seen before.
    taste_groups
        Groups of shoppers who share tastes (each member varies a little).
    group_share
        Share of shoppers in a group; the others have tastes of their own.
    candidates
        Range of the number of retrieved candidates per request.
    off_category_share
        Share of candidates that the retrieval takes from other categories.
    page_size
        ``k`` of each request: how many items the result page shows.
    position_decay
        Examination probability at position ``p`` is ``p ** -position_decay``.
    retrieval_noise
        Spread of the noise in the retrieval relevance (in units of item quality).
    catalog
        Keyword arguments for :class:`Catalog`.
    """

    #: Weights of the attractiveness, in log-odds (see :meth:`attractiveness`).
    BASE = -2.0
    QUALITY = 1.0
    CATEGORY = 0.5
    BRAND = 0.7
    PRICE = 1.0
    PRICE_TOLERANCE = 0.35
    LATENT = 0.4
    OFF_QUERY = -1.5

    def __init__(
        self,
        seed: int = 0,
        *,
        shoppers: int = 300,
        new_shopper_share: float = 0.08,
        taste_groups: int = 8,
        group_share: float = 0.7,
        candidates: tuple[int, int] = (20, 60),
        off_category_share: float = 0.15,
        page_size: int | None = 20,
        position_decay: float = 0.8,
        retrieval_noise: float = 1.0,
        catalog: dict[str, Any] | None = None,
    ) -> None:
        self.seed = seed
        self.new_shopper_share = new_shopper_share
        self.group_share = group_share
        self.candidates = candidates
        self.off_category_share = off_category_share
        self.page_size = page_size
        self.position_decay = position_decay
        self.retrieval_noise = retrieval_noise
        self._rng = np.random.default_rng([seed, 0])
        self.catalog = Catalog(np.random.default_rng([seed, 1]), **(catalog or {}))
        self._groups = [self._draw_taste(self._rng) for _ in range(taste_groups)]
        self.shoppers: list[Shopper] = []
        self.requests = 0
        for _ in range(shoppers):
            self._new_shopper()

    # --- shoppers --------------------------------------------------------------------------

    def _draw_taste(self, rng: np.random.Generator) -> _Taste:
        n_categories, n_brands = len(self.catalog.categories), len(self.catalog.brands)
        # A few favourite categories, the others rarely searched.
        category = rng.normal(0.0, 1.5, n_categories)
        brand = rng.normal(0.0, 1.0, n_brands)
        vector = rng.normal(size=self.catalog.dim)
        return _Taste(category, brand, float(rng.normal(0.0, 0.4)), vector)

    def _new_shopper(self) -> Shopper:
        rng = self._rng
        n = len(self.shoppers)
        if rng.random() < self.group_share:
            group = int(rng.integers(len(self._groups)))
            base = self._groups[group]
            taste = _Taste(
                base.category + rng.normal(0.0, 0.5, base.category.shape),
                base.brand + rng.normal(0.0, 0.4, base.brand.shape),
                base.price_tier + float(rng.normal(0.0, 0.1)),
                base.vector + rng.normal(0.0, 0.3, base.vector.shape),
            )
        else:
            group, taste = None, self._draw_taste(rng)
        shopper = Shopper(
            user_id=f"u-{n}",
            group=group,
            category_taste=taste.category,
            brand_taste=taste.brand,
            price_tier=taste.price_tier,
            vector=taste.vector / np.linalg.norm(taste.vector),
            activity=float(rng.lognormal(0.0, 0.8)),
            joined=self.requests,
        )
        self.shoppers.append(shopper)
        self._activity = None
        return shopper

    def _pick_shopper(self) -> Shopper:
        rng = self._rng
        if self.requests > 0 and rng.random() < self.new_shopper_share:
            return self._new_shopper()
        if self._activity is None:
            weights = np.array([s.activity for s in self.shoppers])
            self._activity = np.cumsum(weights / weights.sum())
        n = int(np.searchsorted(self._activity, rng.random(), side="right"))
        return self.shoppers[min(n, len(self.shoppers) - 1)]

    def shopper(self, user_id: str) -> Shopper:
        return self.shoppers[int(user_id.removeprefix("u-"))]

    # --- the truth -------------------------------------------------------------------------

    def attractiveness(self, shopper: Shopper, items: Sequence[int], query: int) -> np.ndarray:
        """Probability that ``shopper`` clicks each item once they have looked at it.

        ``sigmoid(BASE + QUALITY * quality + CATEGORY * category taste + BRAND * brand taste
        - PRICE * price misfit + LATENT * vectors' dot product + OFF_QUERY if off the query)``,
        where the price misfit is ``((log price - log typical price - tier) / tolerance)^2 / 2``.

        >>> sim = Simulator(seed=3)
        >>> shopper, items = sim.shoppers[0], [0, 1, 2]
        >>> a = sim.attractiveness(shopper, items, query=0)
        >>> bool(((0 < a) & (a < 1)).all()), bool((sim.attractiveness(shopper, items, 1) < a).all())
        (True, True)
        """
        cat = self.catalog
        idx = np.asarray(items, dtype=np.int64)
        category = cat.category_of[idx]
        misfit = (
            cat.log_price[idx] - np.log(cat.base_prices[category]) - shopper.price_tier
        ) / self.PRICE_TOLERANCE
        taste = shopper.category_taste
        logit = (
            self.BASE
            + self.QUALITY * cat.quality[idx]
            + self.CATEGORY * (taste[category] - taste.mean())
            + self.BRAND * shopper.brand_taste[cat.brand_of[idx]]
            - self.PRICE * 0.5 * misfit**2
            + self.LATENT * cat.vectors[idx] @ shopper.vector
            + self.OFF_QUERY * (category != query)
        )
        return 1.0 / (1.0 + np.exp(-logit))

    def ideal_order(self, request: dict[str, Any]) -> list[str]:
        """The request's candidates by their true attractiveness to its shopper, best first
        (what a ranker that knew everything would show)."""
        cat = self.catalog
        ids = [c["item_id"] for c in request["candidates"]]
        query = cat.queries.index(request["query"]) if request.get("query") in cat.queries else -1
        shopper = self.shopper(request["user_id"])
        appeal = self.attractiveness(shopper, [cat.by_id[i] for i in ids], query)
        return [ids[i] for i in np.argsort(-appeal, kind="stable")]

    def examination(self, positions: np.ndarray | Sequence[int]) -> np.ndarray:
        """Probability that a shopper looks at the items shown at these (1-based) positions.

        >>> Simulator(seed=0).examination([1, 2, 10]).round(3).tolist()
        [1.0, 0.574, 0.158]
        """
        return np.asarray(positions, dtype=np.float64) ** -self.position_decay

    # --- traffic ---------------------------------------------------------------------------

    def catalog_messages(self) -> list[dict[str, Any]]:
        """The catalog feed, one message per item, to send before the first request."""
        return self.catalog.messages()

    def next_request(self, now: float = 0.0) -> dict[str, Any]:
        """The next search request (the contract's message), from a shopper and a query.

        The query is the name of a category the shopper picks by taste; the candidates are
        mostly that category's items, in the retrieval's noisy relevance order, with its
        ``score``; ``k`` is the page size.
        """
        rng = self._rng
        shopper = self._pick_shopper()
        self.requests += 1
        cat = self.catalog
        taste = np.exp(shopper.category_taste - shopper.category_taste.max())
        query = int(rng.choice(len(taste), p=taste / taste.sum()))
        members = cat.members[query]
        n = int(rng.integers(self.candidates[0], self.candidates[1] + 1))
        n_off = min(int(rng.binomial(n, self.off_category_share)), len(cat) - len(members))
        n_on = min(n - n_off, len(members))
        on = rng.choice(members, size=n_on, replace=False)
        others = np.flatnonzero(cat.category_of != query)
        off = rng.choice(others, size=n_off, replace=False) if n_off else others[:0]
        chosen = np.concatenate([on, off])
        # Text relevance: the query's category matters most, quality a little, noise a lot.
        relevance = (
            2.0 * (cat.category_of[chosen] == query)
            + 0.3 * cat.quality[chosen]
            + rng.normal(0.0, self.retrieval_noise, len(chosen))
        )
        order = np.argsort(-relevance, kind="stable")
        request: dict[str, Any] = {
            "request_id": f"r{self.seed}-{self.requests}",
            "user_id": shopper.user_id,
            "query": cat.queries[query],
            "candidates": [
                {
                    "item_id": cat.items[chosen[i]].item_id,
                    "score": round(float(10 + 3 * relevance[i]), 3),
                }
                for i in order
            ],
            "ts": now,
            "context": {"device": "mobile" if rng.random() < 0.6 else "desktop"},
        }
        if self.page_size:
            request["k"] = self.page_size
        return request

    def feedback(
        self, request: dict[str, Any], result: dict[str, Any], now: float = 0.0
    ) -> list[dict[str, Any]]:
        """The shopper's clicks, add-to-carts and purchases on the page they were shown.

        Each item at shown position ``p`` is looked at with :meth:`examination` and, if
        looked at, clicked with its :meth:`attractiveness`; a click may lead to an
        add-to-cart and that to a purchase. Events are in time order, ``ts`` seconds after
        ``now`` (the shopper takes a moment to read, and longer to buy); their ``event_id``
        is unique. The randomness depends only on the seed and the request, so the same
        page shown twice gets the same reaction.
        """
        shopper = self.shopper(request["user_id"])
        number = int(request["request_id"].rsplit("-", 1)[1])
        rng = np.random.default_rng([self.seed, 2, number])
        cat = self.catalog
        query = cat.queries.index(request["query"]) if request.get("query") in cat.queries else -1
        shown = sorted(result["items"], key=lambda item: item["rank"])
        if self.page_size:
            shown = shown[: self.page_size]
        idx = np.array([cat.by_id[item["item_id"]] for item in shown], dtype=np.int64)
        positions = np.arange(1, len(shown) + 1)
        attractive = self.attractiveness(shopper, idx, query)
        clicked = rng.random(len(idx)) < self.examination(positions) * attractive
        events: list[dict[str, Any]] = []
        t = now
        for n in np.flatnonzero(clicked).tolist():
            item = cat.items[idx[n]]
            t += float(rng.uniform(0.3, 1.5))
            base = {
                "user_id": shopper.user_id,
                "item_id": item.item_id,
                "request_id": request["request_id"],
                "position": int(positions[n]),
            }
            events.append(_event(base, "click", t, len(events)))
            # Clicked items that really appeal are carted more often, and bought.
            if rng.random() < 0.3 * attractive[n]:
                t += float(rng.uniform(1.0, 4.0))
                events.append(_event(base, "add_to_cart", t, len(events)))
                if rng.random() < 0.5:
                    t += float(rng.uniform(2.0, 6.0))
                    events.append(_event(base, "purchase", t, len(events), value=item.price))
        events.sort(key=lambda e: e["ts"])
        return events


def _event(base: dict[str, Any], kind: str, ts: float, n: int, **extra: Any) -> dict[str, Any]:
    # Unique per request and place in its feedback: "e<request number>.<n>" after the "r".
    return {
        "event_id": "e" + base["request_id"][1:] + f".{n}",
        **base,
        "type": kind,
        "ts": round(ts, 3),
        **extra,
    }
