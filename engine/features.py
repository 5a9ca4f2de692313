"""Every ranking feature: what it means, where its state lives, how it is computed.

State lives in the store under these keys (all with TTLs):

========================  ======================================================================
key                       content
========================  ======================================================================
``u:{user}:a``            user's decayed engagement counts: ``c|{category}|{k,a,p}`` and
                          ``b|{brand}|{k,a,p}`` (click, add-to-cart, purchase), totals
                          ``e|{k,a,p}``, price level ``pw`` / ``ps`` (weight, weighted log price)
``u:{user}:r``            the user's last N engaged items, ``"{item_id}\\t{ts}"``, newest first
``i:{item}``              catalog attributes ``cat``, ``brand``, ``price``, ``avail`` and counters
                          ``imp``, ``clk``, ``cart``, ``buy``, ``exp`` (expected clicks); decayed
                          impressions and clicks ``t|i``, ``t|c`` as of ``t|_t``
``q:{query digest}``      per query and item: ``{item}|i`` impressions, ``{item}|c`` clicks,
                          ``{item}|e`` expected clicks
``g:pos``                 impressions ``i{p}`` and clicks ``c{p}`` at each position ``p``
``i:{item}:n``            the item's top-K co-engaged neighbours (``engine.item_similarity``)
========================  ======================================================================

Position bias: an item shown at position 1 is clicked more than the same item
at position 8 because it is seen more. Each impression at position ``p`` adds
the global click-through rate at ``p`` to the item's *expected clicks*; clicks
over expected clicks (COEC) is then a click-through rate freed of where the
item happened to be shown: above 1 the item beats an average item at the same
positions, below 1 it does worse. It is smoothed towards 1 by a prior worth
``coec_prior_clicks`` expected clicks.

Co-engagement (``session_similarity``, ``history_similarity``) is learned from the
stream by ``engine.item_similarity``: the anchors are the user's last distinct
engaged items (from ``u:{user}:r``), and their neighbour hashes are read with
that list, in the same round trip (``engine.item_similarity.recent_items_read``).
``FeatureConfig(similarity=False)`` turns both off: they are 0 and nothing more
is read.

The features, in the column order of :func:`compute_features`:
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np

from engine.messages import CatalogItem, Interaction, SearchRequest
from engine.near_cache import NearCache
from engine.store import (
    DecayedIncrement,
    FieldsRead,
    HashRead,
    Increment,
    ListRead,
    PushRecent,
    Read,
    RecordsRead,
    SetFields,
    Store,
    Write,
    decay_factor,
)

if TYPE_CHECKING:
    from engine.item_similarity import Anchor, SimilarityConfig


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    scope: str
    meaning: str


FEATURES: tuple[Feature, ...] = (
    Feature("retrieval_reciprocal_rank", "request", "1 / (1 + place in the retrieval order)"),
    Feature("retrieval_score_z", "request", "retrieval score standardized within the request"),
    Feature("item_ctr_logit", "item", "logit of clicks / impressions, smoothed to the global CTR"),
    Feature("item_coec_log", "item", "log of clicks over expected clicks (position-debiased CTR)"),
    Feature("item_log_impressions", "item", "log(1 + impressions): how much the CTR is worth"),
    Feature("item_cart_rate", "item", "add-to-carts / (clicks + 5): shrunk to 0 when unproven"),
    Feature("item_purchase_rate", "item", "purchases / (clicks + 5)"),
    Feature("item_available", "item", "0 when the catalog says the item is unavailable"),
    # What is popular now: news and fashion items rise and fade within hours, which a CTR
    # over the item's whole life averages away.
    Feature(
        "item_trend_ctr_logit",
        "item",
        "logit of decayed clicks / decayed impressions (half-life trend_half_life_s), smoothed",
    ),
    Feature("item_trend_log_impressions", "item", "log(1 + decayed impressions): recent exposure"),
    Feature("query_item_coec_log", "query-item", "log COEC of the item for this query"),
    Feature("query_item_log_impressions", "query-item", "log(1 + impressions for this query)"),
    Feature("user_category_share", "user-item", "share of the user's engagement in this category"),
    Feature("user_category_log_count", "user-item", "log(1 + user's engagement in this category)"),
    Feature("user_category_conversions", "user-item", "log(1 + carts and purchases, category)"),
    Feature("user_brand_share", "user-item", "share of the user's engagement with this brand"),
    Feature("user_engaged_item", "user-item", "1 if the item is among the user's last N items"),
    Feature(
        "user_item_recency", "user-item", "2^(-age / recency half-life) of the last engagement"
    ),
    Feature("user_price_match", "user-item", "closeness of the price to the user's price level"),
    Feature("user_log_engagement", "user", "log(1 + the user's decayed engagement)"),
    # Long lists have lower CTR per item and smaller reciprocal ranks: without this,
    # a pointwise model reads list length as a position effect.
    Feature("request_log_candidates", "request", "log(number of candidates)"),
    # Collaborative filtering from the stream (engine.item_similarity): what shoppers who
    # engaged the same items engaged next. New users and items score 0.
    Feature(
        "session_similarity",
        "user-item",
        "log(1 + summed co-engagement cosine to the items of the current session)",
    ),
    Feature(
        "history_similarity",
        "user-item",
        "log(1 + summed co-engagement cosine to the user's last distinct engaged items)",
    ),
)
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
__doc__ += "\n".join(f"- ``{f.name}`` ({f.scope}): {f.meaning}" for f in FEATURES)

# Engagement letters in the user hash, and how much each is worth in the shares.
ENGAGEMENT_CODES = {"click": "k", "add_to_cart": "a", "purchase": "p"}
ENGAGEMENT_WEIGHTS = {"k": 1.0, "a": 3.0, "p": 5.0}


def _default_co_engagement() -> SimilarityConfig:
    from engine.item_similarity import SimilarityConfig  # it builds on this module

    return SimilarityConfig()


@dataclass(frozen=True, slots=True)
class FeatureConfig:
    """How features are computed and how long their state lives.

    ``similarity`` switches the co-engagement features on or off (off: they are 0 and
    nothing is read or learned for them), ``co_engagement`` says how they are learned.
    """

    user_half_life_s: float = 7 * 86400.0
    recent_items: int = 50
    recency_half_life_s: float = 3600.0
    trend_half_life_s: float = 3600.0
    ctr_prior_impressions: float = 20.0
    coec_prior_clicks: float = 2.0
    default_ctr: float = 0.05
    max_position: int = 50
    position_prior_impressions: float = 200.0
    price_tolerance: float = 0.5  # in log-price units
    user_ttl_s: int = 90 * 86400
    item_ttl_s: int = 180 * 86400
    query_ttl_s: int = 30 * 86400
    similarity: bool = True
    co_engagement: SimilarityConfig = field(default_factory=_default_co_engagement)


# --- keys ------------------------------------------------------------------------------------

POSITIONS_KEY = "g:pos"


def user_affinity_key(user_id: str) -> str:
    return f"u:{user_id}:a"


def user_recent_key(user_id: str) -> str:
    return f"u:{user_id}:r"


def item_key(item_id: str) -> str:
    return f"i:{item_id}"


def normalize_query(query: str) -> str:
    """Lower-case, single-spaced: "Running  Shoes" and "running shoes" are one query."""
    return " ".join(query.lower().split())


@functools.lru_cache(maxsize=4096)  # shoppers repeat queries; the digest is the cost
def query_key(query: str) -> str | None:
    """The key of a query's per-item counters (a digest bounds the key length)."""
    normalized = normalize_query(query)
    if not normalized:
        return None
    return "q:" + hashlib.blake2b(normalized.encode(), digest_size=8).hexdigest()


# --- an item, as ranking sees it ----------------------------------------------------------------

# The item's co-engagement weight, kept by ``engine.item_similarity``: decayed count and stamp.
ENGAGEMENT_TOTAL, ENGAGEMENT_STAMP = "s|n", "s|_t"
# The numbers of an item hash that ranking uses, in the order of an ItemState's numbers.
ITEM_NUMBERS = (
    "imp", "clk", "exp", "cart", "buy", "t|i", "t|c", "t|_t", "price",
    ENGAGEMENT_TOTAL, ENGAGEMENT_STAMP,
)  # fmt: skip
ITEM_FIELDS = (*ITEM_NUMBERS, "avail", "cat", "brand")
_NUMBER = {name: k for k, name in enumerate(ITEM_NUMBERS)}


# What ranking uses of an item's hash, parsed once: ``(numbers, category, brand, available)``,
# the numbers in ITEM_NUMBERS order (NaN where the hash has no value), category and brand ""
# when unknown. A plain tuple, not a class: the near cache holds tens of thousands, and the
# garbage collector stops tracking tuples of plain values, where it would walk every class
# instance in each full collection (tens of milliseconds in which nothing is ranked).
ItemState = tuple[tuple[float, ...], str, str, bool]
NUMBERS, CATEGORY, BRAND, AVAILABLE = range(4)


def item_state(values: Sequence[str | None]) -> ItemState:
    """An item from the values of ``ITEM_FIELDS``, in that order (``None`` where absent).

    >>> item = item_state_from_hash({"clk": "3", "imp": "40", "cat": "shoes", "avail": "0"})
    >>> item_number(item, "clk"), item[CATEGORY], item[AVAILABLE]
    (3.0, 'shoes', False)
    >>> math.isnan(item_number(item, "price"))  # absent
    True
    """
    *numbers, available, category, brand = values
    return (
        tuple(float(v) if v else math.nan for v in numbers),
        category or "",
        brand or "",
        available != "0",
    )


def item_state_from_hash(fields: dict[str, str]) -> ItemState:
    return item_state([fields.get(name) for name in ITEM_FIELDS])


def item_number(item: ItemState, name: str) -> float:
    return item[NUMBERS][_NUMBER[name]]


UNKNOWN_ITEM: ItemState = ((math.nan,) * len(ITEM_NUMBERS), "", "", True)


def read_items(store: Store, item_ids: Sequence[str]) -> list[ItemState]:
    """The items as ranking sees them, in one read."""
    (values,) = store.read([RecordsRead(tuple(item_key(i) for i in item_ids), ITEM_FIELDS)])
    return [item_state(v) for v in values]


# --- position bias -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PositionCounts:
    """Impressions and clicks over every shopper at positions 1, 2, ... (index 0 is
    position 1), from ``g:pos``: parsed once, then shared by the requests that see it.

    >>> counts = position_counts({"i1": "100", "c1": "10", "i2": "80"})
    >>> counts.shown.tolist(), counts.clicked.tolist()
    ([100.0, 80.0], [10.0, 0.0])
    """

    shown: np.ndarray
    clicked: np.ndarray


NO_POSITION_COUNTS = PositionCounts(np.zeros(0), np.zeros(0))


def position_counts(fields: dict[str, str]) -> PositionCounts:
    """The counts of the hash ``g:pos`` (fields ``i{p}``, ``c{p}``), as read."""
    last = max((int(name[1:]) for name in fields), default=0)
    shown, clicked = np.zeros(last), np.zeros(last)
    for name, value in fields.items():
        (shown if name[0] == "i" else clicked)[int(name[1:]) - 1] = float(value)
    return PositionCounts(shown, clicked)


def position_ctr(positions: PositionCounts, config: FeatureConfig) -> np.ndarray:
    """Global click-through rate at positions 1..max_position (index 0 = position 1).

    Smoothed towards a prior curve ``default_ctr / sqrt(p)`` so that positions
    with few impressions still get a sensible value.
    """
    p = np.arange(1, config.max_position + 1, dtype=np.float64)
    prior = config.default_ctr / np.sqrt(p)
    m = config.position_prior_impressions
    shown = _first(positions.shown, config.max_position)
    clicked = _first(positions.clicked, config.max_position)
    return (clicked + m * prior) / (shown + m)


def _first(values: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` values, zeros after the last."""
    first = np.zeros(n)
    first[: min(n, len(values))] = values[:n]
    return first


def position_index(position: int, config: FeatureConfig) -> int:
    """Positions past ``max_position`` share the last bucket."""
    return min(position, config.max_position)


# --- reading a request's state -------------------------------------------------------------


@dataclass(slots=True)
class RequestState:
    """Everything the store knows that matters for one request, read in one round trip."""

    user: dict[str, str]
    recent: list[str]
    items: list[ItemState]
    # Per candidate (a row), its impressions, clicks and expected clicks for the request's
    # query; zeros without a query.
    query_counts: np.ndarray
    positions: PositionCounts
    # The user's recent distinct items and, per anchor, its neighbour hash and engagement
    # weight (``engine.item_similarity.recent_with_anchors``).
    anchors: list[Anchor] = field(default_factory=list)
    anchor_replies: list = field(default_factory=list)


def read_request_state(
    store: Store,
    request: SearchRequest,
    config: FeatureConfig,
    cache: NearCache | None = None,
) -> RequestState:
    """Everything the store knows that matters for ``request``, in one round trip.

    The user's state and the query's counters are always read; the items and the
    position curve come from ``cache`` when it holds them fresh, and what is read is put
    there. (A query's counters are not cached: few requests repeat a query and its
    candidates within seconds, and looking a hundred fresh keys up in a cache that large
    costs about what reading them does.) Raises ``StoreUnavailable`` when the store cannot
    be reached.
    """
    ids = [c.item_id for c in request.candidates]
    # The shopper's own state goes out first; the near cache is looked up while the store
    # works on it, and what it lacks follows in the same round trip.
    shopper = [
        HashRead(user_affinity_key(request.user_id)),
        recent_read(request, config, neighbours_among=ids),
    ]
    shared = _SharedReads(ids, query_key(request.query), cache)
    (user, recent), replies = store.read_then(shopper, shared.plan)
    anchors, anchor_replies = [], []
    if config.similarity:  # the recent items came with their anchors' neighbour lists
        from engine.item_similarity import recent_with_anchors

        recent, anchors, anchor_replies = recent_with_anchors(
            recent, request.ts, config.co_engagement
        )
    items, positions, query = shared.answered(replies)
    return RequestState(
        user=user,
        recent=recent,
        items=items,
        query_counts=query,
        positions=positions,
        anchors=anchors,
        anchor_replies=anchor_replies,
    )


class _SharedReads:
    """A request's shared state: what the near cache holds of it, and the reads of the rest
    (the items it lacks, the position counts if it lacks them, the query's counters)."""

    def __init__(self, ids: list[str], qkey: str | None, cache: NearCache | None) -> None:
        self.ids, self.qkey, self.cache = ids, qkey, cache
        # Set by plan(): the cache's items (None where it lacks one) and position counts.
        self.item_keys: list[str] = []
        self.items: list[ItemState | None] = []
        self.positions: PositionCounts | None = None
        self.missing: list[int] = []  # the candidates whose items are read

    def plan(self) -> list[Read]:
        """Look the cache up; the reads of what it lacks."""
        ids, cache = self.ids, self.cache
        self.item_keys = [item_key(i) for i in ids]
        if cache is not None:
            self.items, self.positions = cache.get_many(self.item_keys), cache.get(POSITIONS_KEY)
        else:
            self.items, self.positions = [None] * len(ids), None
        self.missing = [n for n, item in enumerate(self.items) if item is None]
        reads: list[Read] = []
        if self.positions is None:
            reads.append(HashRead(POSITIONS_KEY))
        if self.missing:
            keys = tuple(self.item_keys[n] for n in self.missing)
            reads.append(RecordsRead(keys, ITEM_FIELDS))
        if self.qkey is not None:
            reads.append(FieldsRead(self.qkey, tuple(f"{i}|{s}" for i in ids for s in "ice")))
        return reads

    def answered(self, answers: list) -> tuple[list[ItemState], PositionCounts, np.ndarray]:
        """The items, position counts and query counters, from the cache and ``answers``
        (to :meth:`plan`'s reads); what was read is put in the cache."""
        replies = iter(answers)
        items, positions, cache = self.items, self.positions, self.cache
        if positions is None:
            positions = position_counts(next(replies))
            if cache is not None:
                cache.put(POSITIONS_KEY, positions)
        if self.missing:
            for n, values in zip(self.missing, next(replies), strict=True):
                items[n] = item_state(values)
            if cache is not None:
                cache.put_many((self.item_keys[n], items[n]) for n in self.missing)
        if self.qkey is None:
            query = np.zeros((len(self.ids), 3))
        else:
            values = next(replies)
            query = np.array([float(v) if v else 0.0 for v in values]).reshape(len(self.ids), 3)
        return items, positions, query


def recent_read(
    request: SearchRequest, config: FeatureConfig, neighbours_among: Sequence[str] | None = None
) -> Read:
    """The user's recent items; with similarity on, their anchors' neighbour lists with them
    (``engine.item_similarity``), in the same round trip: only the neighbours among
    ``neighbours_among`` when given, else all."""
    if not config.similarity:
        return ListRead(user_recent_key(request.user_id), config.recent_items)
    from engine.item_similarity import recent_items_read

    return recent_items_read(request.user_id, config, neighbours_among)


def empty_state(request: SearchRequest) -> RequestState:
    n = len(request.candidates)
    return RequestState({}, [], [UNKNOWN_ITEM] * n, np.zeros((n, 3)), NO_POSITION_COUNTS)


# --- computing features ----------------------------------------------------------------------


def _num(fields: dict[str, str], name: str) -> float:
    value = fields.get(name)
    return float(value) if value else 0.0


def global_ctr(positions: PositionCounts, config: FeatureConfig) -> float:
    """Clicks over impressions over all positions, smoothed to ``default_ctr``."""
    m = config.position_prior_impressions
    shown, clicked = float(positions.shown.sum()), float(positions.clicked.sum())
    return (clicked + m * config.default_ctr) / (shown + m)


def compute_features(
    request: SearchRequest, state: RequestState, config: FeatureConfig
) -> np.ndarray:
    """The feature matrix of a request: one row per candidate, one column per feature.

    Built column by column with NumPy from one array of the candidates' item numbers
    (parsed once per read, ``ItemState``); everything else is vectorized.

    >>> from engine.messages import Candidate, SearchRequest
    >>> request = SearchRequest("r-1", "u-1", (Candidate("i-1", 2.0), Candidate("i-2", 1.0)))
    >>> x = compute_features(request, empty_state(request), FeatureConfig())
    >>> x.shape, x[:, FEATURE_NAMES.index("retrieval_reciprocal_rank")].tolist()
    ((2, 23), [1.0, 0.5])
    """
    n = len(request.candidates)
    now = request.ts
    user, items = state.user, state.items
    fade = decay_factor(now - float(user.get("_t", now)), config.user_half_life_s)
    engagement_total = fade * sum(
        weight * _num(user, f"e|{code}") for code, weight in ENGAGEMENT_WEIGHTS.items()
    )
    price_weight = _num(user, "pw")
    user_log_price = _num(user, "ps") / price_weight if price_weight > 0.05 else None
    # When each recently engaged item was last engaged ("{item}\t{ts}", newest first: the
    # oldest go in first and the newest overwrite them); parsed for the candidates only.
    last_engaged = dict(entry.partition("\t")[::2] for entry in reversed(state.recent))

    # One array of every candidate's item numbers; absent counters count 0.
    numbers = np.fromiter(
        chain.from_iterable(item[NUMBERS] for item in items),
        dtype=np.float64,
        count=n * len(ITEM_NUMBERS),
    ).reshape(n, len(ITEM_NUMBERS))
    counts = np.where(np.isnan(numbers), 0.0, numbers)

    def column(name: str) -> np.ndarray:
        return counts[:, _NUMBER[name]]

    impressions, clicks = column("imp"), column("clk")
    prior_ctr = global_ctr(state.positions, config)
    m_ctr, m_coec = config.ctr_prior_impressions, config.coec_prior_clicks
    # Clicks are counted without impressions too (from outside a ranked result, or while
    # the store was down), so a smoothed rate can reach 1: clamp before the logit.
    item_ctr = _probability((clicks + prior_ctr * m_ctr) / (impressions + m_ctr))
    query = state.query_counts

    # Tastes per category and brand: looked up once per distinct value in the request.
    categories = [item[CATEGORY] for item in items]
    brands = [item[BRAND] for item in items]
    category_tastes, brand_tastes = np.zeros((n, 2)), np.zeros((n, 2))
    for tastes, values, kind in ((category_tastes, categories, "c"), (brand_tastes, brands, "b")):
        if by_value := _tastes(user, kind, set(values), fade):
            for k, value in enumerate(values):
                if (taste := by_value.get(value)) is not None:
                    tastes[k] = taste
    brand_weights = brand_tastes[:, 0]
    last = np.full(n, np.nan)
    for k, candidate in enumerate(request.candidates):
        if (ts := last_engaged.get(candidate.item_id)) is not None:
            last[k] = float(ts or 0.0)
    engaged = ~np.isnan(last)

    x = np.empty((n, len(FEATURE_NAMES)), dtype=np.float64)
    x[:, 0] = 1.0 / np.arange(1, n + 1)
    x[:, 1] = _standardized_scores(request)
    x[:, 2] = np.log(item_ctr / (1.0 - item_ctr))
    x[:, 3] = np.log((clicks + m_coec) / (column("exp") + m_coec))
    x[:, 4] = np.log1p(impressions)
    x[:, 5] = column("cart") / (clicks + 5.0)
    x[:, 6] = column("buy") / (clicks + 5.0)
    x[:, 7] = [item[AVAILABLE] for item in items]
    trend_stamp = numbers[:, _NUMBER["t|_t"]]
    trend_fade = np.exp2(
        -np.maximum(now - np.where(np.isnan(trend_stamp), now, trend_stamp), 0.0)
        / config.trend_half_life_s
    )
    trend_impressions = column("t|i") * trend_fade
    trend_ctr = _probability(
        (column("t|c") * trend_fade + prior_ctr * m_ctr) / (trend_impressions + m_ctr)
    )
    x[:, 8] = np.log(trend_ctr / (1.0 - trend_ctr))
    x[:, 9] = np.log1p(trend_impressions)
    x[:, 10] = np.log((query[:, 1] + m_coec) / (query[:, 2] + m_coec))
    x[:, 11] = np.log1p(query[:, 0])
    share = 1.0 / engagement_total if engagement_total > 0 else 0.0
    x[:, 12] = category_tastes[:, 0] * share
    x[:, 13] = np.log1p(category_tastes[:, 0])
    x[:, 14] = np.log1p(category_tastes[:, 1])
    x[:, 15] = brand_weights * share
    x[:, 16] = engaged
    # (NaN where never engaged, then replaced by 0.)
    x[:, 17] = np.where(
        engaged, np.exp2(-np.maximum(now - last, 0.0) / config.recency_half_life_s), 0.0
    )
    x[:, 18] = _price_match(column("price"), user_log_price, config.price_tolerance)
    x[:, 19] = math.log1p(engagement_total)
    x[:, 20] = math.log(n)
    if state.anchors:
        from engine.item_similarity import similarity_features

        ids = [c.item_id for c in request.candidates]
        similarity = similarity_features(
            ids, items, state.anchors, state.anchor_replies, now, config.co_engagement
        )
        x[:, 21:23] = np.log1p(similarity)
    else:
        x[:, 21:23] = 0.0
    return x


def _probability(rate: np.ndarray) -> np.ndarray:
    """Kept inside (0, 1) for a logit (np.clip's wrapper costs more than the work here)."""
    return np.minimum(np.maximum(rate, 1e-9), 1.0 - 1e-9)


def _standardized_scores(request: SearchRequest) -> np.ndarray:
    """Retrieval scores as z-scores within the request; 0 where a score is missing."""
    scores = retrieval_scores(request)
    known = ~np.isnan(scores)
    every = bool(known.all())
    values = scores if every else scores[known]
    if len(values) == 0:
        return np.zeros(len(scores))
    centered = values - values.sum() / len(values)
    spread = math.sqrt(centered @ centered / len(values))  # np.std, without its wrappers
    if spread == 0:
        return np.zeros(len(scores))
    if every:
        return centered / spread
    standardized = np.zeros(len(scores))
    standardized[known] = centered / spread
    return standardized


def retrieval_scores(request: SearchRequest) -> np.ndarray:
    """The candidates' retrieval scores, NaN where missing."""
    return np.array([c.score for c in request.candidates], dtype=np.float64)


def _tastes(
    user: dict[str, str], kind: str, values: Iterable[str], fade: float
) -> dict[str, tuple[float, float]]:
    """The user's (weighted engagement, carts + purchases), decayed to now, for each of
    ``values`` (categories, ``kind`` "c", or brands, "b") they engaged with."""
    get, cart_weight, purchase_weight = user.get, ENGAGEMENT_WEIGHTS["a"], ENGAGEMENT_WEIGHTS["p"]
    tastes = {}
    for value in values:
        clicks = get(f"{kind}|{value}|k")
        carts = get(f"{kind}|{value}|a")
        purchases = get(f"{kind}|{value}|p")
        if value and (clicks or carts or purchases):  # most candidates' are not the user's
            k, a, p = (float(x) if x else 0.0 for x in (clicks, carts, purchases))
            tastes[value] = (fade * (k + cart_weight * a + purchase_weight * p), fade * (a + p))
    return tastes


def _price_match(prices: np.ndarray, user_log_price: float | None, tolerance: float) -> np.ndarray:
    """Gaussian closeness of log price to the user's price level; 0 when either is unknown."""
    if user_log_price is None:
        return np.zeros(len(prices))
    known = prices > 0
    distance = np.log(np.where(known, prices, 1.0)) - user_log_price
    return np.where(known, np.exp(-0.5 * (distance / tolerance) ** 2), 0.0)


# --- updating feature state ------------------------------------------------------------------


def catalog_writes(item: CatalogItem, config: FeatureConfig) -> list[Write]:
    """Catalog attributes of an item (absent fields keep their stored value)."""
    values = {"avail": "1" if item.available else "0"}
    if item.category is not None:
        values["cat"] = item.category
    if item.brand is not None:
        values["brand"] = item.brand
    if item.price is not None:
        values["price"] = repr(item.price)
    return [SetFields(item_key(item.item_id), values, config.item_ttl_s)]


def impression_counter_writes(
    query: str,
    shown_item_ids: Sequence[str],
    positions: PositionCounts,
    config: FeatureConfig,
    ts: float = 0.0,
) -> list[Write]:
    """Count one impression for each shown item at its position, with its expected clicks
    (and, as of ``ts``, in the item's decayed trend counts)."""
    expected = position_ctr(positions, config)
    qkey = query_key(query)
    writes: list[Write] = []
    per_position: dict[str, float] = {}
    per_query: dict[str, float] = {}
    for rank, item_id in enumerate(shown_item_ids, start=1):
        bucket = position_index(rank, config)
        e = float(expected[bucket - 1])
        writes.append(Increment(item_key(item_id), {"imp": 1, "exp": e}, config.item_ttl_s))
        per_position[f"i{bucket}"] = per_position.get(f"i{bucket}", 0.0) + 1
        if qkey is not None:
            per_query[f"{item_id}|i"] = 1
            per_query[f"{item_id}|e"] = e
    # After the items' own increments (which set their TTL), and one after the other: the
    # store sends a run of writes that differ only by key as one.
    writes += [_trend_write(item_id, "t|i", ts, config) for item_id in shown_item_ids]
    writes.append(Increment(POSITIONS_KEY, per_position))
    if per_query:
        writes.append(Increment(qkey, per_query, config.query_ttl_s))
    return writes


def interaction_writes(
    interaction: Interaction,
    item: dict[str, str],
    query: str,
    position: int | None,
    config: FeatureConfig,
) -> list[Write]:
    """What an interaction changes: the user's tastes, the item's and the query's counters.

    ``item`` is the item's stored attributes, ``query`` and ``position`` come from
    the ranked result the interaction refers to (empty and ``None`` if none).
    """
    code = ENGAGEMENT_CODES[interaction.type]
    tastes = {f"e|{code}": 1.0}
    category, brand, price = item.get("cat"), item.get("brand"), _num(item, "price")
    if category:
        tastes[f"c|{category}|{code}"] = 1.0
    if brand:
        tastes[f"b|{brand}|{code}"] = 1.0
    if price > 0:
        weight = ENGAGEMENT_WEIGHTS[code]
        tastes["pw"] = weight
        tastes["ps"] = weight * math.log(price)
    writes: list[Write] = [
        DecayedIncrement(
            user_affinity_key(interaction.user_id),
            tastes,
            interaction.ts,
            config.user_half_life_s,
            ttl=config.user_ttl_s,
        ),
        PushRecent(
            user_recent_key(interaction.user_id),
            f"{interaction.item_id}\t{interaction.ts}",
            config.recent_items,
            config.user_ttl_s,
        ),
    ]
    counter = {"click": "clk", "add_to_cart": "cart", "purchase": "buy"}[interaction.type]
    writes.append(Increment(item_key(interaction.item_id), {counter: 1}, config.item_ttl_s))
    if interaction.type == "click":
        writes.append(_trend_write(interaction.item_id, "t|c", interaction.ts, config))
        if position is not None:
            writes.append(Increment(POSITIONS_KEY, {f"c{position_index(position, config)}": 1}))
        qkey = query_key(query)
        if qkey is not None:
            writes.append(Increment(qkey, {f"{interaction.item_id}|c": 1}, config.query_ttl_s))
    return writes


def _trend_write(item_id: str, counter: str, ts: float, config: FeatureConfig) -> Write:
    # No TTL of its own: it always follows an Increment of the same item that sets it (one
    # EXPIRE less per shown item).
    return DecayedIncrement(
        item_key(item_id), {counter: 1.0}, ts, config.trend_half_life_s, floor=0.001, prefix="t|"
    )
